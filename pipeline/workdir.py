"""Layout of a study's files under its work directory.

    <workdir>/manifests/<phase>.csv        one row per cell
    <workdir>/results/<phase>/<cell_id>.h5 one result file per finished cell
    <workdir>/results/<phase>.parquet      the collected table
    <workdir>/logs/<phase>/                submitit logs of every job
    <workdir>/checkpoints/<phase>/         checkpoints of unfinished cells
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = True) -> Workdir:
        """Return the work directory at `path`, checking that it can be written.

        Raises UsageError (one line, nothing written) when it cannot.
        """
        root = Path(path).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise UsageError(f"--workdir {str(root)!r} is not a directory; pass a directory")
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UsageError(
                    f"--workdir {str(root)!r} cannot be created ({err.strerror}); "
                    "pass a directory you can write to"
                ) from None
            if not os.access(root, os.W_OK | os.X_OK):
                raise UsageError(
                    f"--workdir {str(root)!r} is not writable; pass a directory you can write to"
                )
        return cls(root)

    def manifest(self, phase: str) -> Path:
        return self.root / "manifests" / f"{phase}.csv"

    def results(self, phase: str) -> Path:
        return self.root / "results" / phase

    def result(self, phase: str, cell_id: str) -> Path:
        return self.results(phase) / f"{cell_id}.h5"

    def table(self, phase: str) -> Path:
        return self.root / "results" / f"{phase}.parquet"

    def logs(self, phase: str) -> Path:
        return self.root / "logs" / phase

    def checkpoints(self, phase: str) -> Path:
        return self.root / "checkpoints" / phase

    def cache(self) -> Path:
        return self.root / ".cache"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary sibling and a rename.

    A reader sees either the old file or the new one, never a torn file,
    because rename within one directory is atomic on POSIX filesystems.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates mode 0600; give the file the mode a plain open() would,
        # so group members of a shared work directory can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
