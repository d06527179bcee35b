"""Train one cell: model, fake quantisation, schedule, evaluation, probe, checkpoints.

The loop reads top to bottom: set-up, optional resume, the step loop (with
validation, probe and checkpoint hooks), then the final evaluations that the
analysis needs: val_bpb, the export round-trip, and post-training quantisation
of fp16 cells. Every number the analysis reads is returned in a TrainResult.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from jobs import data as data_lib
from jobs.checkpoint import load_checkpoint, save_checkpoint
from jobs.model import GPT, GPTConfig, flops_per_token
from jobs.optim import build_optimizers, set_lr
from jobs.quant import export_quantized, load_quantized, probe_model
from jobs.schedule import lr_multiplier, warmdown_start
from pipeline.cell import Cell

log = logging.getLogger(__name__)

PTQ_BITS = (8, 6, 4)

# Tokens per forward pass on a GPU. The study's batches (up to 512 x 1024
# tokens) would need hundreds of GB of activations in one pass at 100M-350M.
# NOTE: an estimate of what fits on an 80-141 GB GPU at 350M, not measured here.
GPU_MICRO_BATCH_TOKENS = 65536

# A training loss above this multiple of ln(vocab_size) counts as divergence.
DIVERGENCE_FACTOR = 4.0

# Version of the checkpoint layout; a checkpoint of another version is not resumed.
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """Everything a finished (or diverged) cell reports."""

    status: str  # "done" or "diverged"
    metrics: dict[str, float]
    curves: dict[str, np.ndarray]
    probe: dict[str, np.ndarray]
    data_fingerprint: str


@dataclass
class Curves:
    """Per-step and per-evaluation records, kept as lists so checkpoints can hold them."""

    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)
    probe_step: list[int] = field(default_factory=list)
    probe_int4: list[float] = field(default_factory=list)
    probe_int6: list[float] = field(default_factory=list)
    probe_int8: list[float] = field(default_factory=list)

    def state(self) -> dict[str, list]:
        return dict(self.__dict__)


def micro_batch_rows(cell: Cell, device: torch.device, micro_batch_tokens: int | None) -> int:
    """Return the sequences per forward pass: the whole batch, or fewer to bound memory.

    The cap in tokens comes from the argument, else $QAT_MICRO_BATCH_TOKENS,
    else GPU_MICRO_BATCH_TOKENS on CUDA; on CPU the whole batch goes in one pass.
    """
    cap = micro_batch_tokens or int(os.environ.get("QAT_MICRO_BATCH_TOKENS", "0") or 0)
    if not cap and device.type == "cuda":
        cap = GPU_MICRO_BATCH_TOKENS
    if not cap:
        return cell.batch_size
    return max(1, min(cell.batch_size, cap // cell.seq_len))


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def set_threads() -> None:
    """Use the CPUs SLURM gave this task, so packed or parallel tasks do not oversubscribe."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("QAT_CPUS_PER_TASK")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


class _SignalDeferral:
    """Hold a signal's Python handler while critical sections run, then call it once.

    SLURM sends USR2 before a time limit or on preemption, and submitit's handler
    saves a checkpoint and requeues. The handler must not run halfway through an
    optimiser step or a curve update, where model, optimisers and curves
    disagree. Masking the signal with pthread_sigmask is not enough: the kernel
    then delivers it to another thread (codecarbon's, for example) and Python
    still runs the handler in the main thread at the next bytecode. So the
    deferral swaps in a handler that only records the signal, and on leaving
    the outermost section it restores the previous handler and calls it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.depth = 0
        self.pending = 0
        self.previous: Any = None

    def _hold(self, signum: int, frame: Any) -> None:
        self.pending += 1

    @contextmanager
    def __call__(self) -> Iterator[None]:
        # signal.signal works only in the main thread; elsewhere nothing can be deferred.
        if self.depth == 0 and threading.current_thread() is not threading.main_thread():
            yield
            return
        if self.depth == 0:
            self.previous = signal.signal(self.signum, self._hold)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self._release()

    def _release(self) -> None:
        previous = self.previous
        signal.signal(self.signum, previous if previous is not None else signal.SIG_DFL)
        if not self.pending:
            return
        self.pending = 0
        log.info("handling signal %s, held until the step ended", signal.Signals(self.signum).name)
        if callable(previous):
            previous(self.signum, None)
        elif previous == signal.SIG_DFL:
            # The default action (terminate for USR2) takes effect now.
            os.kill(os.getpid(), self.signum)


_DEFERRALS: dict[int, _SignalDeferral] = {}


def signals_deferred(signum: int = signal.SIGUSR2) -> Any:
    """Return a context manager that holds `signum`'s handler until the block ends.

    Nested blocks defer to the outermost one. A signal that arrives inside runs
    its handler (submitit's checkpoint-and-requeue) once, right after the block.
    """
    if signum not in _DEFERRALS:
        _DEFERRALS[signum] = _SignalDeferral(signum)
    return _DEFERRALS[signum]()


class Trainer:
    """The training state of one cell, which a checkpoint captures whole."""

    def __init__(
        self,
        cell: Cell,
        cache_dir: Path,
        device: torch.device | None = None,
        micro_batch_tokens: int | None = None,
    ) -> None:
        self.cell = cell
        self.device = device or pick_device()
        self.micro_batch = micro_batch_rows(cell, self.device, micro_batch_tokens)
        self.corpus = data_lib.load_corpus(cell.data, cache_dir)
        if self.corpus.vocab_size > cell.vocab_size:
            raise ValueError(
                f"data {cell.data!r} has vocabulary {self.corpus.vocab_size} but the cell's model "
                f"has {cell.vocab_size}; set vocab_size in the phase spec"
            )

        # ---- model and optimisers (seeded, so two runs of a cell start equal)
        torch.manual_seed(cell.seed)
        random.seed(cell.seed)
        np.random.seed(cell.seed)
        self.config = GPTConfig(
            n_layer=cell.n_layer,
            n_head=cell.n_head,
            n_embd=cell.n_embd,
            vocab_size=cell.vocab_size,
            seq_len=cell.seq_len,
        )
        self.model = GPT(self.config, bits=cell.bit_width).to(self.device)
        self.optimizers = build_optimizers(
            self.model, cell.optimizer, cell.matrix_lr, cell.adam_lr, cell.weight_decay, cell.lr_mult
        )
        self.forward = self.model
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            try:
                self.forward = torch.compile(self.model)
            except Exception as err:  # compile support varies by platform; eager still trains
                log.warning("torch.compile failed (%s); training in eager mode", err)
        # bf16 autocast on GPUs that support it; eager fp32 on CPU, where bf16
        # speed depends on the processor and small CPU runs serve as references.
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.autocast: Callable[[], Any] = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            self.autocast = nullcontext

        self.step = 0
        self.curves = Curves()
        self.requeues = 0  # USR2 (time limit or preemption) checkpoints that requeued the task
        self.resumes = 0  # starts from a checkpoint: requeues, resubmissions, restarts after a crash
        self.elapsed_s = 0.0  # training wall time over all attempts
        self.energy_state: dict[str, Any] = {}
        self._losses: torch.Tensor | None = None
        # The trained weights while the final evaluations swap in quantised
        # ones, so a checkpoint taken then saves the trained weights.
        self._trained: dict[str, torch.Tensor] | None = None
        # Returns the energy totals so far (earlier attempts included) for a checkpoint.
        self.energy_hook: Callable[[], dict[str, Any]] | None = None
        self.warmdown_step = warmdown_start(cell.steps, cell.warmdown)
        self.val = data_lib.val_batches(self.corpus, cell.batch_size, cell.seq_len, cell.val_tokens)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Return the full training state.

        That is the cell, model, optimisers, step, curves, requeue and resume
        counts, training time, energy totals so far and every RNG state. The
        step is also the data position, because the batch of a step is drawn
        from (seed, step) alone.
        """
        model = self._trained if self._trained is not None else self.model.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "cell": self.cell.to_row(),
            "data_fingerprint": self.corpus.fingerprint,
            "step": self.step,
            "model": model,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "curves": self._synced_curves(),
            "requeues": self.requeues,
            "resumes": self.resumes,
            "elapsed_s": self.elapsed_s,
            "energy": self.energy_hook() if self.energy_hook else self.energy_state,
            "rng": capture_rng(),
        }

    def _synced_curves(self) -> dict[str, list]:
        # The loss buffer lives on the device and is copied out only at log
        # intervals; a checkpoint between intervals copies it now.
        if self._losses is not None:
            self.curves.train_loss = self._losses[: self.step].cpu().tolist()
        return self.curves.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict`; raise ValueError if it belongs to another run."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}; "
                "delete the checkpoint to train the cell from step 0"
            )
        if state["cell"]["cell_id"] != self.cell.cell_id:
            raise ValueError(
                f"checkpoint belongs to cell {state['cell']['cell_id']}, not {self.cell.cell_id}"
            )
        if state["data_fingerprint"] != self.corpus.fingerprint:
            raise ValueError(
                f"checkpoint of cell {self.cell.cell_id} was trained on data {state['data_fingerprint']}, "
                f"but {self.cell.data!r} now has fingerprint {self.corpus.fingerprint}; restore the "
                "original data or delete the checkpoint to train the cell from step 0"
            )
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.step = int(state["step"])
        self.curves = Curves(**state["curves"])
        self.requeues = int(state["requeues"])
        self.resumes = int(state["resumes"])
        self.elapsed_s = float(state["elapsed_s"])
        self.energy_state = dict(state["energy"])
        restore_rng(state["rng"])

    def save(self, path: Path) -> None:
        """Write the state to `path` atomically; USR2 waits until the file is whole."""
        with signals_deferred():
            started = time.perf_counter()
            save_checkpoint(path, self.state_dict())
        log.info("cell %s: checkpoint at step %d in %.2fs", self.cell.cell_id, self.step, time.perf_counter() - started)

    def resume(self, path: Path) -> bool:
        """Load the checkpoint at `path` if there is one; return whether it did.

        On CPU, a resumed run ends bit-identical to an uninterrupted one
        (tests/test_checkpoint.py). NOTE: CUDA kernels are not bitwise
        deterministic, so on a GPU the target is a final val_bpb within 1e-3;
        no test has checked that on a GPU yet.
        """
        state = load_checkpoint(path, map_location=self.device)
        if state is None:
            return False
        self.load_state_dict(state)
        self.resumes += 1
        log.info(
            "cell %s: resumed from step %d of %d (resume %d, %d requeue(s) so far)",
            self.cell.cell_id, self.step, self.cell.steps, self.resumes, self.requeues,
        )
        return True

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Return (mean val loss in nats per token, val bits per byte)."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        token_count = 0
        byte_count = 0.0
        for x_cpu, y_cpu in self.val:
            x = x_cpu.to(self.device, non_blocking=True)
            y = y_cpu.to(self.device, non_blocking=True)
            with self.autocast():
                loss = self.forward(x, y)
            loss_sum += loss.double() * y.numel()
            token_count += y.numel()
            byte_count += data_lib.count_bytes(y_cpu, self.corpus)
        self.model.train()
        total = loss_sum.item()
        return total / token_count, total / math.log(2) / byte_count

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accumulate gradients over micro-batches; return the batch's mean loss (detached)."""
        rows = x.size(0)
        if self.micro_batch >= rows:
            with self.autocast():
                loss = self.forward(x, y)
            loss.backward()
            return loss.detach()
        total = torch.zeros((), device=self.device)
        for xs, ys in zip(x.split(self.micro_batch), y.split(self.micro_batch)):
            with self.autocast():
                part = self.forward(xs, ys) * (xs.size(0) / rows)
            part.backward()
            total += part.detach()
        return total

    def probe(self) -> None:
        distances = probe_model(self.model)
        # The four lists grow together, so a checkpoint never stores them uneven.
        with signals_deferred():
            self.curves.probe_step.append(self.step)
            self.curves.probe_int4.append(distances["int4"])
            self.curves.probe_int6.append(distances["int6"])
            self.curves.probe_int8.append(distances["int8"])

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        checkpoint_path: Path | None = None,
        checkpoint_every_s: float = 600.0,
        log_every: int | None = None,
    ) -> TrainResult:
        """Train from the current step to the end and return the cell's results."""
        cell = self.cell
        log_every = log_every or max(1, cell.steps // 20)
        flops = flops_per_token(self.config) * cell.tokens_per_step
        losses = torch.zeros(cell.steps, device=self.device)
        if self.curves.train_loss:
            losses[: len(self.curves.train_loss)] = torch.tensor(self.curves.train_loss)
        self._losses = losses
        # A loss this far above a uniform prediction (ln V nats) means the run
        # blew up even when it stayed finite. At LR 1e6 the loss jumps to ~1e7
        # and then sits at ln V, which a NaN check alone would call done.
        divergence_limit = DIVERGENCE_FACTOR * math.log(cell.vocab_size)
        last_save = time.monotonic()
        window_start, window_step = time.perf_counter(), self.step
        status = "done"
        diverged_step = -1

        while self.step < cell.steps:
            step = self.step
            # ---- evaluation and probe see the weights before this step's update
            if step > 0 and step % cell.eval_every == 0 and (not self.curves.val_step or self.curves.val_step[-1] != step):
                self._record_eval()
            if self._probe_due(step):
                self.probe()

            # ---- one optimiser step; USR2 waits until the step is whole
            multiplier = lr_multiplier(step, cell.steps, cell.warmup_steps, cell.warmdown, cell.shape)
            x, y = data_lib.get_batch(
                self.corpus.train, cell.batch_size, cell.seq_len, cell.seed, step, self.device
            )
            with signals_deferred():
                started = time.perf_counter()
                set_lr(self.optimizers, multiplier)
                loss = self._forward_backward(x, y)
                for opt in self.optimizers:
                    opt.step()
                self.model.zero_grad(set_to_none=True)
                losses[step] = loss
                self.curves.lr.append(multiplier)
                self.step = step + 1
                self.elapsed_s += time.perf_counter() - started

            # ---- logging, divergence check and checkpoints at intervals only,
            # so the host does not wait for the device on every step. The
            # divergence check runs before every checkpoint, so no checkpoint
            # contains a non-finite loss.
            log_due = self.step % log_every == 0 or self.step == cell.steps
            save_due = (
                checkpoint_path is not None
                and self.step < cell.steps
                and time.monotonic() - last_save >= checkpoint_every_s
            )
            if not (log_due or save_due):
                continue
            recent = losses[window_step : self.step].cpu()
            self.curves.train_loss = losses[: self.step].cpu().tolist()
            blown_up = ~torch.isfinite(recent) | (recent > divergence_limit)
            if blown_up.any():
                bad = int(torch.nonzero(blown_up)[0]) + window_step
                status, diverged_step = "diverged", bad
                log.warning("cell %s diverged at step %d (loss %s)", cell.cell_id, bad, recent[bad - window_step].item())
                break
            if log_due:
                seconds = time.perf_counter() - window_start
                steps_done = self.step - window_step
                tokens_per_s = steps_done * cell.tokens_per_step / max(seconds, 1e-9)
                eta = (cell.steps - self.step) * seconds / max(steps_done, 1)
                log.info(
                    "step %d/%d | loss %.4f | lr x%.3f | %.0f tok/s | %.2f GFLOP/s | eta %.0fs",
                    self.step, cell.steps, recent[-1].item(), multiplier, tokens_per_s,
                    flops * steps_done / max(seconds, 1e-9) / 1e9, eta,
                )
                window_start, window_step = time.perf_counter(), self.step
            if save_due:
                self.save(checkpoint_path)
                last_save = time.monotonic()

        self.curves.train_loss = losses[: self.step].cpu().tolist()
        if status == "diverged":
            return self._result(status, diverged_step, final={})
        if checkpoint_path is not None:
            # A kill during the final evaluations then repeats only them.
            self.save(checkpoint_path)

        # ---- final evaluations; a resumed run skips the one it already recorded
        if not self.curves.val_step or self.curves.val_step[-1] != self.step:
            self._record_eval()
        final = {"val_loss": self.curves.val_loss[-1], "val_bpb": self.curves.val_bpb[-1]}
        final.update(self._roundtrip_and_ptq())
        if not self.curves.probe_step:
            self.probe()  # a warmdown of 0 starts at the last step: probe the final weights
        return self._result(status, diverged_step, final)

    def _probe_due(self, step: int) -> bool:
        # A run resumed from a checkpoint taken right after a probe skips it.
        if self.curves.probe_step and self.curves.probe_step[-1] == step:
            return False
        if step == self.warmdown_step:
            return True
        every = self.cell.probe_every
        return every > 0 and step % every == 0

    def _record_eval(self) -> None:
        val_loss, val_bpb = self.evaluate()
        with signals_deferred():
            self.curves.val_step.append(self.step)
            self.curves.val_loss.append(val_loss)
            self.curves.val_bpb.append(val_bpb)
        log.info("step %d/%d | val_loss %.4f | val_bpb %.4f", self.step, self.cell.steps, val_loss, val_bpb)

    def _roundtrip_and_ptq(self) -> dict[str, float]:
        """Evaluate the exported integer weights, and post-training quantisation for fp16 cells."""
        out: dict[str, float] = {}
        bits = self.cell.bit_width
        # Set before any quantised weights are loaded and cleared only after the
        # trained ones are back, so `state_dict` never returns quantised weights.
        self._trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if bits is not None:
            state = export_quantized(self.model, bits)
            load_quantized(self.model, state)
            out["roundtrip_val_bpb"] = self.evaluate()[1]
            state = export_quantized(self.model, bits, embed_bits=8)
            load_quantized(self.model, state)
            out["roundtrip_int8_embed_val_bpb"] = self.evaluate()[1]
        else:
            for ptq_bits in PTQ_BITS:
                self.model.set_bits(ptq_bits)
                out[f"ptq_val_bpb_int{ptq_bits}"] = self.evaluate()[1]
            self.model.set_bits(None)
        self.model.load_state_dict(self._trained)
        self.model.set_bits(bits)
        self._trained = None
        return out

    def _result(self, status: str, diverged_step: int, final: dict[str, float]) -> TrainResult:
        cell = self.cell
        nan = float("nan")
        probe_at_warmdown = {
            f"probe_int{b}": nan for b in PTQ_BITS
        }
        for i, step in enumerate(self.curves.probe_step):
            if step == self.warmdown_step or (i == len(self.curves.probe_step) - 1 and self.warmdown_step >= cell.steps):
                for b in PTQ_BITS:
                    probe_at_warmdown[f"probe_int{b}"] = getattr(self.curves, f"probe_int{b}")[i]
        tokens = self.step * cell.tokens_per_step
        metrics = {
            "val_loss": nan,
            "val_bpb": nan,
            "roundtrip_val_bpb": nan,
            "roundtrip_int8_embed_val_bpb": nan,
            **{f"ptq_val_bpb_int{b}": nan for b in PTQ_BITS},
            **final,
            **probe_at_warmdown,
            "steps_done": float(self.step),
            "tokens": float(tokens),
            "wall_s": self.elapsed_s,
            "tokens_per_s": tokens / self.elapsed_s if self.elapsed_s > 0 else nan,
            "diverged_step": float(diverged_step),
            "requeues": float(self.requeues),
            "resumes": float(self.resumes),
            "train_loss_final": self.curves.train_loss[-1] if self.curves.train_loss else nan,
        }
        curves = {
            "train_loss": np.asarray(self.curves.train_loss, dtype=np.float32),
            "lr": np.asarray(self.curves.lr, dtype=np.float32),
            "val_step": np.asarray(self.curves.val_step, dtype=np.int64),
            "val_loss": np.asarray(self.curves.val_loss, dtype=np.float64),
            "val_bpb": np.asarray(self.curves.val_bpb, dtype=np.float64),
        }
        probe = {
            "step": np.asarray(self.curves.probe_step, dtype=np.int64),
            **{f"int{b}": np.asarray(getattr(self.curves, f"probe_int{b}"), dtype=np.float64) for b in PTQ_BITS},
        }
        return TrainResult(status, metrics, curves, probe, self.corpus.fingerprint)


def capture_rng() -> dict[str, Any]:
    """Return python, numpy, torch and CUDA RNG states as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
