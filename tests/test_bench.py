"""The benchmark command: its step matches the Trainer, its counters, the page and the CLI.

No test checks a speed: timings belong on the benchmark page, not in tests.
"""

from __future__ import annotations

import math
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from bench import orchestration, page, suite, training
from bench.machine import Machine, PeakSamples, Timing, matmul_flops_per_s, peak_operands
from jobs.train import Trainer
from pipeline.commands import bench as bench_command
from pipeline.errors import UsageError
from tests.helpers import run_cli

SECTION_HEADINGS = [
    "# Benchmarks",
    "## Targets",
    "## 1. Training throughput and MFU",
    "## 2. QAT overhead",
    "## 3. Bookkeeping overhead",
    "## 4. Orchestration at study scale",
    "### collect of 1,345 and 10,000 result files",
    "## Reproduce",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A corpus cache shared by this module's tests, so the embedded corpus is built once."""
    return tmp_path_factory.mktemp("bench-cache")


# ---------------------------------------------------------------------------
# Training helpers
# ---------------------------------------------------------------------------


def test_train_step_matches_trainer_run(cache_dir):
    cell = training.bench_cell("tiny1", "int6", seq_len=32, batch_size=2, steps=5)
    stepped = Trainer(cell, cache_dir=cache_dir, device=torch.device("cpu"))
    for step in range(cell.steps):
        training.train_step(stepped, step)
    reference = Trainer(cell, cache_dir=cache_dir, device=torch.device("cpu"))
    reference.run(checkpoint_path=None)

    assert stepped.step == reference.step == cell.steps
    ours, theirs = stepped.model.state_dict(), reference.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_bench_cell_uses_study_vocabulary():
    small = training.bench_cell("tiny1", "fp16", seq_len=32, batch_size=2, steps=3)
    larger = training.bench_cell("3M", "int4", seq_len=64, batch_size=2, steps=3, probe_every=2)
    assert small.vocab_size == 256
    assert larger.vocab_size == training.STUDY_VOCAB_SIZE
    assert larger.bits == "int4"
    assert larger.probe_every == 2
    assert larger.warmdown == 0.0


def test_muon_flops_tiny1(cache_dir):
    cell = training.bench_cell("tiny1", "fp16", seq_len=32, batch_size=2, steps=3)
    trainer = Trainer(cell, cache_dir=cache_dir, device=torch.device("cpu"))
    # tiny1: 2 layers of n_embd 64. Per layer four 64x64 attention matrices and
    # the MLP's 256x64 and 64x256, each turned to 64 rows by 256 columns.
    # Newton-Schulz, 5 iterations: 4 m^2 n + 2 m^3 FLOPs each.
    square = 5 * (4 * 64**2 * 64 + 2 * 64**3)
    wide = 5 * (4 * 64**2 * 256 + 2 * 64**3)
    assert training.muon_flops_per_step(trainer) == 2 * (4 * square + 2 * wide)


def test_muon_flops_zero_for_adamw(cache_dir):
    cell = training.bench_cell("tiny1", "fp16", seq_len=32, batch_size=2, steps=3).replace(optimizer="adamw")
    trainer = Trainer(cell, cache_dir=cache_dir, device=torch.device("cpu"))
    assert training.muon_flops_per_step(trainer) == 0.0


def test_plan_steps_cover_every_timed_step():
    for device, quick in ((torch.device("cpu"), False), (torch.device("cpu"), True), (torch.device("cuda"), False)):
        plan = training.plan_for(device, quick)
        assert plan.throughput_sizes
        assert plan.bookkeeping_probe_every < plan.bookkeeping_steps
        assert plan.rounds >= 1
        assert plan.steps_per_round >= 1


def test_matmul_peak_positive():
    a, b = peak_operands(torch.device("cpu"), size=64)
    assert a.dtype == torch.float32
    flops = matmul_flops_per_s(a, b, repeats=2)
    assert math.isfinite(flops)
    assert flops > 0


def test_matmul_peak_rejects_zero_repeats():
    a, b = peak_operands(torch.device("cpu"), size=8)
    with pytest.raises(ValueError, match="repeats"):
        matmul_flops_per_s(a, b, repeats=0)


def test_profile_step_shares(cache_dir):
    cell = training.bench_cell("tiny1", "fp16", seq_len=32, batch_size=2, steps=3)
    trainer = Trainer(cell, cache_dir=cache_dir, device=torch.device("cpu"))
    matmul, others = training.profile_step(trainer, top=3)
    assert 0.0 < matmul < 1.0
    assert len(others) == 3
    assert all(name.startswith("aten::") for name, _ in others)
    assert matmul + sum(share for _, share in others) <= 1.0 + 1e-9


def test_bookkeeping_estimate_formula():
    result = training.BookkeepingResult(
        size="3M", n_params=1, steps=10, tokens_per_step=8, probe_every=2, aggressive_checkpoint_s=5.0,
        probe_s=[0.01, 0.03, 0.02], save_s=[0.5], energy_start_s=[0.1], energy_stop_s=[0.2],
        first_energy_start_s=1.5,
    )
    expected = (100 * 0.02 + 3600 / 600 * 0.5 + 1.5 + 0.2) / 3600
    assert result.estimated_overhead(3600.0, 600.0, 100) == pytest.approx(expected)


# ---------------------------------------------------------------------------
# Scheduler call counting (fake commands only; the real cluster is below)
# ---------------------------------------------------------------------------


def _fake_scheduler(folder: Path) -> Path:
    """Write fake sbatch/sacct/squeue/scancel that record their arguments; return their folder."""
    folder.mkdir()
    for name in orchestration.COUNTED_COMMANDS:
        script = folder / name
        reply = 'echo "Submitted batch job 4242"' if name == "sbatch" else "true"
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{folder}/{name}.args"\n{reply}\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def test_wrappers_count_and_hold(tmp_path, monkeypatch):
    fake = _fake_scheduler(tmp_path / "fake")
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "calls.log"
    real = orchestration.write_wrappers(tmp_path / "wrappers", log, hold=True)
    assert real["sbatch"] == str(fake / "sbatch")

    wrappers = tmp_path / "wrappers"
    submitted = subprocess.run([str(wrappers / "sbatch"), "job.sh"], capture_output=True, text=True, check=True)
    subprocess.run([str(wrappers / "sacct"), "-j", "4242"], check=True)
    subprocess.run([str(wrappers / "sacct"), "-j", "4243"], check=True)

    assert "Submitted batch job 4242" in submitted.stdout
    assert (fake / "sbatch.args").read_text().split() == ["--hold", "job.sh"]
    counts = orchestration.count_calls(log)
    assert counts == {"sbatch": 1, "sacct": 2, "squeue": 0, "scancel": 0}
    assert orchestration.submitted_job_ids(log) == ["4242"]


def test_wrappers_need_every_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--skip-slurm"):
        orchestration.write_wrappers(tmp_path / "wrappers", tmp_path / "calls.log")


def test_count_calls_missing_log(tmp_path):
    assert orchestration.count_calls(tmp_path / "none.log") == dict.fromkeys(orchestration.COUNTED_COMMANDS, 0)
    assert orchestration.submitted_job_ids(tmp_path / "none.log") == []


def test_synthetic_phases_when_spec_fails(tmp_path, monkeypatch):
    import pipeline.phases as phases

    original = phases.load_phase

    def failing(phase=None, phase_file=None, **kwargs):
        if phase == "2":
            raise UsageError("unknown phase '2'")
        return original(phase, phase_file, **kwargs)

    monkeypatch.setattr(phases, "load_phase", failing)
    arguments, counts, reason = orchestration.resolve_phases(("2", "5"), tmp_path / "specs")
    assert "unknown phase '2'" in reason
    assert counts == {"synthetic-2": 720, "synthetic-5": 625}
    assert arguments["synthetic-2"][0] == "--phase-file"
    assert Path(arguments["synthetic-5"][1]).is_file()


def test_stand_in_data_passes_check(tmp_path, monkeypatch):
    from jobs.data import DATA_ROOT_ENV, check_data

    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    env, note = orchestration.data_environment({"2": ["--phase", "2"]}, tmp_path)
    assert set(env) == {DATA_ROOT_ENV}
    assert "stand-in" in note
    monkeypatch.setenv(DATA_ROOT_ENV, env[DATA_ROOT_ENV])
    check_data("fineweb10B_sp1024", vocab_size=1024)


def test_no_data_check_for_stdlib(tmp_path):
    assert orchestration.data_environment({"micro": ["--phase", "micro"]}, tmp_path) == ({}, "")


def test_packaged_phases_resolve(tmp_path):
    arguments, counts, reason = orchestration.resolve_phases(("micro",), tmp_path)
    assert reason == ""
    assert arguments == {"micro": ["--phase", "micro"]}
    assert counts["micro"] > 0


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------


def _results(tmp_path: Path, device: str = "cpu", mfu_step_s: float = 0.5) -> suite.BenchResults:
    """Build results by hand: 2 rounds everywhere, numbers chosen so each target's verdict is known."""
    machine = Machine(
        cpu_model="Test CPU", logical_cpus=2, usable_cpus=2, torch_threads=2, ram_gib=8.0, gpu="",
        torch_version="2.13.0", python_version="3.11.7", system="Linux 6", git_commit="abc123",
        started_utc="2026-01-01T00:00:00+00:00", load_average=(1.0, 1.0, 1.0),
    )
    options = suite.BenchOptions(out=tmp_path / "B.md", device=device)
    results = suite.BenchResults(
        options=options, command="python -m pipeline bench", machine=machine,
        plan=training.plan_for(torch.device("cpu"), False), wall_s=60.0, load_average_end=(2.0, 1.0, 1.0),
    )
    # 5M at 4,096 tokens: 1e8 FLOPs/token x 4096 tokens / 0.5 s = 819 GFLOP/s vs a 1,000 GFLOP/s peak.
    results.throughput = [
        training.ThroughputResult(
            size="5M", n_params=4_980_736, n_layer=6, n_embd=256, vocab_size=1024, seq_len=256, batch_size=16,
            flops_per_token=1e8, optimizer_flops_per_step=3e10, step_s=[mfu_step_s, mfu_step_s],
            peak=PeakSamples(size=2048, dtype="float32", flops_per_s=[1e12, 1e12]),
            forward_s=0.1, backward_s=0.25, optimizer_s=0.15, matmul_share=0.6,
            top_other_ops=[("aten::mul", 0.1), ("aten::copy_", 0.05)],
        )
    ]
    results.qat = [
        training.QatResult(
            size="5M", n_params=4_980_736, tokens_per_step=4096,
            step_s={"fp16": [1.0, 1.0], "int8": [1.01, 1.03], "int6": [1.02, 1.02], "int4": [1.10, 1.10]},
            cpu_s={"fp16": [2.0, 2.0], "int8": [2.0, 2.0], "int6": [2.0, 2.0], "int4": [2.1, 2.1]},
            fake_quantize_s={"int8": 0.003, "int6": 0.003, "int4": 0.003}, quantized_weights=4_718_592,
        )
    ]
    arms = {"bare": [10.0, 10.0], "realistic": [10.1, 10.1], "aggressive": [10.5, 10.5]}
    results.bookkeeping = training.BookkeepingResult(
        size="3M", n_params=2_850_816, steps=90, tokens_per_step=2048, probe_every=30, aggressive_checkpoint_s=5.0,
        run={arm: [Timing(w, w) for w in walls] for arm, walls in arms.items()},
        probes={"bare": [1, 1], "realistic": [3, 3], "aggressive": [3, 3]},
        saves={"bare": [0, 0], "realistic": [1, 1], "aggressive": [3, 3]},
        probe_s=[0.01], save_s=[0.2], snapshot_s=[0.01], energy_start_s=[0.01], energy_stop_s=[0.01],
        first_energy_start_s=1.4, energy_sources="codecarbon", checkpoint_bytes=2**20,
    )
    timing = orchestration.CommandTiming
    result = orchestration.OrchestrationResult(
        phases=("2", "5"), phase_args={"2": ["--phase", "2"], "5": ["--phase", "5"]}, cells={"2": 720, "5": 625},
        repeats=2, status_available=True,
        baselines=[timing("interpreter start and the CLI's parser", "python -m pipeline --help", 0, [0.05, 0.06])],
        commands=[
            timing("manifest --phase 2", "python -m pipeline manifest --phase 2", 720, [1.5, 1.6]),
            timing("manifest --phase 5", "python -m pipeline manifest --phase 5", 625, [1.5, 1.6]),
            timing("submit --phase 2 --dry-run", "python -m pipeline submit --phase 2 --dry-run", 720, [2.0, 2.1]),
            timing("submit --phase 5 --dry-run", "python -m pipeline submit --phase 5 --dry-run", 625, [2.0, 2.1]),
        ],
        slurm=orchestration.SlurmSubmission(
            max_array_size=1001,
            submit=[timing("submit --phase 2 (real, held jobs)", "x", 720, [2.0], {"sbatch": 1}),
                    timing("submit --phase 5 (real, held jobs)", "x", 625, [2.0], {"sbatch": 1})],
            status=[timing("status --phase 2", "y", 720, [1.0], {"sacct": 1}),
                    timing("status --phase 5", "y", 625, [1.0], {"sacct": 2})],
            expected_chunks={"2": 1, "5": 1}, job_ids=["11", "12"], cancel_s=0.1,
            states_after_cancel={"CANCELLED": 2}, started_tasks=0, queued_after_cancel=0,
        ),
        collect=orchestration.CollectSection(
            command="python bench/collect.py", seconds=60.0,
            markdown="| files | measurement | wall s (median) |\n| --- | --- | --- |\n"
            "| 1,345 | `python -m pipeline collect` cold, --jobs 1 | 3.10 |\n"
            "| 1,345 | `python -m pipeline collect` cold, --jobs 2 | 2.50 |",
        ),
    )
    results.orchestration = result
    return results


def _verdict(text: str, target_prefix: str) -> str:
    for line in text.splitlines():
        if line.startswith(f"| {target_prefix}"):
            return line.rsplit("|", 2)[-2].strip()
    raise AssertionError(f"no target row starting with {target_prefix!r}")


def test_page_has_every_section(tmp_path):
    text = page.render(_results(tmp_path))
    for heading in SECTION_HEADINGS:
        assert heading in text.splitlines(), heading
    assert text.startswith(page.MARKER)
    assert "GPU figures not yet measured: no GPU was available" in text
    assert "6 N + 12 n_layer n_embd seq_len" in text


def test_page_verdicts(tmp_path):
    text = page.render(_results(tmp_path))
    # MFU: 1e8 x 4096 / 0.5 s / 1e12 = 81.9%.
    assert "81.9%" in text
    assert _verdict(text, "MFU at least 50%") == "met"
    # int4: wall 1.10 / 1.00, CPU 2.1 / 2.0 = 1.05.
    assert _verdict(text, "QAT step time") == "missed in wall time, met in CPU time"
    assert "worst median 1.100x in wall time (int4 at 5M), 1.050x in CPU time (int4 at 5M)" in text
    assert _verdict(text, "bookkeeping") == "met (default interval, measured)"
    assert _verdict(text, "one `sbatch` per array chunk") == "met"
    assert _verdict(text, "one `sacct` per `status`") == "missed"
    assert _verdict(text, "`manifest` under 5 s") == "met"
    assert _verdict(text, "`collect` under 5 s") == "met"
    # The faster of the two cold CLI rows at 1,345 files.
    assert "2.50 s (`python -m pipeline collect`, cold, median)" in text


@pytest.mark.parametrize(
    "wall, cpu, verdict",
    [(1.05, 1.20, "met"), (1.06, 1.05, "missed in wall time, met in CPU time"), (1.06, 1.06, "missed")],
)
def test_qat_verdict_cases(wall, cpu, verdict):
    assert page._qat_verdict(wall, cpu) == verdict


def test_page_compares_with_study(tmp_path):
    results = _results(tmp_path)
    results.study = {"min_step": 65_536, "max_step": 262_144, "probe_5m": 983_040}
    text = page.render(results)
    # 65,536 / 4,096 = 16 and 262,144 / 4,096 = 64; 983,040 / (30 x 2,048) = 16.
    assert "65,536 to 262,144 tokens, 16 to 64 times more" in text
    assert "16 times more often in tokens than the densest probing" in text


def test_study_tokens_from_phase_specs():
    study = training.study_tokens()
    assert 0 < study["min_step"] <= study["max_step"]
    assert study["probe_5m"] > 0


def test_page_mfu_shortfall(tmp_path):
    text = page.render(_results(tmp_path, mfu_step_s=2.0))
    # 1e8 x 4096 / 2 s / 1e12 = 20.5%, 30 points short of 50%.
    assert _verdict(text, "MFU at least 50%") == "missed: 30 points short"
    assert "Where the time goes" in text


def test_page_section_not_run_and_failed(tmp_path):
    results = _results(tmp_path)
    results.qat = None
    results.bookkeeping = None
    results.errors["bookkeeping"] = "RuntimeError: disk full"
    results.options = suite.BenchOptions(out=tmp_path / "B.md", sections=("throughput", "orchestration"))
    text = page.render(results)
    assert "Not run in this invocation (`--only throughput,orchestration`)." in text
    assert "**Failed in this run:** RuntimeError: disk full" in text


HANDWRITTEN = """# Benchmarks

Numbers from the collect script.

## collect at 1,345 and 10,000 files

| files | wall s |
| --- | --- |
| 1,345 | 2.0 |

## Memory use

Peak RSS 1 GiB.
"""


def test_carry_keeps_foreign_page():
    carried = page.carried_sections(HANDWRITTEN)
    assert carried[0] == "Numbers from the collect script."
    assert "### collect at 1,345 and 10,000 files" in carried
    assert "| 1,345 | 2.0 |" in carried
    assert "### Memory use" in carried
    assert "Peak RSS 1 GiB." in carried
    assert "# Benchmarks" not in carried


def test_carry_empty_page():
    assert page.carried_sections("") == []


def test_regeneration_carries_once(tmp_path):
    results = _results(tmp_path)
    first = page.render(results, HANDWRITTEN)
    second = page.render(results, first)
    assert first.count("Peak RSS 1 GiB.") == 1
    assert second.count("Peak RSS 1 GiB.") == 1
    assert second.count("| 1,345 | 2.0 |") == 1
    assert second.count(page.HEADINGS["carried"]) == 1
    assert second == first


def test_regeneration_keeps_added_section(tmp_path):
    results = _results(tmp_path)
    edited = page.render(results, HANDWRITTEN).replace(
        page.HEADINGS["reproduce"], "## Disk use\n\nResults take 2 GiB.\n\n" + page.HEADINGS["reproduce"]
    )
    again = page.render(results, edited)
    assert "### Disk use" in again
    assert again.count("Results take 2 GiB.") == 1
    assert again.count("Peak RSS 1 GiB.") == 1


def test_fenced_heading_not_split():
    preamble, sections = page.split_sections("intro\n```\n## not a heading\n```\n## real\nbody\n")
    assert preamble == ["intro", "```", "## not a heading", "```"]
    assert [heading for heading, _ in sections] == ["## real"]


def test_write_page_atomic(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("old\n")
    page.write_page(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["B.md"]


# ---------------------------------------------------------------------------
# Options and the command line
# ---------------------------------------------------------------------------


def test_cli_sections_match_suite():
    assert bench_command.SECTIONS == suite.SECTIONS


def test_parse_sections_order_and_errors():
    assert bench_command.parse_sections("orchestration, qat") == ("qat", "orchestration")
    assert bench_command.parse_sections(None) == suite.SECTIONS
    with pytest.raises(UsageError, match="invalid --only 'speed'"):
        bench_command.parse_sections("speed")
    with pytest.raises(UsageError, match="invalid --only ','"):
        bench_command.parse_sections(",")


def test_bench_options_validate(tmp_path):
    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        suite.BenchOptions(out=tmp_path / "B.md", device="tpu")
    with pytest.raises(ValueError, match="invalid sections"):
        suite.BenchOptions(out=tmp_path / "B.md", sections=("nothing",))
    with pytest.raises(ValueError, match="invalid repeats 0"):
        suite.BenchOptions(out=tmp_path / "B.md", repeats=0)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--only", "speed"], "invalid --only 'speed'"),
        (["--repeats", "0"], "invalid --repeats 0"),
        (["--out", "/nonexistent-folder/B.md"], "/nonexistent-folder"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, args, needle):
    result = run_cli("bench", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_cuda_without_gpu(tmp_path):
    result = run_cli("bench", "--device", "cuda", "--out", str(tmp_path / "B.md"))
    assert result.returncode == 2
    assert "torch finds no CUDA device" in result.stderr
    assert not (tmp_path / "B.md").exists()


@pytest.mark.slow
def test_quick_mode_writes_page(tmp_path):
    out = tmp_path / "B.md"
    out.write_text(HANDWRITTEN)
    result = run_cli("bench", "--quick", "--skip-slurm", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for heading in SECTION_HEADINGS:
        assert heading in text.splitlines(), heading
    assert "Failed in this run" not in text
    assert "Not measured: --skip-slurm was given." in text
    assert "Peak RSS 1 GiB." in text  # the old page's own section is carried over
    assert "| 20 |" in text  # the collect benchmark ran at 20 files


# ---------------------------------------------------------------------------
# The real SLURM test cluster
# ---------------------------------------------------------------------------


@pytest.mark.slurm
def test_held_submission_cancelled(slurm_cluster, tmp_workdir):
    spec = tmp_workdir / "held.toml"
    spec.write_text(
        '[settings]\nseq_len = 32\nbatch_size = 2\nsteps = 4\nmatrix_lr = 0.02\nadam_lr = 0.008\n'
        'val_tokens = 64\nevals = 1\n\n[[block]]\nname = "main"\n[block.factors]\n'
        'bits = ["fp16", "int8"]\nwarmdown = [0.1]\nsize = ["tiny1"]\nseed = [0]\n'
    )
    result = orchestration.OrchestrationResult(
        phases=("held",), phase_args={"held": ["--phase-file", str(spec)]}, cells={"held": 2},
        status_available=orchestration.status_command_available(),
    )
    submission = orchestration.submit_to_slurm(result, tmp_workdir / "wd", tmp_workdir / "bench", lambda _: None)

    assert [t.calls["sbatch"] for t in submission.submit] == [1]
    assert submission.expected_chunks == {"held": 1}
    assert len(submission.job_ids) == 1
    assert submission.queued_after_cancel == 0
    assert submission.started_tasks == 0
    assert set(submission.states_after_cancel) <= {"CANCELLED"}
    assert not list((tmp_workdir / "wd" / "results").rglob("*.h5"))
    if result.status_available:
        assert len(submission.status) == 1


def test_expected_chunks_per_size():
    # Phase 2: 720 cells over 4 sizes, 180 per size.
    assert orchestration.expected_chunks(["--phase", "2"], 1001) == 4
    assert orchestration.expected_chunks(["--phase", "2"], 100) == 8
    assert orchestration.expected_chunks(["--phase", "2"], 180) == 4
