"""Energy of a cell: measured where the hardware allows, modelled otherwise.

Sources, each read at start, at every checkpoint (`EnergyMeter.snapshot`) and
at stop, never per step:

- ``nvml``: the total-energy counter of each GPU the job was given
  (`jobs.nvml_energy`). A MIG slice reads its parent GPU's counter, flagged
  as shared.
- ``rapl``: the CPU package counters under /sys/class/powercap
  (`jobs.rapl_energy`), also read by a background thread every minute so
  that a wrapping counter loses nothing. Flagged as shared when this process
  may use only some of the machine's CPUs.
- ``codecarbon``: codecarbon's offline tracker, which models CPU, GPU and RAM
  power (from RAPL and NVML where it can read them, from a TDP table
  otherwise) and integrates it over time. It never uses the network.
- ``slurm``: SLURM's ConsumedEnergyRaw, filled in after the job by the
  collector (`pipeline.slurm_energy`), not here.

Headline rule (``energy_source`` and ``energy_kwh``): the first of
"nvml+rapl", "nvml", "rapl", "codecarbon" whose sources all

1. read successfully in every attempt of the cell, and
2. are not shared with other jobs or MIG slices, and
3. cover the GPUs when the cell had any: "rapl" alone is skipped for a
   cell that saw a GPU, because it counts no GPU energy.

"nvml+rapl" is the sum of the two, which do not overlap (GPU boards and CPU
packages). "nvml" covers the GPUs only, "rapl" the CPU packages only, and
"codecarbon" is modelled CPU + GPU + RAM. When no candidate qualifies the
source is "none" and ``energy_kwh`` is NaN; each source's own total is still
stored. ``emissions_kg`` is the headline kWh times the grid carbon intensity
that codecarbon applied (its emissions over its energy), or, when codecarbon
measured no energy, the intensity codecarbon's table gives for the country.

Requeues: a snapshot contains the totals of every attempt so far, the current
one included, and goes into the checkpoint. The next attempt starts a new
meter with that snapshot as ``carried`` and adds only its own readings, so
nothing is counted twice. An attempt killed without a final checkpoint loses
the energy it used after its last snapshot, at most one checkpoint interval
(submitit saves a checkpoint on SLURM's USR2 warning, so a time limit or a
preemption loses almost nothing). The attempt is then not counted at all.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.nvml_energy import METHOD as NVML_METHOD
from jobs.nvml_energy import NvmlCounter, NvmlUnavailableError, gpus_requested
from jobs.rapl_energy import DEFAULT_POLL_S
from jobs.rapl_energy import METHOD as RAPL_METHOD
from jobs.rapl_energy import RaplCounter, RaplUnavailableError

log = logging.getLogger(__name__)

SOURCES = ("nvml", "rapl", "codecarbon")
MEASURED = ("nvml", "rapl")
# Measured sources come before modelled ones (rule in the module docstring).
HEADLINE_ORDER = (("nvml", "rapl"), ("nvml",), ("rapl",), ("codecarbon",))
CODECARBON_METHOD = "codecarbon OfflineEmissionsTracker (modelled CPU + GPU + RAM, kWh)"
CODECARBON_PARTS = ("cpu", "gpu", "ram")
# Version of the snapshot layout stored in checkpoints. Version 1 (no key)
# held codecarbon's totals only.
SNAPSHOT_FORMAT = 2
JOULES_PER_KWH = 3.6e6


class CodecarbonUnavailableError(RuntimeError):
    """codecarbon cannot model this attempt's energy; the message gives the reason."""


class _Codecarbon:
    """codecarbon's offline tracker, with its failures turned into CodecarbonUnavailableError."""

    def __init__(self, country: str, interval_s: float, allow_multiple_runs: bool = True) -> None:
        self.country = country
        self.interval_s = interval_s
        self.allow_multiple_runs = allow_multiple_runs
        self.tracker: Any = None

    def start(self) -> None:
        try:
            # Imported here because codecarbon takes a quarter of a second to import and only jobs need it.
            from codecarbon import OfflineEmissionsTracker
        except ImportError as err:
            raise CodecarbonUnavailableError(f"codecarbon cannot be imported: {err}") from err
        # codecarbon logs at INFO until its log_level option applies.
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        try:
            tracker = OfflineEmissionsTracker(
                country_iso_code=self.country,
                output_methods=[],  # no CSV or API output: the totals stay in memory
                log_level="error",
                # Several packed or array tasks may share a node. This also skips
                # codecarbon's lock file, so a stale one cannot stop the tracker.
                allow_multiple_runs=self.allow_multiple_runs,
                tracking_mode="process",
                measure_power_secs=self.interval_s,
            )
            tracker.start()
        except Exception as err:  # codecarbon failing must never stop training
            raise CodecarbonUnavailableError(f"codecarbon tracker failed to start: {err}") from err
        # start() swallows its own errors, so check the state it leaves behind.
        if getattr(tracker, "_another_instance_already_running", False):
            lock = getattr(getattr(tracker, "_lock", None), "lockfile_path", "codecarbon's lock file")
            raise CodecarbonUnavailableError(f"codecarbon found {lock} and did not start (stale lock file?)")
        if getattr(tracker, "_start_time", None) is None:
            raise CodecarbonUnavailableError(
                "codecarbon tracker failed to start without raising; codecarbon's log gives the reason"
            )
        self.tracker = tracker

    def read(self, final: bool) -> dict[str, float]:
        """Return this attempt's totals so far; final=True stops the tracker."""
        tracker = self.tracker
        try:
            if final:
                self.tracker = None  # stop() runs once, even if it fails
                tracker.stop()
                data = getattr(tracker, "final_emissions_data", None)
            else:
                tracker._measure_power_and_energy()
                data = tracker._prepare_emissions_data()
        except Exception as err:  # private calls, and codecarbon raising must not stop training
            raise CodecarbonUnavailableError(f"codecarbon reading failed: {err}") from err
        if data is None:
            raise CodecarbonUnavailableError("codecarbon returned no emissions data")
        return {
            "kwh": float(data.energy_consumed),
            "cpu_kwh": float(data.cpu_energy),
            "gpu_kwh": float(data.gpu_energy),
            "ram_kwh": float(data.ram_energy),
            "emissions_kg": float(data.emissions),
            "duration_s": float(data.duration),
            "devices": f"{data.cpu_count:g} CPU ({data.cpu_model}), {data.gpu_count:g} GPU ({data.gpu_model}), "
            f"{data.ram_total_size:g} GB RAM",
        }

    def close(self) -> None:
        """Stop the tracker's threads if `read(final=True)` has not."""
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            try:
                tracker.stop()
            except Exception as err:  # codecarbon's stop swallows most errors itself
                log.debug("codecarbon stop failed: %s", err)


@dataclass
class _Attempt:
    """One source's readings in the current attempt."""

    kwh: float = 0.0
    duration_s: float = 0.0
    started: bool = False  # took a start reading
    ok: bool = False  # took a start reading and every read since succeeded
    started_at: float = 0.0
    devices: str = ""
    shared: bool = False
    parts: dict[str, float] = field(default_factory=dict)  # codecarbon's cpu/gpu/ram/emissions


def empty_totals() -> dict[str, Any]:
    """Return the snapshot of a cell before its first attempt."""
    totals: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "attempts": 0,
        "duration_s": 0.0,
        "gpu_cell": False,
        "unavailable": {},
    }
    for source in SOURCES:
        totals[f"{source}_kwh"] = 0.0
        # True once an attempt started the source, so its kWh is a reading and not the default 0.
        totals[f"{source}_started"] = False
        totals[f"{source}_attempts"] = 0
        totals[f"{source}_duration_s"] = 0.0
        totals[f"{source}_devices"] = ""
    for source in MEASURED:
        totals[f"{source}_shared"] = False
    for part in CODECARBON_PARTS:
        totals[f"codecarbon_{part}_kwh"] = 0.0
    totals["codecarbon_emissions_kg"] = 0.0
    return totals


def normalise_carried(carried: dict[str, Any] | None) -> dict[str, Any]:
    """Return a snapshot in the current layout, from any earlier layout or none.

    Raises
    ------
    ValueError
        If `carried` has a snapshot format newer than this code reads.
    """
    totals = empty_totals()
    if not carried:
        return totals
    version = int(carried.get("format", 1))
    if version > SNAPSHOT_FORMAT:
        raise ValueError(
            f"energy snapshot format {version} is newer than {SNAPSHOT_FORMAT}, the newest this code reads; "
            "resume the cell with the code version that wrote the checkpoint"
        )
    if version == 1:
        # The codecarbon-only meter: one total per key, and no attempt count.
        totals.update(
            attempts=1,
            duration_s=float(carried.get("duration_s", 0.0)),
            codecarbon_kwh=float(carried.get("energy_kwh_modelled", 0.0)),
            codecarbon_attempts=1,
            codecarbon_started=True,
            codecarbon_duration_s=float(carried.get("duration_s", 0.0)),
            codecarbon_emissions_kg=float(carried.get("emissions_kg", 0.0)),
        )
        for part in CODECARBON_PARTS:
            totals[f"codecarbon_{part}_kwh"] = float(carried.get(f"{part}_kwh", 0.0))
        return totals
    for key, default in totals.items():
        value = carried.get(key, default)
        totals[key] = {k: list(v) for k, v in value.items()} if key == "unavailable" else type(default)(value)
    return totals


def _merge_devices(earlier: str, current: str) -> str:
    """Join device lists of different attempts, each distinct list once, separated by " | "."""
    lists = [part for part in earlier.split(" | ") if part]
    if current and current not in lists:
        lists.append(current)
    return " | ".join(lists)


def choose_headline(totals: dict[str, Any]) -> tuple[str, float]:
    """Return (energy_source, energy_kwh) by the rule in the module docstring."""
    attempts = totals["attempts"]
    if attempts == 0:
        return "none", math.nan

    def complete(source: str) -> bool:
        covered = totals[f"{source}_attempts"] == attempts
        return covered and not totals.get(f"{source}_shared", False)

    for combination in HEADLINE_ORDER:
        if totals["gpu_cell"] and combination == ("rapl",):
            continue
        if all(complete(source) for source in combination):
            return "+".join(combination), sum(totals[f"{source}_kwh"] for source in combination)
    return "none", math.nan


@functools.lru_cache(maxsize=None)
def country_intensity(country: str) -> float:
    """Return codecarbon's grid carbon intensity for `country` in kg/kWh (NaN when it has none)."""
    try:
        from codecarbon.core.emissions import Emissions
        from codecarbon.core.units import Energy
        from codecarbon.external.geography import GeoMetadata
        from codecarbon.input import DataSource

        one_kwh = Energy.from_energy(kWh=1.0)
        geo = GeoMetadata(country_iso_code=country)
        return float(Emissions(DataSource()).get_private_infra_emissions(one_kwh, geo))
    except Exception as err:  # any failure only leaves emissions unknown
        log.warning("codecarbon has no carbon intensity for country %r (%s); emissions_kg is NaN", country, err)
        return math.nan


class EnergyMeter:
    """Measure one attempt of a cell and add the totals carried from earlier attempts.

    Parameters
    ----------
    country
        ISO 3166 alpha-3 country code of the cluster's grid (for emissions).
    carried
        Totals of earlier attempts, as stored in the checkpoint (`snapshot()`).
    sources
        Sources to read; the others are recorded as unavailable ("turned off").
    powercap_root
        Folder with the RAPL zones; defaults to ``$QAT_POWERCAP_ROOT`` or
        /sys/class/powercap.
    rapl_poll_s
        Seconds between background RAPL reads (0: no thread).
    """

    def __init__(
        self,
        country: str = "USA",
        carried: dict[str, Any] | None = None,
        *,
        sources: Iterable[str] = SOURCES,
        powercap_root: Path | None = None,
        rapl_poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.sources = tuple(sources)
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown energy sources {unknown}; expected a subset of {list(SOURCES)}")
        self.country = country
        try:
            self.carried = normalise_carried(carried)
        except (ValueError, TypeError, AttributeError) as err:
            # Training goes on. The earlier attempts count as one attempt that no
            # source covered, so no headline can claim the whole cell.
            log.warning("energy totals in the checkpoint are unreadable (%s); earlier attempts are not counted", err)
            self.carried = empty_totals()
            self.carried["attempts"] = 1
            self.carried["unavailable"]["carried"] = [f"energy totals of earlier attempts unreadable: {err}"]
        self.counters: dict[str, Any] = {
            "nvml": NvmlCounter(os.environ.get("CUDA_VISIBLE_DEVICES")),
            "rapl": RaplCounter(powercap_root, poll_s=rapl_poll_s),
            "codecarbon": _Codecarbon(country, float(os.environ.get("QAT_ENERGY_INTERVAL_S", "15"))),
        }
        self.attempt = {source: _Attempt() for source in SOURCES}
        self.active: set[str] = set()  # sources started and not yet failed or closed
        self.reasons: dict[str, str] = {}  # this attempt's reason per unavailable source
        self.gpu_cell = False
        self.started_at: float | None = None
        self.duration_s = 0.0

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Start every source; a source that cannot start is recorded as unavailable."""
        self.started_at = time.monotonic()
        self.gpu_cell = gpus_requested(os.environ.get("CUDA_VISIBLE_DEVICES"))
        for source in SOURCES:
            if source not in self.sources:
                self.reasons[source] = "turned off"
                continue
            counter = self.counters[source]
            try:
                counter.start()
            except (NvmlUnavailableError, RaplUnavailableError, CodecarbonUnavailableError) as err:
                self._fail(source, str(err))
                continue
            state = self.attempt[source]
            state.started = state.ok = True
            state.started_at = time.monotonic()
            if source in MEASURED:
                state.devices = counter.devices
                state.shared = counter.shared
            self.active.add(source)
        if self.counters["nvml"].gpus:
            self.gpu_cell = True

    def _fail(self, source: str, reason: str) -> None:
        """Record a source as unavailable for this attempt, with one warning per source."""
        if source not in self.reasons:
            log.warning("energy source %s unavailable: %s", source, reason)
        self.reasons[source] = reason
        self.attempt[source].ok = False
        if source in self.active:
            self.active.discard(source)
            self.counters[source].close()

    # ------------------------------------------------------------------ reading
    def _read(self, final: bool) -> None:
        """Update this attempt's readings from every active source."""
        if self.started_at is None:
            return
        now = time.monotonic()
        self.duration_s = now - self.started_at
        for source in sorted(self.active):
            state = self.attempt[source]
            counter = self.counters[source]
            try:
                if source == "codecarbon":
                    values = counter.read(final)
                    state.kwh = values.pop("kwh")
                    state.devices = values.pop("devices")
                    state.duration_s = values.pop("duration_s")
                    state.parts = values
                else:
                    state.kwh = counter.read_joules() / JOULES_PER_KWH
                    state.duration_s = now - state.started_at
            except (NvmlUnavailableError, RaplUnavailableError, CodecarbonUnavailableError) as err:
                # The attempt keeps the last good reading but no longer counts as covered.
                self._fail(source, str(err))

    def _totals(self) -> dict[str, Any]:
        """Return carried totals plus this attempt's, in the snapshot layout."""
        totals = normalise_carried(self.carried)
        if self.started_at is None:
            return totals
        number = totals["attempts"] + 1
        totals["attempts"] = number
        totals["duration_s"] += self.duration_s
        totals["gpu_cell"] = totals["gpu_cell"] or self.gpu_cell
        for source in SOURCES:
            state = self.attempt[source]
            totals[f"{source}_kwh"] += state.kwh
            totals[f"{source}_duration_s"] += state.duration_s
            totals[f"{source}_attempts"] += int(state.ok)
            totals[f"{source}_started"] = totals[f"{source}_started"] or state.started
            totals[f"{source}_devices"] = _merge_devices(totals[f"{source}_devices"], state.devices)
            if source in MEASURED:
                totals[f"{source}_shared"] = totals[f"{source}_shared"] or state.shared
        for part in CODECARBON_PARTS:
            totals[f"codecarbon_{part}_kwh"] += self.attempt["codecarbon"].parts.get(f"{part}_kwh", 0.0)
        totals["codecarbon_emissions_kg"] += self.attempt["codecarbon"].parts.get("emissions_kg", 0.0)
        for source, reason in self.reasons.items():
            totals["unavailable"].setdefault(source, []).append(f"attempt {number}: {reason}")
        return totals

    def snapshot(self) -> dict[str, Any]:
        """Return carried plus current totals, for a checkpoint (plain types only)."""
        self._read(final=False)
        return self._totals()

    # ------------------------------------------------------------------ stop
    def stop(self) -> dict[str, Any]:
        """Take the last readings, close every source and return the /energy attributes."""
        self._read(final=True)
        for source in sorted(self.active):
            self.counters[source].close()
        self.active.clear()
        return energy_attributes(self._totals(), self.country)


def energy_attributes(totals: dict[str, Any], country: str) -> dict[str, Any]:
    """Turn a snapshot into the flat attributes of a result file's /energy group.

    Attributes (energies in kWh, times in seconds):

    - ``energy_kwh``, ``energy_source``: the headline and its source.
    - ``energy_kwh_modelled``, ``emissions_kg_modelled``: codecarbon's totals,
      NaN unless it covered every attempt.
    - ``emissions_kg``, ``grid_intensity_kg_per_kwh``, ``country_iso_code``.
    - ``attempts``, ``duration_s``, ``gpu_cell``, ``unavailable``
      ("source: attempt N: reason", sources separated by "; ").
    - per source (nvml, rapl, codecarbon): ``<source>_kwh``,
      ``<source>_method`` (counter and its native unit), ``<source>_devices``,
      ``<source>_duration_s``, ``<source>_attempts`` (attempts it covered);
      ``nvml_shared`` and ``rapl_shared``; ``codecarbon_cpu_kwh``,
      ``codecarbon_gpu_kwh``, ``codecarbon_ram_kwh``.

    A source that never started gets NaN energy, which distinguishes "not
    measured" from a measured 0. A source that failed part-way keeps the energy
    it read, and ``<source>_attempts`` shows that it did not cover every
    attempt.
    """
    source, kwh = choose_headline(totals)
    attempts = totals["attempts"]
    codecarbon_complete = attempts > 0 and totals["codecarbon_attempts"] == attempts
    modelled = totals["codecarbon_kwh"] if codecarbon_complete else math.nan
    if totals["codecarbon_kwh"] > 0 and totals["codecarbon_emissions_kg"] > 0:
        intensity = totals["codecarbon_emissions_kg"] / totals["codecarbon_kwh"]
    elif source != "none":
        intensity = country_intensity(country)
    else:
        intensity = math.nan

    attributes: dict[str, Any] = {
        "energy_kwh": kwh,
        "energy_source": source,
        "energy_kwh_modelled": modelled,
        "emissions_kg": kwh * intensity,
        "emissions_kg_modelled": totals["codecarbon_emissions_kg"] if codecarbon_complete else math.nan,
        "grid_intensity_kg_per_kwh": intensity,
        "country_iso_code": country,
        "attempts": attempts,
        "duration_s": totals["duration_s"],
        "gpu_cell": bool(totals["gpu_cell"]),
    }
    methods = {"nvml": NVML_METHOD, "rapl": RAPL_METHOD, "codecarbon": CODECARBON_METHOD}
    for name in SOURCES:
        covered = totals[f"{name}_attempts"]
        attributes[f"{name}_kwh"] = totals[f"{name}_kwh"] if totals[f"{name}_started"] else math.nan
        attributes[f"{name}_method"] = methods[name]
        attributes[f"{name}_devices"] = totals[f"{name}_devices"]
        attributes[f"{name}_duration_s"] = totals[f"{name}_duration_s"]
        attributes[f"{name}_attempts"] = covered
        if name in MEASURED:
            attributes[f"{name}_shared"] = bool(totals[f"{name}_shared"])
    for part in CODECARBON_PARTS:
        value = totals[f"codecarbon_{part}_kwh"]
        attributes[f"codecarbon_{part}_kwh"] = value if totals["codecarbon_started"] else math.nan
    attributes["unavailable"] = "; ".join(
        f"{name}: {' / '.join(reasons)}" for name, reasons in sorted(totals["unavailable"].items())
    )
    return attributes
