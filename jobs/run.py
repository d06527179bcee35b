"""The function submitit runs on a compute node: train a list of cells in turn.

A task contains one or more cells (several when small cells are packed into one
array task). Finished cells are skipped, so a requeued or resubmitted task
picks up where it stopped, and an unfinished cell resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from jobs import provenance
from jobs.checkpoint import remove_stale_temporaries
from jobs.energy import EnergyMeter
from jobs.result import write_result
from jobs.train import Trainer, set_threads
from pipeline.cell import Cell
from pipeline.workdir import Workdir

log = logging.getLogger("jobs")


@dataclass(frozen=True)
class RunOptions:
    """Run-time options that change how a cell runs, never what it computes."""

    workdir: str
    checkpoint_every_s: float = 600.0  # 10 min; a checkpoint of a 100M cell takes about a second
    keep_checkpoint: bool = False
    country: str = "USA"
    micro_batch_tokens: int | None = None  # tokens per forward pass; None: see jobs.train.micro_batch_rows


def setup_logging() -> None:
    level = os.environ.get("QAT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class CellTask:
    """Checkpointable callable: submitit calls `checkpoint` on USR2 and requeues."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self._trainer: Trainer | None = None
        self._checkpoint_path: Path | None = None

    def __call__(self, cells: list[Cell]) -> list[str]:
        """Train every cell of this task that has no result yet; return their statuses."""
        setup_logging()
        set_threads()
        statuses = []
        for cell in cells:
            statuses.append(self.run_cell(cell))
        return statuses

    def run_cell(self, cell: Cell) -> str:
        workdir = Workdir(Path(self.options.workdir))
        result_path = workdir.result(cell.phase, cell.cell_id)
        checkpoint_path = workdir.checkpoints(cell.phase) / f"{cell.cell_id}.pt"
        if result_path.exists():
            log.info("cell %s already has a result; skipping", cell.cell_id)
            # A USR2 that arrived after the result was written left a checkpoint.
            if not self.options.keep_checkpoint:
                checkpoint_path.unlink(missing_ok=True)
            return "skipped"
        log.info("cell %s: %s", cell.cell_id, cell.to_row())
        remove_stale_temporaries(checkpoint_path)

        trainer = Trainer(cell, cache_dir=workdir.cache(), micro_batch_tokens=self.options.micro_batch_tokens)
        trainer.resume(checkpoint_path)
        meter = EnergyMeter(self.options.country, carried=trainer.energy_state)
        meter.start()
        trainer.energy_hook = meter.snapshot
        self._trainer, self._checkpoint_path = trainer, checkpoint_path
        env = provenance.collect(trainer.device)
        log.info("environment: %s", env)

        result = trainer.run(checkpoint_path, self.options.checkpoint_every_s)
        energy = meter.stop()
        write_result(
            result_path,
            cell.to_row(),
            result.status,
            result.metrics,
            result.curves,
            result.probe,
            env,
            energy,
            result.data_fingerprint,
        )
        self._trainer = None
        if not self.options.keep_checkpoint:
            checkpoint_path.unlink(missing_ok=True)
        log.info(
            "cell %s %s | val_bpb %.4f | %d steps | %.1fs | %.0f tok/s | %d requeue(s), %d resume(s)",
            cell.cell_id, result.status, result.metrics["val_bpb"], result.metrics["steps_done"],
            result.metrics["wall_s"], result.metrics["tokens_per_s"],
            result.metrics["requeues"], result.metrics["resumes"],
        )
        return result.status

    def checkpoint(self, cells: list[Cell]):
        """Save the running cell and return the same task for submitit to requeue."""
        import submitit

        trainer = self._trainer
        if trainer is not None and self._checkpoint_path is not None:
            trainer.requeues += 1
            trainer.save(self._checkpoint_path)
            log.info(
                "cell %s: checkpoint at step %d before requeue %d",
                trainer.cell.cell_id, trainer.step, trainer.requeues,
            )
        return submitit.helpers.DelayedSubmission(CellTask(self.options), cells)
