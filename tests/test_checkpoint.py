"""Checkpoints: a cell stopped anywhere and resumed ends bit-identical to an uninterrupted run (CPU).

The in-process tests stop a run by raising at a chosen point. The slow tests
kill a subprocess with SIGKILL, so nothing is flushed or cleaned up, and then
a second subprocess resumes. Every comparison of losses and val_bpb uses `==`.
On CUDA, kernels are not bitwise deterministic; there the target is a final
val_bpb within 1e-3, which these CPU tests do not check.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from jobs import train as train_module
from jobs.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from jobs.run import CellTask, RunOptions
from jobs.train import Trainer, signals_deferred
from pipeline import manifest
from pipeline.phases import load_phase
from tests.helpers import REPO, tiny_phase

STEPS = 12


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """A tiny int6 cell whose warmdown starts mid-run, so its probe runs inside the loop."""
    spec = tiny_phase(tmp_path_factory.mktemp("spec") / "ckpt.toml", steps=STEPS, bits=("int6",), warmdown=(0.5,))
    return load_phase(None, spec).cells[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(cell, cache):
    """The uninterrupted run, with one thread like every run it is compared with."""
    with one_thread():
        return Trainer(cell, cache_dir=cache).run()


class one_thread:
    """Run torch with one thread inside the block; summation order then matches across runs."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


class Stop(Exception):
    """Raised inside a run to stop it the way a crash would, without saving."""


def assert_same_run(result, reference):
    assert result.curves["train_loss"].tolist() == reference.curves["train_loss"].tolist()
    assert result.curves["lr"].tolist() == reference.curves["lr"].tolist()
    assert result.curves["val_step"].tolist() == reference.curves["val_step"].tolist()
    assert result.curves["val_bpb"].tolist() == reference.curves["val_bpb"].tolist()
    assert result.probe["step"].tolist() == reference.probe["step"].tolist()
    assert result.probe["int6"].tolist() == reference.probe["int6"].tolist()
    for key in ("val_bpb", "val_loss", "roundtrip_val_bpb", "roundtrip_int8_embed_val_bpb", "probe_int6", "train_loss_final"):
        assert result.metrics[key] == reference.metrics[key], key


def stop_at_step(monkeypatch, stop_step: int) -> None:
    get_batch = train_module.data_lib.get_batch

    def get_batch_or_stop(tokens, batch_size, seq_len, seed, step, device):
        if step == stop_step:
            raise Stop(step)
        return get_batch(tokens, batch_size, seq_len, seed, step, device)

    monkeypatch.setattr(train_module.data_lib, "get_batch", get_batch_or_stop)


# ---------------------------------------------------------------- in process


@pytest.mark.parametrize("stop_step", [1, 5, 6, STEPS - 1])
def test_resume_after_stop_is_identical(cell, cache, reference, tmp_path, monkeypatch, stop_step):
    # Step 6 is the warmdown start, where the probe runs before the step.
    path = tmp_path / "cell.pt"
    with one_thread():
        stop_at_step(monkeypatch, stop_step)
        with pytest.raises(Stop):
            Trainer(cell, cache_dir=cache).run(path, checkpoint_every_s=0.0)
        monkeypatch.undo()

        trainer = Trainer(cell, cache_dir=cache)
        assert trainer.resume(path)
        assert trainer.step == stop_step
        result = trainer.run(path, checkpoint_every_s=0.0)

    assert_same_run(result, reference)
    assert result.metrics["resumes"] == 1.0
    assert result.metrics["requeues"] == 0.0


def test_resume_from_loop_end_redoes_final_evaluations(cell, cache, reference, tmp_path, monkeypatch):
    path = tmp_path / "cell.pt"
    calls = []

    def roundtrip_then_stop(self):
        calls.append(self.step)
        raise Stop("final")

    with one_thread():
        monkeypatch.setattr(Trainer, "_roundtrip_and_ptq", roundtrip_then_stop)
        with pytest.raises(Stop):
            Trainer(cell, cache_dir=cache).run(path, checkpoint_every_s=3600.0)
        monkeypatch.undo()

        trainer = Trainer(cell, cache_dir=cache)
        assert trainer.resume(path)
        result = trainer.run(path, checkpoint_every_s=3600.0)

    assert calls == [STEPS]
    assert trainer.step == STEPS
    assert_same_run(result, reference)


def test_checkpoint_during_roundtrip_saves_trained_weights(cell, cache, reference, tmp_path, monkeypatch):
    # A USR2 handler may run while the exported int6 weights are loaded; the
    # checkpoint it writes must still hold the trained weights.
    path = tmp_path / "cell.pt"
    evaluate = Trainer.evaluate
    evaluations = []

    def evaluate_and_checkpoint(self):
        evaluations.append(self.step)
        if len(evaluations) == 3:  # the final val_bpb, then the first round-trip evaluation
            self.save(path)
            raise Stop("requeued")
        return evaluate(self)

    with one_thread():
        monkeypatch.setattr(Trainer, "evaluate", evaluate_and_checkpoint)
        with pytest.raises(Stop):
            Trainer(cell, cache_dir=cache).run()
        monkeypatch.undo()

        trainer = Trainer(cell, cache_dir=cache)
        assert trainer.resume(path)
        result = trainer.run(path, checkpoint_every_s=3600.0)

    assert_same_run(result, reference)
    assert result.curves["val_step"].tolist().count(STEPS) == 1


def test_checkpoint_after_warmdown_probe_is_not_probed_twice(cell, cache, reference, tmp_path, monkeypatch):
    path = tmp_path / "cell.pt"
    probe = Trainer.probe

    def probe_and_checkpoint(self):
        probe(self)
        self.save(path)
        raise Stop("after probe")

    with one_thread():
        monkeypatch.setattr(Trainer, "probe", probe_and_checkpoint)
        with pytest.raises(Stop):
            Trainer(cell, cache_dir=cache).run()
        monkeypatch.undo()

        trainer = Trainer(cell, cache_dir=cache)
        assert trainer.resume(path)
        assert trainer.step == trainer.warmdown_step
        result = trainer.run()

    assert result.probe["step"].tolist() == [trainer.warmdown_step]
    assert_same_run(result, reference)


def test_checkpoint_contents(cell, cache, tmp_path):
    path = tmp_path / "cell.pt"
    with one_thread():
        trainer = Trainer(cell, cache_dir=cache)
        trainer.energy_hook = lambda: {"energy_kwh_modelled": 0.25, "duration_s": 3.0}
        trainer.requeues = 2
        trainer.save(path)
    state = torch.load(path, weights_only=True)

    assert state["format"] == train_module.CHECKPOINT_FORMAT
    assert state["cell"]["cell_id"] == cell.cell_id
    assert state["step"] == 0
    assert state["requeues"] == 2
    assert state["energy"] == {"energy_kwh_modelled": 0.25, "duration_s": 3.0}
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["data_fingerprint"] == trainer.corpus.fingerprint
    assert len(state["optimizers"]) == len(trainer.optimizers)


def test_resume_restores_rng_states(cell, cache, tmp_path):
    import random

    path = tmp_path / "cell.pt"
    with one_thread():
        trainer = Trainer(cell, cache_dir=cache)
        random.seed(11)
        np.random.seed(12)
        torch.manual_seed(13)
        trainer.save(path)
        expected = (random.random(), np.random.random(), torch.rand(1).item())

        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        Trainer(cell, cache_dir=cache).resume(path)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def test_resume_rejects_other_data(cell, cache, tmp_path):
    path = tmp_path / "cell.pt"
    trainer = Trainer(cell, cache_dir=cache)
    state = trainer.state_dict()
    state["data_fingerprint"] = "0000feedbeef"
    save_checkpoint(path, state)

    with pytest.raises(ValueError, match="0000feedbeef.*delete the checkpoint"):
        Trainer(cell, cache_dir=cache).resume(path)


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pt"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"step": 3, "payload": Payload()}, path)

    assert load_checkpoint(path) is None
    assert not marker.exists()


def test_load_checkpoint_of_torn_file(tmp_path):
    path = tmp_path / "torn.pt"
    save_checkpoint(path, {"step": torch.tensor(4)})
    path.write_bytes(path.read_bytes()[:20])

    assert load_checkpoint(path) is None
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_remove_stale_temporaries(tmp_path):
    path = tmp_path / "cell.pt"
    (tmp_path / ".cell.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"partial")
    path.write_bytes(b"kept")

    assert remove_stale_temporaries(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc123.tmp", "cell.pt"]


# ---------------------------------------------------------------- USR2 deferral


def test_signal_waits_for_deferred_block():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(1000):  # many bytecodes: a pending handler would run here
                pass
            inside = list(seen)
        after = list(seen)
    finally:
        signal.signal(signal.SIGUSR2, previous)

    assert inside == []
    assert after == [signal.SIGUSR2]


def test_signal_to_other_thread_waits():
    # The kernel may hand a process-wide USR2 to any thread (codecarbon runs one);
    # Python still runs the handler in the main thread, and it must wait too.
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        with signals_deferred():
            with signals_deferred():  # nested: only the outermost block releases
                signal.pthread_kill(worker.ident, signal.SIGUSR2)
                time.sleep(0.05)
            inner = list(seen)
            time.sleep(0.05)
            inside = list(seen)
        after = list(seen)
    finally:
        release.set()
        worker.join()
        handler = signal.signal(signal.SIGUSR2, previous)

    assert inner == []
    assert inside == []
    assert after == [signal.SIGUSR2]
    assert handler is not None and handler != signal.SIG_DFL  # the test's handler came back


def test_deferral_without_signal_calls_nothing():
    seen = []
    handler = lambda signum, frame: seen.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        with signals_deferred():
            pass
        restored = signal.getsignal(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == []
    assert restored is handler


# ---------------------------------------------------------------- CellTask and USR2


def test_usr2_checkpoints_and_requeues(cell, cache, reference, tmp_path, monkeypatch):
    """A USR2 inside a step: the step finishes, checkpoint() saves, the requeued task resumes."""
    workdir = tmp_path / "wd"
    monkeypatch.setenv("QAT_CPUS_PER_TASK", "1")
    monkeypatch.setenv("QAT_ENERGY_INTERVAL_S", "3600")
    options = RunOptions(workdir=str(workdir), checkpoint_every_s=3600.0)
    task = CellTask(options)
    requeued = []

    def submitit_like_handler(signum, frame):
        requeued.append(task.checkpoint([cell]))
        raise SystemExit(-1)

    set_lr = train_module.set_lr

    def set_lr_and_signal(optimizers, multiplier):
        if task._trainer is not None and task._trainer.step == 4:
            os.kill(os.getpid(), signal.SIGUSR2)
        set_lr(optimizers, multiplier)

    previous = signal.signal(signal.SIGUSR2, submitit_like_handler)
    try:
        monkeypatch.setattr(train_module, "set_lr", set_lr_and_signal)
        with pytest.raises(SystemExit):
            task([cell])
        monkeypatch.setattr(train_module, "set_lr", set_lr)
    finally:
        signal.signal(signal.SIGUSR2, previous)

    checkpoint = workdir / "checkpoints" / cell.phase / f"{cell.cell_id}.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 5  # the step that was running when USR2 came finished first
    assert state["requeues"] == 1

    (delayed,) = requeued
    assert delayed.args == ([cell],)
    assert delayed.function([cell]) == ["done"]
    assert not checkpoint.exists()

    with h5py.File(workdir / "results" / cell.phase / f"{cell.cell_id}.h5", "r") as f:
        assert f["metrics"].attrs["requeues"] == 1
        assert f["metrics"].attrs["resumes"] == 1
        assert f["curves/train_loss"][:].tolist() == reference.curves["train_loss"].tolist()
        assert f["metrics"].attrs["val_bpb"] == reference.metrics["val_bpb"]


def test_checkpoint_without_running_cell_only_requeues(cell, tmp_path):
    task = CellTask(RunOptions(workdir=str(tmp_path)))
    delayed = task.checkpoint([cell])

    assert delayed.args == ([cell],)
    assert isinstance(delayed.function, CellTask)
    assert not (tmp_path / "checkpoints").exists()
    pickle.dumps(delayed.function)  # submitit pickles it for the requeued job


def test_finished_cell_removes_leftover_checkpoint(cell, tmp_path):
    workdir = tmp_path / "wd"
    result = workdir / "results" / cell.phase / f"{cell.cell_id}.h5"
    checkpoint = workdir / "checkpoints" / cell.phase / f"{cell.cell_id}.pt"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"left by a late USR2")

    assert CellTask(RunOptions(workdir=str(workdir), keep_checkpoint=True)).run_cell(cell) == "skipped"
    assert checkpoint.exists()
    assert CellTask(RunOptions(workdir=str(workdir))).run_cell(cell) == "skipped"
    assert not checkpoint.exists()


# ---------------------------------------------------------------- SIGKILL in a subprocess

KILLED_RUN = r"""
import json, os, signal, sys
from pathlib import Path

import torch

from jobs import train
from jobs.run import CellTask, RunOptions
from pipeline import manifest

args = json.loads(sys.argv[1])
cell = manifest.read(Path(args["manifest"]))[0]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


get_batch = train.data_lib.get_batch


def get_batch_or_die(tokens, batch_size, seq_len, seed, step, device):
    if step == args["kill_step"]:
        die()
    return get_batch(tokens, batch_size, seq_len, seed, step, device)


train.data_lib.get_batch = get_batch_or_die

save = train.Trainer.save


def save_every_k(self, path):
    if self.step % args["save_every"] == 0 or self.step == self.cell.steps:
        save(self, path)


train.Trainer.save = save_every_k

torch_save = torch.save
saves = []


def torch_save_or_die(obj, handle, *rest, **options):
    saves.append(1)
    if len(saves) == args["kill_in_save"]:
        handle.write(b"half a checkpoint")
        handle.flush()
        die()
    torch_save(obj, handle, *rest, **options)


torch.save = torch_save_or_die

roundtrip = train.Trainer._roundtrip_and_ptq


def roundtrip_or_die(self):
    if args["kill_in_final"]:
        die()
    return roundtrip(self)


train.Trainer._roundtrip_and_ptq = roundtrip_or_die

CellTask(RunOptions(workdir=args["workdir"], checkpoint_every_s=0.0))([cell])
"""


def run_cell_process(workdir: Path, manifest_path: Path, kill_step=-1, save_every=1, kill_in_save=0, kill_in_final=False):
    args = {
        "workdir": str(workdir),
        "manifest": str(manifest_path),
        "kill_step": kill_step,
        "save_every": save_every,
        "kill_in_save": kill_in_save,
        "kill_in_final": kill_in_final,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "QAT_CPUS_PER_TASK": "1", "QAT_ENERGY_INTERVAL_S": "3600"}
    return subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(args)], env=env, capture_output=True, text=True, timeout=300
    )


def read_result(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {
            "train_loss": f["curves/train_loss"][:].tolist(),
            "val_bpb_curve": f["curves/val_bpb"][:].tolist(),
            "lr": f["curves/lr"][:].tolist(),
            "probe": f["probe/int6"][:].tolist(),
            "val_bpb": float(f["metrics"].attrs["val_bpb"]),
            "roundtrip_val_bpb": float(f["metrics"].attrs["roundtrip_val_bpb"]),
            "resumes": float(f["metrics"].attrs["resumes"]),
            "energy_kwh": float(f["energy"].attrs["energy_kwh_modelled"]),
        }


@pytest.fixture(scope="module")
def killed_setup(cell, tmp_path_factory):
    """The manifest of the cell and the result of an uninterrupted subprocess run."""
    root = tmp_path_factory.mktemp("killed")
    manifest_path = root / "cell.csv"
    manifest.write(manifest_path, [cell])
    completed = run_cell_process(root / "reference", manifest_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return manifest_path, read_result(root / "reference" / "results" / cell.phase / f"{cell.cell_id}.h5")


def result_path(workdir: Path, cell) -> Path:
    return workdir / "results" / cell.phase / f"{cell.cell_id}.h5"


def checkpoint_path(workdir: Path, cell) -> Path:
    return workdir / "checkpoints" / cell.phase / f"{cell.cell_id}.pt"


@pytest.mark.slow
def test_sigkill_three_times_then_resume(cell, killed_setup, tmp_path):
    manifest_path, expected = killed_setup
    workdir = tmp_path / "wd"
    kills = [dict(kill_step=3), dict(kill_step=9, save_every=4), dict(kill_in_final=True)]
    resumed_from = []
    for kill in kills:
        completed = run_cell_process(workdir, manifest_path, **kill)
        assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
        assert not result_path(workdir, cell).exists()
        resumed_from.append(torch.load(checkpoint_path(workdir, cell), weights_only=True)["step"])

    completed = run_cell_process(workdir, manifest_path)
    assert completed.returncode == 0, completed.stderr[-3000:]

    # Saves every step up to step 3; every 4th step after, so the kill at 9
    # falls back to step 8; the loop-end save precedes the final evaluations.
    assert resumed_from == [3, 8, STEPS]
    result = read_result(result_path(workdir, cell))
    for key in ("train_loss", "val_bpb_curve", "lr", "probe", "val_bpb", "roundtrip_val_bpb"):
        assert result[key] == expected[key], key
    assert result["resumes"] == 3.0
    assert not checkpoint_path(workdir, cell).exists()


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous(cell, killed_setup, tmp_path):
    manifest_path, expected = killed_setup
    workdir = tmp_path / "wd"
    completed = run_cell_process(workdir, manifest_path, kill_in_save=5)
    assert completed.returncode == -signal.SIGKILL
    folder = checkpoint_path(workdir, cell).parent
    assert len(list(folder.glob(".*.tmp"))) == 1  # the torn fifth save
    assert torch.load(checkpoint_path(workdir, cell), weights_only=True)["step"] == 4

    completed = run_cell_process(workdir, manifest_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = read_result(result_path(workdir, cell))
    assert result["train_loss"] == expected["train_loss"]
    assert result["val_bpb"] == expected["val_bpb"]
    assert list(folder.glob(".*.tmp")) == []


@pytest.mark.slow
def test_sigkill_before_first_checkpoint_starts_over(cell, killed_setup, tmp_path):
    manifest_path, expected = killed_setup
    workdir = tmp_path / "wd"
    completed = run_cell_process(workdir, manifest_path, kill_step=2, save_every=5)
    assert completed.returncode == -signal.SIGKILL
    assert not checkpoint_path(workdir, cell).exists()

    completed = run_cell_process(workdir, manifest_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = read_result(result_path(workdir, cell))
    assert result["train_loss"] == expected["train_loss"]
    assert result["val_bpb"] == expected["val_bpb"]
    assert result["resumes"] == 0.0
