"""Checkpoint files: written atomically, read with torch's weights-only loader."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save `state` through a temporary sibling and a rename.

    A job killed mid-write leaves the previous checkpoint intact, because the
    rename is atomic and happens only after the new file is flushed to disk.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> int:
    """Delete temporary files that a killed `save_checkpoint` left next to `path`.

    Call it only while no other process saves this checkpoint (at the start of
    the cell's run). Returns how many files it removed.
    """
    removed = 0
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d unfinished checkpoint file(s) next to %s", removed, path)
    return removed


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """Return the checkpoint at `path`, or None when there is none or it cannot be read.

    Only tensors and plain containers are accepted (weights_only=True), so a
    checkpoint file cannot run code when loaded. An unreadable checkpoint is
    logged and ignored: the cell then trains from step 0, which loses time but
    never mixes states.
    """
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any unpickling failure means the same thing: start over
        log.warning("checkpoint %s cannot be read (%s); training from step 0", path, err)
        return None
