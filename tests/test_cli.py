"""Bad input at the command line: one line, exit status 2, nothing written."""

import pytest

from tests.helpers import run_cli, tiny_phase


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["manifest", "--phase", "nope"], "unknown phase 'nope'"),
        (["submit", "--phase", "nope"], "unknown phase 'nope'"),
        (["manifest", "--phase", "micro", "--data", "/nonexistent/corpus"], "/nonexistent/corpus"),
        (["submit", "--phase", "micro", "--data", "/nonexistent/corpus", "--dry-run"], "/nonexistent/corpus"),
        (["manifest", "--phase", "micro", "--size-override", "huge"], "huge"),
        (["submit", "--phase", "micro", "--cells-per-task", "0"], "--cells-per-task"),
        (["manifest"], "--phase"),
        (["collect", "--phase", "nothing-here"], "nothing-here"),
        (["analyze", "--phase", "micro"], "collect --phase micro"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    result = run_cli(*args, "--workdir", str(tmp_path / "wd"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "wd" / "manifests").exists()
    assert not (tmp_path / "wd" / "results").exists()


def test_empty_data_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("manifest", "--phase", "micro", "--data", str(tmp_path / "empty"), "--workdir", str(tmp_path / "wd"))
    assert result.returncode == 2
    assert str(tmp_path / "empty") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "wd" / "manifests").exists()


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("manifest", "--phase", "micro", "--workdir", str(blocker / "sub"))
    assert result.returncode == 2
    assert str(blocker / "sub") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_manifest_twice_byte_identical(tmp_path):
    run_cli("manifest", "--phase", "micro", "--workdir", str(tmp_path))
    first = (tmp_path / "manifests" / "micro.csv").read_bytes()
    result = run_cli("manifest", "--phase", "micro", "--workdir", str(tmp_path))
    assert result.returncode == 0
    assert (tmp_path / "manifests" / "micro.csv").read_bytes() == first
    assert first.count(b"\n") == 37


def test_dry_run_writes_nothing(tmp_path):
    spec = tiny_phase(tmp_path / "tiny.toml")
    result = run_cli("submit", "--phase-file", str(spec), "--dry-run", "--workdir", str(tmp_path / "wd"))
    assert result.returncode == 0, result.stderr
    assert "4 to submit" in result.stdout
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("margin", ["0", "-1", "nan", "inf", "abc"])
def test_bad_margin_one_line(tmp_path, margin):
    result = run_cli("analyze", "--phase", "micro", "--margin", margin, "--workdir", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--margin" in lines[0]


def test_dry_run_into_closed_pipe(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    command = f"{sys.executable} -m pipeline submit --phase 2 --dry-run --workdir {tmp_path} | head -1"
    result = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr
