"""CPU package energy from the RAPL counters that Linux exposes under powercap.

Each top-level zone ``intel-rapl:<n>`` whose ``name`` starts with "package"
is one CPU socket. Its ``energy_uj`` file counts microjoules and wraps to 0
after ``max_energy_range_uj``. The kernel uses the same zone names for the
RAPL counters of AMD processors. Subzones (``intel-rapl:0:0``: core, uncore,
dram) lie inside their package and are not added again, and a ``psys`` zone
covers the whole platform, so it is skipped as well.

A package counter covers every core of its socket. When this process may run
on only some of the machine's CPUs (a SLURM job sharing its node), the
reading includes other jobs' energy and is flagged as shared.

The range is often about 262 kJ (``max_energy_range_uj`` = 262143328850 on
many Intel parts), which a socket drawing 200 W uses in about 22 minutes. A
counter read only at checkpoints could wrap more than once between reads and
lose whole ranges, so a daemon thread also reads the files every
``poll_s`` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/powercap")
# At 1 kW a 262 kJ range lasts 262 s, so 60 s leaves four reads per range.
DEFAULT_POLL_S = 60.0
ROOT_ENV = "QAT_POWERCAP_ROOT"
_TOP_LEVEL_ZONE = re.compile(r"^intel-rapl:\d+$")

METHOD = "RAPL package counters (energy_uj, microjoules), summed over sockets"


class RaplUnavailableError(RuntimeError):
    """The RAPL package counters cannot be read on this machine; the message gives the reason."""


@dataclass
class _Zone:
    path: Path
    name: str
    max_range_uj: int
    last_uj: int
    total_uj: int = 0


def _read_int(path: Path) -> int:
    with open(path, encoding="ascii") as handle:
        return int(handle.read().strip())


def wrapped_delta(before: int, after: int, max_range: int) -> int:
    """Return the microjoules counted from `before` to `after`, with at most one wrap.

    The counter runs from 0 to `max_range` inclusive, so a wrap adds
    ``max_range + 1``. Two or more wraps between reads cannot be distinguished
    from one, which is why the counter is polled.
    """
    if after >= before:
        return after - before
    return after + max_range + 1 - before


def cpus_shared() -> bool:
    """Return whether this process may run on fewer CPUs than the machine has."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity outside Linux
        return False
    return allowed < (os.cpu_count() or allowed)


class RaplCounter:
    """Sum of the package counters' energy since `start`, polled in the background.

    Parameters
    ----------
    root
        The powercap folder; defaults to ``$QAT_POWERCAP_ROOT`` or
        ``/sys/class/powercap``. Tests point it at a fake tree.
    poll_s
        Seconds between background reads; 0 turns the thread off, so that
        reads happen only in `start` and `read_joules`.
    """

    def __init__(self, root: Path | None = None, poll_s: float = DEFAULT_POLL_S) -> None:
        self.root = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
        self.poll_s = poll_s
        self.zones: list[_Zone] = []
        self.shared = False
        # Reentrant, so that a signal handler that takes a snapshot while the main
        # thread is inside a read cannot deadlock the job.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def devices(self) -> str:
        """Zone names read, for example "intel-rapl:0 (package-0),intel-rapl:1 (package-1)"."""
        return ",".join(f"{zone.path.name} ({zone.name})" for zone in self.zones)

    def start(self) -> None:
        """Find the package zones and take the first reading of each.

        Raises
        ------
        RaplUnavailableError
            If the root folder is missing, contains no package zone, or a
            counter file cannot be read (often mode 0400, root only, on
            kernels patched for CVE-2020-8694).
        """
        if not self.root.is_dir():
            raise RaplUnavailableError(f"no powercap folder at {self.root} (no RAPL driver, or not Linux)")
        zones = []
        for path in sorted(self.root.iterdir()):
            if not _TOP_LEVEL_ZONE.match(path.name):
                continue
            try:
                name = (path / "name").read_text(encoding="ascii").strip()
                if not name.startswith("package"):
                    continue
                zones.append(
                    _Zone(
                        path=path,
                        name=name,
                        max_range_uj=_read_int(path / "max_energy_range_uj"),
                        last_uj=_read_int(path / "energy_uj"),
                    )
                )
            except (OSError, ValueError) as err:
                raise RaplUnavailableError(f"cannot read RAPL zone {path}: {err}") from err
        if not zones:
            raise RaplUnavailableError(f"no RAPL package zone (intel-rapl:<n> named package-*) under {self.root}")
        self.zones = zones
        self.shared = cpus_shared()
        if self.poll_s > 0:
            self._thread = threading.Thread(target=self._poll, name="rapl-poll", daemon=True)
            self._thread.start()

    def _accumulate(self) -> None:
        """Read every zone once and add what it counted since the last read."""
        with self._lock:
            for zone in self.zones:
                now = _read_int(zone.path / "energy_uj")
                zone.total_uj += wrapped_delta(zone.last_uj, now, zone.max_range_uj)
                zone.last_uj = now

    def _poll(self) -> None:
        failures = 0
        while not self._stop.wait(self.poll_s):
            try:
                self._accumulate()
            except (OSError, ValueError) as err:
                # A missed poll costs nothing unless the counter wraps twice before
                # the next good read; a lasting failure makes read_joules raise.
                failures += 1
                if failures == 1:
                    log.warning("RAPL background read failed (%s); polling goes on", err)

    def read_joules(self) -> float:
        """Return the package energy since `start` in joules, summed over sockets.

        Raises
        ------
        RaplUnavailableError
            If a counter file cannot be read now.
        """
        try:
            self._accumulate()
        except (OSError, ValueError) as err:
            raise RaplUnavailableError(f"cannot read RAPL counter: {err}") from err
        return sum(zone.total_uj for zone in self.zones) / 1e6

    def close(self) -> None:
        """Stop the background thread; the totals stay readable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
