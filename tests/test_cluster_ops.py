"""Cluster operations: profiles, array planning, sbatch retries, the ledger, resubmit, dry-run.

The first part runs anywhere: stand-in `sbatch`, `srun`, `scontrol`, `sacct`
and `squeue` scripts on PATH record their calls and print what a test sets.
The second part (marked slurm) runs against the single-node test cluster:
USR2 and SIGKILL on real jobs, MaxArraySize, accounting stopped, hostile
profile values.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import textwrap
import time
from pathlib import Path

import h5py
import pytest

from jobs.run import RunOptions
from pipeline import estimate, ledger, submit
from pipeline.errors import UsageError
from pipeline.phases import load_phase
from pipeline.profile import Profile, load_profile
from pipeline.submit import Chunk, Retry
from pipeline.workdir import Workdir
from tests.helpers import run_cli, tiny_phase

# ---------------------------------------------------------------- stand-in SLURM tools


class FakeSlurm:
    """Scripts named like the SLURM clients in a folder that goes first on PATH.

    `sbatch` copies each job script it gets and prints "Submitted batch job N"
    with N counting up from 100, after failing `fail_sbatch(n, message)` times.
    `scontrol show config` prints MaxArraySize; `sacct` and `squeue` print
    what `set_sacct`/`set_squeue` gave them (sacct fails when given None).
    Every call is appended to calls.log.
    """

    def __init__(self, root: Path, max_array_size: int = 1001) -> None:
        self.bin = root / "fakebin"
        self.state = root / "fakestate"
        self.bin.mkdir(parents=True)
        self.state.mkdir(parents=True)
        (self.state / "next_id").write_text("100")
        (self.state / "fail_left").write_text("0")
        (self.state / "fail_message").write_text("")
        (self.state / "max_array_size").write_text(str(max_array_size))
        self.set_sacct("")
        self.set_squeue("")

        state = self.state
        self._script("sbatch", f"""
            echo "sbatch $*" >> {state}/calls.log
            left=$(cat {state}/fail_left)
            if [ "$left" -gt 0 ]; then
                echo $((left - 1)) > {state}/fail_left
                cat {state}/fail_message >&2
                exit 1
            fi
            id=$(cat {state}/next_id)
            echo $((id + 1)) > {state}/next_id
            cp "$1" {state}/script_$id.sh
            echo "Submitted batch job $id"
        """)
        self._script("srun", "exit 0")
        self._script("scontrol", f"""
            echo "scontrol $*" >> {state}/calls.log
            echo "MaxArraySize            = $(cat {state}/max_array_size)"
        """)
        self._script("sacct", f"""
            echo "sacct $*" >> {state}/calls.log
            if [ -f {state}/sacct_fails ]; then cat {state}/sacct_fails >&2; exit 1; fi
            cat {state}/sacct.out
        """)
        self._script("squeue", f"""
            echo "squeue $*" >> {state}/calls.log
            cat {state}/squeue.out
        """)

    def _script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    @property
    def path(self) -> str:
        return f"{self.bin}{os.pathsep}{os.environ['PATH']}"

    def fail_sbatch(self, times: int, message: str) -> None:
        (self.state / "fail_left").write_text(str(times))
        (self.state / "fail_message").write_text(message + "\n")

    def set_sacct(self, text: str | None, error: str = "sacct: error: Slurm accounting storage is disabled") -> None:
        (self.state / "sacct.out").write_text(text or "")
        failing = self.state / "sacct_fails"
        if text is None:
            failing.write_text(error + "\n")
        else:
            failing.unlink(missing_ok=True)

    def set_squeue(self, text: str) -> None:
        (self.state / "squeue.out").write_text(text)

    def calls(self, program: str) -> list[str]:
        log_path = self.state / "calls.log"
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        return [line for line in lines if line.split(" ", 1)[0] == program]

    def scripts(self) -> list[str]:
        return [p.read_text() for p in sorted(self.state.glob("script_*.sh"), key=lambda p: int(p.stem[7:]))]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> FakeSlurm:
    fake = FakeSlurm(tmp_path)
    monkeypatch.setenv("PATH", fake.path)
    return fake


def tiny_cells(tmp_path: Path, name: str = "ops", **kwargs) -> list:
    spec = tiny_phase(tmp_path / f"{name}.toml", **kwargs)
    return list(load_phase(None, spec).cells)


def write_profile(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- profiles


def test_example_profile_loads():
    profile = load_profile(Path(__file__).resolve().parent.parent / "sbatch" / "example-profile.toml")

    assert profile.partition
    assert profile.time_limit("100M") > profile.time_limit("tiny1") > 0
    assert profile.setup
    assert profile.tflops and profile.gpu_watts


def test_profile_values(tmp_path):
    profile = load_profile(write_profile(tmp_path / "p.toml", """
        partition = "gpu"
        account = "proj-42"
        qos = "normal"
        constraint = "a100&ib"
        gpus_per_task = 1
        cpus_per_task = 8
        mem_gb = 48.5
        country = "DEU"
        signal_delay_s = 120
        setup = ["module load cuda/12.4", "source $HOME/venv/bin/activate"]
        tflops = 150
        gpu_watts = 400.0
        [time_minutes]
        default = 90
        "100M" = 300
        [sbatch]
        mail-type = "END,FAIL"
        exclusive = true
        nice = 10
    """))

    assert profile.partition == "gpu" and profile.account == "proj-42" and profile.qos == "normal"
    assert profile.constraint == "a100&ib"
    assert (profile.gpus_per_task, profile.cpus_per_task, profile.mem_gb) == (1, 8, 48.5)
    assert profile.time_limit("100M") == 300
    assert profile.time_limit("15M") == 90
    assert profile.setup == ("module load cuda/12.4", "source $HOME/venv/bin/activate")
    assert profile.sbatch == {"mail-type": "END,FAIL", "exclusive": True, "nice": 10}
    assert profile.country == "DEU"
    assert profile.tflops == 150.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ('partiton = "gpu"', "partiton is not a profile key (did you mean 'partition'?)"),
        ("partition = 3", "partition must be a string, got 3 (int)"),
        ('partition = "x; touch /tmp/pwned"', "partition 'x; touch /tmp/pwned' contains characters outside"),
        ('partition = "gpu\\nhostname"', "contains characters outside"),
        ('account = "$(id)"', "account '$(id)' contains characters"),
        ('constraint = "a100 `id`"', "constraint"),
        ("gpus_per_task = true", "gpus_per_task must be a whole number, got True (bool)"),
        ("cpus_per_task = 0", "cpus_per_task 0 is below 1"),
        ("mem_gb = -4", "mem_gb -4 must be above 0"),
        ('mem_gb = "4G"', "mem_gb must be a number"),
        ("time_minutes = 60", "time_minutes must be a table"),
        ("[time_minutes]\nhuge = 60", "time_minutes.huge is not a size"),
        ("[time_minutes]\ndefault = 0", "time_minutes.default 0 is below 1"),
        ('setup = "module load cuda"', "setup must be a list"),
        ('setup = ["module load cuda\\nrm -rf ~"]', "setup[0] 'module load cuda\\nrm -rf ~' contains a line break"),
        ('[sbatch]\n"mail type" = "END"', "sbatch.mail type is not an sbatch option name"),
        ('[sbatch]\npartition = "gpu"', "sbatch.partition is set by the pipeline; use the partition key"),
        ('[sbatch]\noutput = "/tmp/x"', "sbatch.output is set by the pipeline"),
        ('[sbatch]\ncomment = "ok; touch /tmp/pwned"', "sbatch.comment 'ok; touch /tmp/pwned' contains characters"),
        ('[sbatch]\ncomment = "a\\nb"', "sbatch.comment"),
        ("[sbatch]\nrequeue = false", "sbatch.requeue is false; remove the option instead"),
        ("[sbatch]\nbegin = [1]", "sbatch.begin must be a string, a number or true"),
        ('country = "us"', "country 'us' contains characters outside an ISO 3166"),
        ("signal_delay_s = 3600", "signal_delay_s 3600 s reaches past the shortest time limit (60 min)"),
        ("tflops = 0", "tflops 0 must be above 0"),
    ],
)
def test_profile_rejects(tmp_path, text, needle):
    path = write_profile(tmp_path / "bad.toml", text + "\n")
    with pytest.raises(UsageError) as raised:
        load_profile(path)
    message = str(raised.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message.replace("\\n", "")


def test_profile_file_errors(tmp_path):
    with pytest.raises(UsageError, match="not found; check the path given to --profile"):
        load_profile(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="is not valid TOML"):
        load_profile(write_profile(tmp_path / "broken.toml", "partition = \n"))


# ---------------------------------------------------------------- planning and sbatch scripts


def test_plan_splits_by_size_and_array_limit(tmp_path):
    cells = tiny_cells(tmp_path, bits=("fp16", "int8", "int6"), warmdown=(0.1, 0.5))
    other = [cell.replace(size="tiny2") for cell in cells[:2]]
    profile = Profile(time_minutes={"default": 30, "tiny2": 45})

    chunks = submit.plan(cells + other, cells_per_task=2, profile=profile, array_limit=2)

    assert [(c.size, len(c.tasks), c.cell_count, c.time_min) for c in chunks] == [
        ("tiny1", 2, 4, 60),
        ("tiny1", 1, 2, 60),
        ("tiny2", 1, 2, 90),
    ]
    flat = [cell.cell_id for chunk in chunks for task in chunk.tasks for cell in task]
    assert sorted(flat) == sorted(c.cell_id for c in cells + other)


def test_plan_without_arrays(tmp_path):
    cells = tiny_cells(tmp_path)
    chunks = submit.plan(cells, cells_per_task=1, array_limit=0)
    assert [len(chunk.tasks) for chunk in chunks] == [1, 1, 1, 1]


def test_sbatch_parameters_from_profile(tmp_path):
    cells = tiny_cells(tmp_path)
    chunk = Chunk(size="tiny1", tasks=[[c] for c in cells], time_min=30)
    profile = Profile(
        partition="gpu", account="acc", qos="high", constraint="a100", gpus_per_task=2, cpus_per_task=4,
        mem_gb=1.5, setup=("module load cuda",), sbatch={"mail-type": "FAIL", "dependency": "afterok:7"},
    )

    parameters = submit.sbatch_parameters("phase one", chunk, profile, max_parallel=3, dependency="afterany:99")

    assert parameters == {
        "job_name": "qat-phase_one",
        "time": 30,
        "cpus_per_task": 4,
        "signal_delay_s": 90,
        "array_parallelism": 3,
        "partition": "gpu",
        "account": "acc",
        "qos": "high",
        "constraint": "a100",
        "gpus_per_task": 2,
        "mem": "1536MB",
        "setup": ["module load cuda"],
        "additional_parameters": {"mail-type": "FAIL", "dependency": "afterok:7,afterany:99"},
    }


def test_render_sbatch_array_and_single(tmp_path):
    folder = tmp_path / "logs" / "%j"
    parameters = submit.sbatch_parameters("p", Chunk("tiny1", [[], [], []], 20), Profile(partition="debug"))

    script = submit.render_sbatch(folder, parameters, 3)
    single = submit.render_sbatch(folder, parameters, 1)

    assert "#SBATCH --array=0-2%3\n" in script
    assert "#SBATCH --partition=debug\n" in script
    assert "#SBATCH --signal=USR2@90\n" in script
    assert "#SBATCH --time=20\n" in script
    assert f"-u -m submitit.core._submit {folder}" in script
    assert "--array" not in single


def test_render_quotes_values_inside_sbatch_lines(tmp_path):
    # A Profile built without parse_profile skips validation; the value still
    # stays inside one quoted #SBATCH line, a comment to bash.
    profile = Profile(sbatch={"comment": "x; touch /tmp/pwned"})
    parameters = submit.sbatch_parameters("p", Chunk("tiny1", [[]], 5), profile)

    script = submit.render_sbatch(tmp_path / "%j", parameters, 1)

    (line,) = [line for line in script.splitlines() if "pwned" in line]
    assert line == "#SBATCH --comment='x; touch /tmp/pwned'"


# ---------------------------------------------------------------- submission with stand-in tools


def options_for(workdir: Path) -> RunOptions:
    return RunOptions(workdir=str(workdir), checkpoint_every_s=60.0)


def test_submit_splits_arrays_and_records_ledger(tmp_path, fake_slurm):
    (fake_slurm.state / "max_array_size").write_text("2")
    cells = tiny_cells(tmp_path, bits=("fp16", "int8", "int6"), warmdown=(0.1, 0.5))
    workdir = Workdir.open(tmp_path / "wd")

    submission = submit.submit(workdir, cells, "slurm", options_for(workdir.root), max_parallel=1)

    assert submission.errors == []
    assert len(fake_slurm.calls("scontrol")) == 1
    scripts = fake_slurm.scripts()
    assert len(scripts) == 3
    assert all("#SBATCH --array=0-1%1" in script for script in scripts)
    assert "dependency" not in scripts[0]
    assert "#SBATCH --dependency=afterany:100" in scripts[1]
    assert "#SBATCH --dependency=afterany:101" in scripts[2]

    entries = ledger.read(ledger.path_for(workdir.results("ops")))
    assert sorted(e.cell_id for e in entries) == sorted(c.cell_id for c in cells)
    assert [e.job_id for e in entries] == ["100_0", "100_1", "101_0", "101_1", "102_0", "102_1"]
    assert {e.attempt for e in entries} == {1}
    assert entries[0].log_paths()[1] == workdir.logs("ops") / "100_0" / "100_0_0_log.err"


def test_submit_packs_cells_into_tasks(tmp_path, fake_slurm):
    cells = tiny_cells(tmp_path, bits=("fp16", "int8", "int6"))
    workdir = Workdir.open(tmp_path / "wd")

    submission = submit.submit(workdir, cells, "slurm", options_for(workdir.root), cells_per_task=2)

    assert [len(task) for task in submission.tasks] == [2, 2, 2]
    (script,) = fake_slurm.scripts()
    assert "#SBATCH --array=0-2%3" in script
    assert "#SBATCH --time=120" in script  # two cells of 60 minutes one after another
    jobs = [e.job_id for e in ledger.read(ledger.path_for(workdir.results("ops")))]
    assert jobs == ["100_0", "100_0", "100_1", "100_1", "100_2", "100_2"]


def test_sbatch_retried_with_backoff(tmp_path, fake_slurm, caplog):
    fake_slurm.fail_sbatch(2, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation")
    cells = tiny_cells(tmp_path)
    workdir = Workdir.open(tmp_path / "wd")
    caplog.set_level("WARNING", logger="pipeline.submit")

    submission = submit.submit(
        workdir, cells, "slurm", options_for(workdir.root), retry=Retry(attempts=3, backoff_s=0.01)
    )

    assert submission.errors == []
    assert len(fake_slurm.calls("sbatch")) == 3
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2
    assert "Socket timed out" in retries[0] and "retry 1 of 2" in retries[0] and "retry 2 of 2" in retries[1]
    entries = ledger.read(ledger.path_for(workdir.results("ops")))
    assert sorted(e.cell_id for e in entries) == sorted(c.cell_id for c in cells)


def test_sbatch_gives_up_and_records_nothing(tmp_path, fake_slurm):
    fake_slurm.fail_sbatch(10, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation")
    cells = tiny_cells(tmp_path)
    workdir = Workdir.open(tmp_path / "wd")

    submission = submit.submit(
        workdir, cells, "slurm", options_for(workdir.root), retry=Retry(attempts=3, backoff_s=0.01)
    )

    assert len(fake_slurm.calls("sbatch")) == 3
    assert len(submission.errors) == 1
    assert "sbatch failed 3 times" in submission.errors[0] and "4 cell(s) left unsubmitted" in submission.errors[0]
    assert submission.jobs == []
    assert ledger.read(ledger.path_for(workdir.results("ops"))) == []


def test_sbatch_permanent_error_not_retried(tmp_path, fake_slurm):
    fake_slurm.fail_sbatch(1, "sbatch: error: invalid partition specified: nope")
    (fake_slurm.state / "max_array_size").write_text("2")
    cells = tiny_cells(tmp_path)
    workdir = Workdir.open(tmp_path / "wd")

    with pytest.raises(UsageError) as err:
        submit.submit(workdir, cells, "slurm", options_for(workdir.root), retry=Retry(3, 0.01))

    assert len(fake_slurm.calls("sbatch")) == 1
    assert "invalid partition specified: nope" in str(err.value)
    assert ledger.read(ledger.path_for(workdir.results("ops"))) == []
    assert list(workdir.logs("ops").glob("*.pkl")) == []


def test_failed_second_array_keeps_first_in_ledger(tmp_path, fake_slurm):
    (fake_slurm.state / "max_array_size").write_text("2")
    cells = tiny_cells(tmp_path)
    workdir = Workdir.open(tmp_path / "wd")
    sbatch = fake_slurm.bin / "sbatch"
    # Accept the first array, then fail for good.
    sbatch.write_text(sbatch.read_text().replace(
        'left=$(cat', f'[ -f {fake_slurm.state}/script_100.sh ] && {{ echo "sbatch: error: invalid account" >&2; exit 1; }}\nleft=$(cat'
    ))

    submission = submit.submit(workdir, cells, "slurm", options_for(workdir.root), retry=Retry(3, 0.01))

    entries = ledger.read(ledger.path_for(workdir.results("ops")))
    assert [e.cell_id for e in entries] == [c.cell_id for c in cells[:2]]
    assert "array 2/2" in submission.errors[0] and "2 cell(s) left unsubmitted" in submission.errors[0]


def test_max_array_size_when_scontrol_fails():
    def broken(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="slurm_load_ctl_conf error: Unable to contact slurm controller")

    size, source = submit.max_array_size(runner=broken)
    assert size == submit.DEFAULT_MAX_ARRAY_SIZE
    assert "Unable to contact" in source


# ---------------------------------------------------------------- command line with stand-in tools


def test_dry_run_prints_arrays_script_and_estimate(tmp_path, fake_slurm):
    (fake_slurm.state / "max_array_size").write_text("3")
    spec = tiny_phase(tmp_path / "dry.toml", bits=("fp16", "int8", "int6"), warmdown=(0.1, 0.5))
    profile = write_profile(tmp_path / "p.toml", """
        partition = "debug"
        gpus_per_task = 1
        tflops = 10.0
        gpu_watts = 250
        [time_minutes]
        default = 15
    """)

    result = run_cli(
        "submit", "--phase-file", str(spec), "--dry-run", "--cluster", "slurm", "--profile", str(profile),
        "--max-parallel", "2", "--workdir", str(tmp_path / "wd"), env={"PATH": fake_slurm.path},
    )

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == "phase dry: 6 cells, 0 done, 6 to submit"
    assert "arrays on slurm (MaxArraySize 3, from scontrol show config):" in out
    assert "array 1: size tiny1, 3 task(s) of up to 1 cell(s), time limit 15 min, at most 2 running" in out
    assert "array 2:" in out and "array 3:" not in out
    assert "  | #SBATCH --array=0-2%2" in out
    assert "  | #SBATCH --partition=debug" in out
    assert "--dependency=afterany" in out  # a note for the arrays after the first
    assert "profile" in out.splitlines()[-1]
    assert fake_slurm.calls("sbatch") == []
    assert not (tmp_path / "wd").exists()


def test_bad_profile_exits_2_before_anything(tmp_path, fake_slurm):
    spec = tiny_phase(tmp_path / "hostile.toml")
    marker = tmp_path / "pwned"
    profile = write_profile(tmp_path / "p.toml", f'partition = "x; touch {marker}"\n')

    result = run_cli(
        "submit", "--phase-file", str(spec), "--cluster", "slurm", "--profile", str(profile),
        "--workdir", str(tmp_path / "wd"), env={"PATH": fake_slurm.path},
    )

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "partition" in result.stderr and "contains characters outside" in result.stderr
    assert fake_slurm.calls("sbatch") == []
    assert not marker.exists()
    assert not (tmp_path / "wd").exists()


def write_result(workdir: Path, phase: str, cell_id: str, status: str) -> None:
    path = workdir / "results" / phase / f"{cell_id}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["status"] = status
        f.attrs["complete"] = True


def test_resubmit_picks_failed_timed_out_and_unsubmitted(tmp_path, fake_slurm):
    spec = tiny_phase(tmp_path / "re.toml", bits=("fp16", "int8", "int6"), warmdown=(0.1, 0.5, 0.9))
    cells = list(load_phase(None, spec).cells)
    workdir = tmp_path / "wd"
    env = {"PATH": fake_slurm.path}
    assert run_cli("manifest", "--phase-file", str(spec), "--workdir", str(workdir)).returncode == 0
    # Cells 0-6 went out as array 55; 7 and 8 were never submitted.
    path = ledger.path_for(workdir / "results" / "re")
    ledger.append(path, [ledger.Entry(c.cell_id, f"55_{i}", "slurm", str(workdir / "logs/re/%j"), 1.0, 1) for i, c in enumerate(cells[:7])])
    write_result(workdir, "re", cells[0].cell_id, "done")
    write_result(workdir, "re", cells[1].cell_id, "diverged")
    fake_slurm.set_sacct(
        "55_0|COMPLETED|0:0\n55_1|COMPLETED|0:0\n55_2|FAILED|1:0\n55_3|TIMEOUT|0:0\n"
        "55_4|RUNNING|0:0\n55_5|CANCELLED by 0|0:0\n55_[6]|PENDING|0:0\n"
    )

    dry = run_cli("resubmit", "--phase", "re", "--cluster", "slurm", "--dry-run", "--workdir", str(workdir), env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == (
        "phase re: 5 to resubmit (2 failed, 1 timed-out, 2 never-submitted); "
        "left alone: 1 done, 1 running, 1 pending, 1 diverged (pass --include-diverged to retrain them)"
    )
    assert fake_slurm.calls("sbatch") == []

    result = run_cli("resubmit", "--phase", "re", "--cluster", "slurm", "--workdir", str(workdir), env=env)
    assert result.returncode == 0, result.stderr
    assert "submitted 5 cells" in result.stdout
    assert len(fake_slurm.calls("sacct")) == 2  # one per command

    latest = ledger.latest(ledger.read(path))
    expected = {cells[i].cell_id: attempt for i, attempt in ((2, 2), (3, 2), (5, 2), (7, 1), (8, 1))}
    resubmitted = {cid: e.attempt for cid, e in latest.items() if e.job_id.startswith("100_")}
    assert resubmitted == expected
    assert latest[cells[4].cell_id].job_id == "55_4"


def test_resubmit_include_diverged_moves_result(tmp_path, fake_slurm):
    spec = tiny_phase(tmp_path / "div.toml", bits=("fp16",), warmdown=(0.1, 0.5))
    cells = list(load_phase(None, spec).cells)
    workdir = tmp_path / "wd"
    assert run_cli("manifest", "--phase-file", str(spec), "--workdir", str(workdir)).returncode == 0
    write_result(workdir, "div", cells[0].cell_id, "diverged")
    write_result(workdir, "div", cells[1].cell_id, "done")

    result = run_cli(
        "resubmit", "--phase", "div", "--cluster", "slurm", "--include-diverged", "--workdir", str(workdir),
        env={"PATH": fake_slurm.path},
    )

    assert result.returncode == 0, result.stderr
    assert "1 to resubmit (0 failed, 0 timed-out, 0 never-submitted, 1 diverged)" in result.stdout
    assert not (workdir / "results" / "div" / f"{cells[0].cell_id}.h5").exists()
    (moved,) = (workdir / "results" / "div" / "superseded").glob(f"{cells[0].cell_id}.*.h5")
    assert moved.is_file()
    assert (workdir / "results" / "div" / f"{cells[1].cell_id}.h5").exists()
    (entry,) = ledger.read(ledger.path_for(workdir / "results" / "div"))
    assert entry.cell_id == cells[0].cell_id


def test_submit_leaves_running_cells_alone(tmp_path, fake_slurm):
    spec = tiny_phase(tmp_path / "busy.toml")
    cells = list(load_phase(None, spec).cells)
    workdir = tmp_path / "wd"
    path = ledger.path_for(workdir / "results" / "busy")
    ledger.append(path, [ledger.Entry(cells[0].cell_id, "70_0", "slurm", "logs/%j", 1.0, 1)])
    fake_slurm.set_sacct("70_0|RUNNING|0:0\n")

    result = run_cli("submit", "--phase-file", str(spec), "--cluster", "slurm", "--workdir", str(workdir), env={"PATH": fake_slurm.path})

    assert result.returncode == 0, result.stderr
    assert "1 running or pending (left alone), 3 to submit" in result.stdout
    assert "submitted 3 cells" in result.stdout
    latest = ledger.latest(ledger.read(path))
    assert latest[cells[0].cell_id].job_id == "70_0"


def test_resubmit_without_manifest(tmp_path):
    result = run_cli("resubmit", "--phase", "nothing", "--workdir", str(tmp_path))
    assert result.returncode == 2
    assert "no manifest for phase 'nothing'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- dry-run estimates


def write_measured(workdir: Workdir, phase: str, name: str, size: str, bits: str, tokens_per_s: float, kwh: float) -> None:
    path = workdir.results(phase) / f"{name}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"status": "done", "size": size, "bits": bits, "complete": True})
        f.create_group("metrics").attrs.update({"tokens_per_s": tokens_per_s, "tokens": 1000.0})
        f.create_group("energy").attrs["energy_kwh"] = kwh


def test_cell_flops_formula(tmp_path):
    (cell,) = tiny_cells(tmp_path, bits=("fp16",), warmdown=(0.5,))
    n_params = cell.vocab_size * cell.n_embd + 12 * cell.n_layer * cell.n_embd**2
    per_token = 6 * n_params + 12 * cell.n_layer * cell.n_embd * cell.seq_len

    assert estimate.cell_flops(cell) == per_token * cell.steps * cell.batch_size * cell.seq_len


def test_estimate_prefers_measured_rates(tmp_path):
    cells = tiny_cells(tmp_path, name="est", bits=("fp16", "int6"), warmdown=(0.5,))
    workdir = Workdir.open(tmp_path / "wd")
    write_measured(workdir, "est", "a", "tiny1", "fp16", 100.0, 0.002)
    write_measured(workdir, "est", "b", "tiny1", "fp16", 300.0, 0.004)
    write_measured(workdir, "est", "c", "tiny2", "int6", 50.0, float("nan"))
    rates = estimate.measured_rates(workdir, "est")

    assert rates[("tiny1", "fp16")] == estimate.Rate(tokens_per_s=200.0, kwh_per_token=3e-6, cells=2)
    assert rates[("tiny2", "")].kwh_per_token is None

    (block,) = estimate.estimate(cells, Profile(tflops=1.0, gpu_watts=100.0, gpus_per_task=1), rates)
    tokens = cells[0].steps * cells[0].tokens_per_step
    # fp16 uses the rate of finished tiny1 fp16 cells; int6 has none, so it uses all finished tiny1 cells.
    assert block.source == "measured"
    assert block.task_hours == pytest.approx(2 * tokens / 200.0 / 3600.0)
    assert block.gpu_hours == pytest.approx(block.task_hours)
    assert block.energy_kwh == pytest.approx(2 * tokens * 3e-6)


def test_estimate_from_profile_and_missing(tmp_path):
    cells = tiny_cells(tmp_path, name="est", bits=("fp16",), warmdown=(0.1, 0.5))
    profile = Profile(tflops=2.0, gpu_watts=300.0, gpus_per_task=2)

    (block,) = estimate.estimate(cells, profile, {})
    (none,) = estimate.estimate(cells, Profile(), {})

    hours = sum(estimate.cell_flops(c) for c in cells) / 2e12 / 3600.0
    assert block.source == "profile"
    assert block.task_hours == pytest.approx(hours)
    assert block.gpu_hours == pytest.approx(2 * hours)
    assert block.energy_kwh == pytest.approx(hours * 2 * 300.0 / 1000.0)
    assert none.task_hours is None
    assert none.source.startswith("no estimate for 2 cell(s): set tflops")
    table = estimate.format_estimates([block, none])
    assert table.splitlines()[-1].split()[:6] == ["all", "4", f"{4 * cells[0].steps * cells[0].tokens_per_step:.3g}", "-", "-", "-"]


# ---------------------------------------------------------------- the real single-node cluster

WAIT_S = 300.0  # the test cluster is shared, so a job may queue behind others
LONG_STEPS = 600  # long enough (seconds of training) to be signalled mid-run


def wait_for(predicate, timeout: float = WAIT_S, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


def slurm_submit(spec: Path, workdir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = run_cli(
        "submit", "--phase-file", str(spec), "--cluster", "slurm", "--checkpoint-minutes", "0.005",
        "--workdir", str(workdir), *extra, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def latest_entries(workdir: Path, phase: str) -> dict[str, ledger.Entry]:
    return ledger.latest(ledger.read(ledger.path_for(workdir / "results" / phase)))


def cancel_jobs(workdir: Path, phase: str) -> None:
    ids = sorted({e.array_job_id for e in ledger.read(ledger.path_for(workdir / "results" / phase))})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def job_state(job_id: str) -> str:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def checkpoint_step(path: Path) -> int:
    try:
        import torch

        return int(torch.load(path, weights_only=True)["step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def training_pid(job_id: str) -> int | None:
    """Return the pid of the job's Python training process on this node (`scontrol listpids`)."""
    # listpids takes the raw id of an array task (squeue's %A), not "<array>_<index>".
    raw = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%A"], capture_output=True, text=True, timeout=30)
    result = subprocess.run(["scontrol", "listpids", raw.stdout.strip()], capture_output=True, text=True, timeout=30)
    for line in result.stdout.splitlines()[1:]:
        pid, _, step = line.split()[:3]
        if step == "batch":  # the batch shell and its srun, whose arguments name submitit too
            continue
        try:
            if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        except OSError:
            continue
    return None


def read_curves(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {
            "train_loss": f["curves/train_loss"][:].tolist(),
            "val_bpb_curve": f["curves/val_bpb"][:].tolist(),
            "val_bpb": float(f["metrics"].attrs["val_bpb"]),
            "requeues": float(f["metrics"].attrs["requeues"]),
            "resumes": float(f["metrics"].attrs["resumes"]),
        }


def assert_same_training(result: dict, expected: dict) -> None:
    assert result["train_loss"] == expected["train_loss"]
    assert result["val_bpb_curve"] == expected["val_bpb_curve"]
    assert result["val_bpb"] == expected["val_bpb"]


def status_counts(workdir: Path, phase: str, env: dict | None = None) -> tuple[dict[str, int], subprocess.CompletedProcess]:
    result = run_cli("status", "--phase", phase, "--workdir", str(workdir), env=env)
    assert result.returncode == 0, result.stderr
    (total,) = [line for line in result.stdout.splitlines() if line.startswith("all ")]
    numbers = total.split()[2:9]
    return dict(zip(("done", "running", "pending", "failed", "timed-out", "diverged", "never-submitted"), map(int, numbers))), result


@pytest.fixture(scope="module")
def long_phase(tmp_path_factory, slurm_cluster):
    """A 2-cell phase of LONG_STEPS steps and its results from an uninterrupted SLURM run."""
    root = tmp_path_factory.mktemp("reference")
    spec = tiny_phase(root / "long.toml", steps=LONG_STEPS, bits=("fp16", "int6"), warmdown=(0.5,))
    workdir = root / "wd"
    slurm_submit(spec, workdir)
    cells = list(load_phase(None, spec).cells)
    try:
        for cell in cells:
            wait_for(lambda: (workdir / "results" / "long" / f"{cell.cell_id}.h5").exists(), what="reference result")
    finally:
        cancel_jobs(workdir, "long")
    expected = {cell.cell_id: read_curves(workdir / "results" / "long" / f"{cell.cell_id}.h5") for cell in cells}
    return spec, cells, expected


@pytest.mark.slurm
def test_usr2_requeues_and_resumes(long_phase, tmp_workdir):
    spec, cells, expected = long_phase
    workdir = tmp_workdir / "wd"
    slurm_submit(spec, workdir)
    entries = latest_entries(workdir, "long")
    target = cells[1]
    job_id = entries[target.cell_id].job_id
    assert job_id.endswith("_1")  # an array task
    checkpoint = workdir / "checkpoints" / "long" / f"{target.cell_id}.pt"
    try:
        wait_for(lambda: checkpoint_step(checkpoint) >= 10, what="first checkpoints")
        # Without --batch, scancel signals the job's steps, where submitit's
        # handler runs; --batch would signal only the batch shell, which USR2 kills.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        wait_for(lambda: job_state(job_id) == "PENDING", what="requeue")
        # A requeued job waits about two minutes (BeginTime); start it now.
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
        for cell in cells:
            wait_for(lambda: (workdir / "results" / "long" / f"{cell.cell_id}.h5").exists(), what="results")
    finally:
        cancel_jobs(workdir, "long")

    result = read_curves(workdir / "results" / "long" / f"{target.cell_id}.h5")
    assert result["requeues"] >= 1
    assert result["resumes"] >= 1
    assert_same_training(result, expected[target.cell_id])
    assert_same_training(read_curves(workdir / "results" / "long" / f"{cells[0].cell_id}.h5"), expected[cells[0].cell_id])
    assert not checkpoint.exists()
    assert latest_entries(workdir, "long")[target.cell_id].attempt == 1  # a requeue is not a resubmission
    log_text = entries[target.cell_id].log_paths()[1].read_text()
    assert "checkpoint at step" in log_text and "before requeue 1" in log_text


@pytest.mark.slurm
def test_sigkill_failed_then_resubmit_resumes(long_phase, tmp_workdir):
    spec, cells, expected = long_phase
    workdir = tmp_workdir / "wd"
    slurm_submit(spec, workdir)
    target = cells[0]
    job_id = latest_entries(workdir, "long")[target.cell_id].job_id
    checkpoint = workdir / "checkpoints" / "long" / f"{target.cell_id}.pt"
    try:
        wait_for(lambda: checkpoint_step(checkpoint) >= 10, what="first checkpoints")
        pid = training_pid(job_id)
        assert pid is not None, f"no training process found for job {job_id}"
        os.kill(pid, 9)
        killed_at = checkpoint_step(checkpoint)

        wait_for(lambda: status_counts(workdir, "long")[0]["failed"] == 1, what="status showing the killed cell failed")
        listing = run_cli("status", "--phase", "long", "--cells", "failed", "--workdir", str(workdir))
        assert f"job {job_id} FAILED, attempt 1" in listing.stdout
        log_path = latest_entries(workdir, "long")[target.cell_id].log_paths()[1]
        assert f"log {log_path}" in listing.stdout and log_path.is_file()

        resubmitted = run_cli(
            "resubmit", "--phase", "long", "--cluster", "slurm", "--checkpoint-minutes", "0.005",
            "--workdir", str(workdir),
        )
        assert resubmitted.returncode == 0, resubmitted.stdout + resubmitted.stderr
        assert "1 to resubmit (1 failed" in resubmitted.stdout
        for cell in cells:
            wait_for(lambda: (workdir / "results" / "long" / f"{cell.cell_id}.h5").exists(), what="results")
    finally:
        cancel_jobs(workdir, "long")

    entry = latest_entries(workdir, "long")[target.cell_id]
    assert entry.attempt == 2 and entry.job_id != job_id
    result = read_curves(workdir / "results" / "long" / f"{target.cell_id}.h5")
    assert result["resumes"] == 1
    assert_same_training(result, expected[target.cell_id])
    assert f"resumed from step {killed_at} of {LONG_STEPS}" in entry.log_paths()[1].read_text()
    assert status_counts(workdir, "long")[0]["done"] == 2


@pytest.mark.slurm
def test_max_array_size_splits_packed_phase(slurm_cluster, tmp_workdir):
    from tests.slurm_cluster import set_max_array_size

    spec = tiny_phase(tmp_workdir / "split.toml", steps=30, bits=("fp16", "int8", "int6"), warmdown=(0.1, 0.5))
    cells = list(load_phase(None, spec).cells)
    workdir = tmp_workdir / "wd"
    try:
        # Only the submission runs under the lowered limit: the cluster is shared.
        with set_max_array_size(2):
            slurm_submit(spec, workdir, "--cells-per-task", "2")
        for cell in cells:
            wait_for(lambda: (workdir / "results" / "split" / f"{cell.cell_id}.h5").exists(), what="results")
    finally:
        cancel_jobs(workdir, "split")

    entries = ledger.read(ledger.path_for(workdir / "results" / "split"))
    assert sorted(e.cell_id for e in entries) == sorted(c.cell_id for c in cells)  # each cell exactly once
    jobs = [e.job_id for e in entries]
    first, second = sorted({e.array_job_id for e in entries}, key=int)
    assert jobs == [f"{first}_0", f"{first}_0", f"{first}_1", f"{first}_1", second, second]
    for cell in cells:
        with h5py.File(workdir / "results" / "split" / f"{cell.cell_id}.h5", "r") as f:
            assert f.attrs["status"] == "done"

    # The script submitit wrote equals the one --dry-run renders.
    (written,) = (workdir / "logs" / "split").rglob(f"{first}_submission.sh")
    chunk = submit.plan(cells, 2, None, 2)[0]
    parameters = submit.sbatch_parameters("split", chunk)
    rendered = submit.render_sbatch(Workdir(workdir).logs("split") / "%j", parameters, len(chunk.tasks))
    assert written.read_text() == rendered


@pytest.fixture
def held_phase(slurm_cluster, tmp_workdir):
    """2 cells done, 1 held in the queue (pending), 1 never submitted; cancels the held task after."""
    spec = tiny_phase(tmp_workdir / "held.toml", steps=20, bits=("fp16", "int6", "int8"), warmdown=(0.5,))
    profile = write_profile(tmp_workdir / "hold.toml", "[sbatch]\nhold = true\n")
    workdir = tmp_workdir / "wd"
    slurm_submit(spec, workdir, "--profile", str(profile))
    cells = list(load_phase(None, spec).cells)
    entries = latest_entries(workdir, "held")
    try:
        subprocess.run(["scontrol", "release", entries[cells[0].cell_id].job_id, entries[cells[1].cell_id].job_id], check=True, timeout=30)
        for cell in cells[:2]:
            wait_for(lambda: (workdir / "results" / "held" / f"{cell.cell_id}.h5").exists(), what="results")
        # A fourth cell joins the manifest but is never submitted.
        (tmp_workdir / "bigger").mkdir()
        bigger = tiny_phase(tmp_workdir / "bigger" / "held.toml", steps=20, bits=("fp16", "int6", "int8", "int4"), warmdown=(0.5,))
        assert run_cli("manifest", "--phase-file", str(bigger), "--workdir", str(workdir)).returncode == 0
        yield workdir
    finally:
        cancel_jobs(workdir, "held")


EXPECTED_HELD = {"done": 2, "running": 0, "pending": 1, "failed": 0, "timed-out": 0, "diverged": 0, "never-submitted": 1}


@pytest.mark.slurm
def test_status_makes_one_sacct_call(held_phase, tmp_workdir):
    wrapper = tmp_workdir / "wrapper"
    wrapper.mkdir()
    calls = tmp_workdir / "sacct-calls.log"
    real = shutil.which("sacct")
    (wrapper / "sacct").write_text(f'#!/bin/bash\necho "$*" >> {calls}\nexec {real} "$@"\n')
    (wrapper / "sacct").chmod(0o755)

    counts, result = status_counts(held_phase, "held", env={"PATH": f"{wrapper}{os.pathsep}{os.environ['PATH']}"})

    assert counts == EXPECTED_HELD
    assert len(calls.read_text().splitlines()) == 1
    assert result.stderr.strip() == ""


@pytest.mark.slurm
def test_status_with_accounting_stopped(held_phase):
    from tests.slurm_cluster import accounting_stopped

    with accounting_stopped():
        counts, result = status_counts(held_phase, "held")

    assert counts == EXPECTED_HELD
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1
    assert "sacct failed" in warnings[0] and "states come from squeue" in warnings[0]


@pytest.mark.slurm
def test_hostile_values_never_run(slurm_cluster, tmp_workdir, monkeypatch):
    cells = tiny_cells(tmp_workdir, name="hostile", steps=20, bits=("fp16",), warmdown=(0.5,))
    marker = tmp_workdir / "pwned"
    workdir = Workdir.open(tmp_workdir / "wd")
    options = RunOptions(workdir=str(workdir.root), checkpoint_every_s=60.0)

    # Rejected by the profile loader, before anything reaches sbatch.
    path = write_profile(tmp_workdir / "p.toml", f'partition = "x; touch {marker}"\n')
    with pytest.raises(UsageError, match="contains characters outside"):
        load_profile(path)

    # Built around the loader: sbatch sees a quoted, unknown partition and rejects it.
    with pytest.raises(UsageError, match="(?i)invalid partition"):
        submit.submit(workdir, cells, "slurm", options, profile=Profile(partition=f"x; touch {marker}"), retry=Retry(2, 0.01))
    assert ledger.read(ledger.path_for(workdir.results("hostile"))) == []

    # Built around the loader, in an option sbatch accepts: the job runs, the text stays text.
    comment = f"x; touch {marker} #"
    accepted = submit.submit(workdir, cells, "slurm", options, profile=Profile(sbatch={"comment": comment}))
    try:
        assert accepted.errors == []
        (job,) = accepted.jobs
        shown = subprocess.run(["scontrol", "show", "job", str(job.job_id)], capture_output=True, text=True, timeout=30)
        assert f"Comment={comment}" in shown.stdout
        wait_for(lambda: workdir.result("hostile", cells[0].cell_id).exists(), what="result")
    finally:
        cancel_jobs(workdir.root, "hostile")
    assert not marker.exists()


@pytest.mark.slurm
def test_sbatch_retry_against_real_sbatch(slurm_cluster, tmp_workdir, monkeypatch, caplog):
    wrapper = tmp_workdir / "wrapper"
    wrapper.mkdir()
    count = tmp_workdir / "count"
    count.write_text("0")
    real = shutil.which("sbatch")
    (wrapper / "sbatch").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        n=$(($(cat {count}) + 1)); echo $n > {count}
        if [ $n -le 2 ]; then
            echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2
            exit 1
        fi
        exec {real} "$@"
    """))
    (wrapper / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper}{os.pathsep}{os.environ['PATH']}")
    caplog.set_level("WARNING", logger="pipeline.submit")
    cells = tiny_cells(tmp_workdir, name="retry", steps=20)
    workdir = Workdir.open(tmp_workdir / "wd")

    submission = submit.submit(
        workdir, cells, "slurm", RunOptions(workdir=str(workdir.root)),
        profile=Profile(sbatch={"hold": True}), retry=Retry(4, 0.05),
    )
    try:
        assert submission.errors == []
        assert count.read_text().strip() == "3"
        assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
        entries = ledger.read(ledger.path_for(workdir.results("retry")))
        assert sorted(e.cell_id for e in entries) == sorted(c.cell_id for c in cells)
        assert job_state(entries[0].job_id) == "PENDING"
    finally:
        cancel_jobs(workdir.root, "retry")
