"""Energy per cell: NVML, RAPL and codecarbon sources, requeues, and SLURM's record.

NVML is replaced at its library boundary by a fake ``pynvml`` module whose
counters the tests advance by hand. RAPL reads a fake powercap tree under
tmp_path. codecarbon runs for real (offline, about a second per tracker).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import pytest

# Imported before any test swaps in the fake pynvml, so that codecarbon keeps
# the real module and no codecarbon state depends on test order.
import codecarbon  # noqa: F401
import codecarbon.lock

from jobs import energy as energy_lib
from jobs.checkpoint import load_checkpoint, save_checkpoint
from jobs.energy import EnergyMeter, choose_headline, empty_totals, energy_attributes, normalise_carried
from jobs.nvml_energy import NvmlCounter, gpus_requested, visible_entries
from jobs.rapl_energy import RaplCounter, RaplUnavailableError, wrapped_delta
from jobs.result import read_summary, write_result
from pipeline.cell import CELL_FIELDS
from pipeline.ledger import Entry
from pipeline.slurm_energy import cell_energy_kwh, consumed_energy_kwh, parse_consumed_energy

MJ_PER_KWH = 3.6e9
UJ_PER_KWH = 3.6e12
NOT_SUPPORTED = 3
NOT_FOUND = 6
INVALID_ARGUMENT = 2
UNINITIALIZED = 1
GPU_IS_LOST = 15
LIBRARY_NOT_FOUND = 12

GPU_A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
GPU_B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
MIG_A1 = "MIG-a1a1a1a1-5555-6666-7777-888888888888"
MIG_A2 = "MIG-a2a2a2a2-5555-6666-7777-888888888888"


# ---------------------------------------------------------------------- fake NVML
class FakeGpu:
    def __init__(self, uuid: str, energy_mj: int | None = 1_000_000, migs: tuple[str, ...] = ()) -> None:
        self.uuid = uuid
        self.energy_mj = energy_mj  # None: no counter (NVML returns Not Supported)
        self.migs = list(migs)
        self.read_error: int | None = None  # NVML error code raised by the next reads


def fake_nvml(gpus: list[FakeGpu], init_error: int | None = None) -> types.ModuleType:
    """Build a module with the pynvml calls the energy code makes, over `gpus`."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            names = {
                NOT_SUPPORTED: "Not Supported",
                NOT_FOUND: "Not Found",
                LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
                GPU_IS_LOST: "GPU is lost",
                INVALID_ARGUMENT: "Invalid Argument",
            }
            return names.get(self.value, f"error {self.value}")

    nvml.NVMLError = NVMLError
    nvml.NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    nvml.inits = 0

    def init() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        nvml.inits += 1

    def shutdown() -> None:
        if nvml.inits == 0:
            raise NVMLError(UNINITIALIZED)
        nvml.inits -= 1

    def by_index(index: int):
        if not 0 <= index < len(gpus):
            raise NVMLError(INVALID_ARGUMENT)
        return ("gpu", index)

    def by_uuid(uuid: str):
        for index, gpu in enumerate(gpus):
            if gpu.uuid == uuid:
                return ("gpu", index)
            if uuid in gpu.migs:
                return ("mig", index, gpu.migs.index(uuid))
        raise NVMLError(NOT_FOUND)

    def uuid_of(handle) -> bytes:
        gpu = gpus[handle[1]]
        # Older pynvml returns bytes, newer str; bytes here exercises the decoding.
        return (gpu.uuid if handle[0] == "gpu" else gpu.migs[handle[2]]).encode()

    def max_migs(handle) -> int:
        if not gpus[handle[1]].migs:
            raise NVMLError(NOT_SUPPORTED)
        return len(gpus[handle[1]].migs)

    def energy(handle) -> int:
        if handle[0] == "mig":
            raise NVMLError(NOT_SUPPORTED)
        gpu = gpus[handle[1]]
        if gpu.read_error is not None:
            raise NVMLError(gpu.read_error)
        if gpu.energy_mj is None:
            raise NVMLError(NOT_SUPPORTED)
        return gpu.energy_mj

    nvml.nvmlInit = init
    nvml.nvmlShutdown = shutdown
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = by_index
    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetUUID = uuid_of
    nvml.nvmlDeviceIsMigDeviceHandle = lambda handle: handle[0] == "mig"
    nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda handle: ("gpu", handle[1])
    nvml.nvmlDeviceGetMaxMigDeviceCount = max_migs
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = lambda handle, slot: ("mig", handle[1], slot)
    nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    return nvml


@pytest.fixture
def gpus(monkeypatch) -> list[FakeGpu]:
    """Two fake GPUs behind a fake pynvml; GPU A has two MIG slices."""
    devices = [FakeGpu(GPU_A, migs=(MIG_A1, MIG_A2)), FakeGpu(GPU_B, energy_mj=5_000_000)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    return devices


@pytest.fixture
def no_rapl(tmp_path) -> Path:
    """An empty powercap folder: RAPL is unavailable."""
    root = tmp_path / "no-powercap"
    root.mkdir()
    return root


def gpu_meter(root: Path, sources=("nvml", "rapl"), carried=None) -> EnergyMeter:
    return EnergyMeter("USA", carried, sources=sources, powercap_root=root, rapl_poll_s=0)


# ---------------------------------------------------------------------- fake RAPL
def write_zone(root: Path, zone: str, name: str, energy_uj: int, max_range_uj: int = 262_143_328_850) -> Path:
    path = root / zone
    path.mkdir(parents=True, exist_ok=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


def set_energy(zone: Path, energy_uj: int) -> None:
    # Replaced whole, as sysfs would, so the poll thread never reads a half-written file.
    fresh = zone / "energy_uj.new"
    fresh.write_text(f"{energy_uj}\n")
    os.replace(fresh, zone / "energy_uj")


@pytest.fixture
def rapl_root(tmp_path) -> Path:
    """Two packages plus a core subzone and a psys zone that must not be added."""
    root = tmp_path / "powercap"
    write_zone(root, "intel-rapl:0", "package-0", 1_000)
    write_zone(root, "intel-rapl:1", "package-1", 2_000)
    write_zone(root, "intel-rapl:0:0", "core", 500)
    write_zone(root, "intel-rapl:2", "psys", 9_000)
    return root


# ====================================================================== NVML
def test_visible_entries_forms():
    assert visible_entries(None) is None
    assert visible_entries("") == []
    assert visible_entries(" 0, 1 ") == ["0", "1"]
    assert gpus_requested("0")
    assert gpus_requested(GPU_A)
    assert gpus_requested(MIG_A1)
    assert not gpus_requested(None)
    assert not gpus_requested("")
    assert not gpus_requested("-1")
    assert not gpus_requested("NoDevFiles")


def test_nvml_start_and_end_readings(gpus, no_rapl, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    meter = gpu_meter(no_rapl)
    meter.start()
    gpus[0].energy_mj += 3_600_000  # 0.001 kWh
    gpus[1].energy_mj += 7_200_000  # 0.002 kWh
    attrs = meter.stop()

    assert attrs["nvml_kwh"] == pytest.approx(0.003)
    assert attrs["nvml_devices"] == f"{GPU_A},{GPU_B}"
    assert attrs["nvml_attempts"] == 1
    assert attrs["nvml_shared"] is False
    assert attrs["energy_source"] == "nvml"
    assert attrs["energy_kwh"] == pytest.approx(0.003)
    assert attrs["gpu_cell"] is True
    assert "rapl: attempt 1: no RAPL package zone" in attrs["unavailable"]
    assert "codecarbon: attempt 1: turned off" in attrs["unavailable"]
    assert sys.modules["pynvml"].inits == 0, "NVML must be shut down at stop"


def test_nvml_unset_visible_devices_reads_all(gpus, no_rapl, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = gpu_meter(no_rapl)
    meter.start()
    gpus[1].energy_mj += 3_600_000
    attrs = meter.stop()
    assert attrs["nvml_devices"] == f"{GPU_A},{GPU_B}"
    assert attrs["nvml_kwh"] == pytest.approx(0.001)
    assert attrs["gpu_cell"] is True


@pytest.mark.parametrize("entry", [GPU_B, "GPU-bbbb", "1"])
def test_nvml_uuid_prefix_and_index(gpus, no_rapl, monkeypatch, entry):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", entry)
    meter = gpu_meter(no_rapl)
    meter.start()
    gpus[0].energy_mj += 99_000_000  # not this job's GPU
    gpus[1].energy_mj += 3_600_000
    attrs = meter.stop()
    assert attrs["nvml_devices"] == GPU_B
    assert attrs["nvml_kwh"] == pytest.approx(0.001)


def test_nvml_mig_reads_parent_flagged_shared(gpus, no_rapl, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MIG_A1},{MIG_A2}")
    meter = gpu_meter(no_rapl)
    meter.start()
    gpus[0].energy_mj += 7_200_000
    gpus[1].energy_mj += 99_000_000
    attrs = meter.stop()

    # Two slices of one GPU: its counter is read once, not twice.
    assert attrs["nvml_kwh"] == pytest.approx(0.002)
    assert attrs["nvml_devices"] == f"{MIG_A1}+{MIG_A2} on {GPU_A}"
    assert attrs["nvml_shared"] is True
    # A shared counter is stored but never the headline, and rapl alone cannot
    # stand for a GPU cell.
    assert attrs["energy_source"] == "none"
    assert math.isnan(attrs["energy_kwh"])


@pytest.mark.parametrize("entry", ["MIG-a2a2", f"MIG-{GPU_A}/1/0"])
def test_nvml_mig_prefix_and_legacy_form(gpus, no_rapl, monkeypatch, entry):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", entry)
    counter = NvmlCounter(os.environ["CUDA_VISIBLE_DEVICES"])
    counter.start()
    gpus[0].energy_mj += 3_600_000
    assert counter.read_joules() == pytest.approx(3_600.0)
    assert counter.gpus[0].uuid == GPU_A
    assert counter.shared
    counter.close()


@pytest.mark.parametrize(
    ("value", "devices"),
    [("0,7,1", GPU_A), ("1,GPU-ffff,0", GPU_B), ("0,GPU-", GPU_A), ("0,0", GPU_A)],
)
def test_nvml_invalid_entry_hides_rest(gpus, monkeypatch, caplog, value, devices):
    # CUDA stops at the first entry that names no device; an ambiguous prefix ("GPU-") is one.
    counter = NvmlCounter(value)
    with caplog.at_level(logging.WARNING, logger="jobs.nvml_energy"):
        counter.start()
    assert counter.devices == devices
    if value != "0,0":
        assert "CUDA ignores it" in counter.note
    counter.close()


@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles"])
def test_nvml_no_visible_gpu(gpus, no_rapl, monkeypatch, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    attrs = run_meter(gpu_meter(no_rapl))
    assert "nvml: attempt 1: no GPU visible" in attrs["unavailable"]
    assert attrs["gpu_cell"] is False
    assert math.isnan(attrs["nvml_kwh"])
    assert sys.modules["pynvml"].inits == 0


def run_meter(meter: EnergyMeter) -> dict:
    meter.start()
    return meter.stop()


def test_nvml_counter_not_supported(gpus, no_rapl, monkeypatch, caplog):
    gpus[1].energy_mj = None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with caplog.at_level(logging.WARNING, logger="jobs.energy"):
        attrs = run_meter(gpu_meter(no_rapl))
    assert f"GPU {GPU_B}" in attrs["unavailable"]
    assert "Not Supported" in attrs["unavailable"]
    assert math.isnan(attrs["nvml_kwh"])
    assert attrs["nvml_attempts"] == 0
    assert attrs["energy_source"] == "none"
    assert sys.modules["pynvml"].inits == 0, "a failed start must shut NVML down"


def test_nvml_init_failure(monkeypatch, no_rapl):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([FakeGpu(GPU_A)], init_error=LIBRARY_NOT_FOUND))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    attrs = run_meter(gpu_meter(no_rapl))
    assert "nvml: attempt 1: NVML failed to initialise: NVML Shared Library Not Found" in attrs["unavailable"]
    # Without CUDA_VISIBLE_DEVICES or NVML nothing shows that the cell had a GPU.
    assert attrs["gpu_cell"] is False


def test_nvml_module_missing(monkeypatch, no_rapl):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    attrs = run_meter(gpu_meter(no_rapl))
    assert "pynvml (package nvidia-ml-py) cannot be imported" in attrs["unavailable"]
    assert attrs["gpu_cell"] is True


def test_nvml_failing_reads_warn_once(gpus, no_rapl, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    meter = gpu_meter(no_rapl)
    with caplog.at_level(logging.WARNING, logger="jobs.energy"):
        meter.start()
        gpus[1].energy_mj += 3_600_000
        first = meter.snapshot()
        gpus[1].read_error = GPU_IS_LOST
        for _ in range(5):
            meter.snapshot()
        attrs = meter.stop()

    warnings = [r.getMessage() for r in caplog.records if r.name == "jobs.energy"]
    assert [w for w in warnings if w.startswith("energy source nvml")] == [
        "energy source nvml unavailable: reading the energy counter of GPU "
        f"{GPU_B} failed: GPU is lost"
    ]
    assert first["nvml_attempts"] == 1
    # The last good reading is kept, but the attempt no longer counts as covered.
    assert attrs["nvml_kwh"] == pytest.approx(0.001)
    assert attrs["nvml_attempts"] == 0
    assert attrs["energy_source"] == "none"


def test_nvml_counter_going_back(gpus):
    counter = NvmlCounter("0")
    counter.start()
    gpus[0].energy_mj -= 1
    with pytest.raises(energy_lib.NvmlUnavailableError, match="went back"):
        counter.read_joules()
    counter.close()


# ====================================================================== RAPL
def test_wrapped_delta():
    assert wrapped_delta(100, 250, 1_000) == 150
    assert wrapped_delta(900, 50, 1_000) == 151  # 100 to the top, 1 for the wrap to 0, 50 after
    assert wrapped_delta(7, 7, 1_000) == 0


def test_rapl_packages_with_wraparound(rapl_root):
    max_range = 262_143_328_850
    counter = RaplCounter(rapl_root, poll_s=0)
    counter.start()
    assert counter.devices == "intel-rapl:0 (package-0),intel-rapl:1 (package-1)"
    set_energy(rapl_root / "intel-rapl:0", max_range - 1_000 + 1_000)  # = max, no wrap yet
    set_energy(rapl_root / "intel-rapl:1", 2_000 + 5_000_000)
    set_energy(rapl_root / "intel-rapl:0:0", 10**9)  # subzone: not added
    set_energy(rapl_root / "intel-rapl:2", 10**9)  # psys: not added
    first = counter.read_joules()
    assert first == pytest.approx((max_range - 1_000 + 5_000_000) / 1e6)
    set_energy(rapl_root / "intel-rapl:0", 499)  # wrapped: 1 to reach 0, then 499
    second = counter.read_joules()
    assert second - first == pytest.approx(500 / 1e6)
    counter.close()


def test_rapl_meter_headline_for_cpu_cell(rapl_root, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_error=LIBRARY_NOT_FOUND))
    meter = EnergyMeter("USA", sources=("nvml", "rapl"), powercap_root=rapl_root, rapl_poll_s=0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(os.cpu_count() or 1)))
    meter.start()
    set_energy(rapl_root / "intel-rapl:0", 1_000 + 3_600_000_000)  # 3600 J
    attrs = meter.stop()
    assert attrs["energy_source"] == "rapl"
    assert attrs["energy_kwh"] == pytest.approx(0.001)
    assert attrs["rapl_shared"] is False
    assert attrs["rapl_devices"] == "intel-rapl:0 (package-0),intel-rapl:1 (package-1)"


def test_rapl_shared_when_cpus_restricted(rapl_root, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    attrs = run_meter(EnergyMeter("USA", sources=("rapl",), powercap_root=rapl_root, rapl_poll_s=0))
    assert attrs["rapl_shared"] is True
    assert attrs["rapl_attempts"] == 1
    assert attrs["energy_source"] == "none"


def test_rapl_poll_thread_catches_two_wraps(tmp_path):
    # Two wraps between checkpoint reads would look like one, so the poll thread reads between them.
    root = tmp_path / "powercap"
    zone = write_zone(root, "intel-rapl:0", "package-0", 0, max_range_uj=999)
    counter = RaplCounter(root, poll_s=0.01)
    counter.start()
    for target in (800, 300, 900, 200):  # +800, +500 (wrap), +600, +300 (wrap)
        set_energy(zone, target)
        deadline = time.monotonic() + 10
        before = sum(z.total_uj for z in counter.zones)
        while sum(z.total_uj for z in counter.zones) == before and time.monotonic() < deadline:
            time.sleep(0.01)
    assert counter.read_joules() == pytest.approx(2_200 / 1e6)
    counter.close()
    assert counter._thread is None


def test_rapl_missing_root(tmp_path):
    with pytest.raises(RaplUnavailableError, match="no powercap folder"):
        RaplCounter(tmp_path / "absent", poll_s=0).start()


def test_rapl_counter_not_a_file(rapl_root):
    # Stands in for an unreadable file even when the tests run as root.
    (rapl_root / "intel-rapl:1" / "energy_uj").unlink()
    (rapl_root / "intel-rapl:1" / "energy_uj").mkdir()
    attrs = run_meter(EnergyMeter("USA", sources=("rapl",), powercap_root=rapl_root, rapl_poll_s=0))
    assert "rapl: attempt 1: cannot read RAPL zone" in attrs["unavailable"]
    assert math.isnan(attrs["rapl_kwh"])


def test_rapl_permission_denied(rapl_root, monkeypatch):
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    attrs = run_meter(EnergyMeter("USA", sources=("rapl",), powercap_root=rapl_root, rapl_poll_s=0))
    assert "Permission denied" in attrs["unavailable"]
    assert attrs["rapl_attempts"] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_rapl_mode_000_file(rapl_root):
    path = rapl_root / "intel-rapl:0" / "energy_uj"
    path.chmod(0)
    try:
        with pytest.raises(RaplUnavailableError, match="Permission denied"):
            RaplCounter(rapl_root, poll_s=0).start()
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_nvml_and_rapl_summed(gpus, rapl_root, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(os.cpu_count() or 1)))
    meter = gpu_meter(rapl_root)
    meter.start()
    gpus[1].energy_mj += 7_200_000  # 0.002 kWh
    set_energy(rapl_root / "intel-rapl:1", 2_000 + 3_600_000_000)  # 0.001 kWh
    attrs = meter.stop()
    assert attrs["energy_source"] == "nvml+rapl"
    assert attrs["energy_kwh"] == pytest.approx(0.003)


# ====================================================================== headline rule
@pytest.mark.parametrize(
    ("covered", "shared", "gpu_cell", "expected"),
    [
        ({"nvml": 2, "rapl": 2, "codecarbon": 2}, {}, True, "nvml+rapl"),
        ({"nvml": 2, "rapl": 1, "codecarbon": 2}, {}, True, "nvml"),
        ({"nvml": 1, "rapl": 2, "codecarbon": 2}, {}, True, "codecarbon"),
        ({"nvml": 0, "rapl": 2, "codecarbon": 2}, {}, False, "rapl"),
        ({"nvml": 2, "rapl": 2, "codecarbon": 2}, {"rapl": True}, True, "nvml"),
        ({"nvml": 2, "rapl": 2, "codecarbon": 0}, {"nvml": True, "rapl": True}, True, "none"),
        ({"nvml": 0, "rapl": 0, "codecarbon": 1}, {}, False, "none"),
    ],
)
def test_headline_rule(covered, shared, gpu_cell, expected):
    totals = empty_totals()
    totals.update(attempts=2, gpu_cell=gpu_cell, nvml_kwh=2.0, rapl_kwh=1.0, codecarbon_kwh=4.0)
    for source, count in covered.items():
        totals[f"{source}_attempts"] = count
    for source, flag in shared.items():
        totals[f"{source}_shared"] = flag
    source, kwh = choose_headline(totals)
    assert source == expected
    values = {"nvml+rapl": 3.0, "nvml": 2.0, "rapl": 1.0, "codecarbon": 4.0}
    if expected == "none":
        assert math.isnan(kwh)
    else:
        assert kwh == values[expected]


def test_unknown_source_rejected():
    with pytest.raises(ValueError, match=r"unknown energy sources \['wattmeter'\]"):
        EnergyMeter("USA", sources=("nvml", "wattmeter"))


# ====================================================================== requeues
def test_requeue_accumulates_without_double_counting(gpus, rapl_root, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(os.cpu_count() or 1)))
    package = rapl_root / "intel-rapl:0"

    # Attempt A: two checkpoints, then killed with energy used after the last one.
    meter_a = gpu_meter(rapl_root)
    meter_a.start()
    gpus[1].energy_mj += 3_600_000
    meter_a.snapshot()
    gpus[1].energy_mj += 3_600_000
    set_energy(package, 1_000 + 3_600_000_000)
    checkpoint = tmp_path / "cell.pt"
    save_checkpoint(checkpoint, {"energy": meter_a.snapshot()})
    gpus[1].energy_mj += 36_000_000  # lost: after the last checkpoint
    set_energy(package, 1_000 + 7_200_000_000)  # lost as well

    # Attempt B resumes from the checkpoint on the same node.
    carried = load_checkpoint(checkpoint)["energy"]
    assert carried["attempts"] == 1
    meter_b = gpu_meter(rapl_root, carried=carried)
    meter_b.start()
    gpus[1].energy_mj += 3_600_000
    set_energy(package, 1_000 + 10_800_000_000)
    attrs = meter_b.stop()

    assert attrs["attempts"] == 2
    assert attrs["nvml_attempts"] == 2
    assert attrs["nvml_kwh"] == pytest.approx(0.003)  # 0.002 from A up to its checkpoint, 0.001 from B
    assert attrs["rapl_kwh"] == pytest.approx(0.002)
    assert attrs["energy_source"] == "nvml+rapl"
    assert attrs["energy_kwh"] == pytest.approx(0.005)
    assert attrs["nvml_devices"] == GPU_B
    assert attrs["duration_s"] >= carried["duration_s"]


def test_requeue_source_missing_in_one_attempt(gpus, no_rapl, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    meter_a = gpu_meter(no_rapl)
    meter_a.start()
    gpus[1].energy_mj += 3_600_000
    carried = meter_a.snapshot()

    # Attempt B lands on a node whose GPU has no counter.
    gpus[1].energy_mj = None
    attrs = run_meter(gpu_meter(no_rapl, carried=carried))
    assert attrs["nvml_attempts"] == 1
    assert attrs["attempts"] == 2
    assert attrs["nvml_kwh"] == pytest.approx(0.001)
    assert attrs["energy_source"] == "none", "nvml covered one attempt of two, so it cannot be the headline"
    assert "nvml: attempt 2: GPU" in attrs["unavailable"]


def test_carried_old_format_and_newer_format():
    old = {
        "energy_kwh_modelled": 0.5, "cpu_kwh": 0.1, "gpu_kwh": 0.3, "ram_kwh": 0.1,
        "emissions_kg": 0.2, "duration_s": 60.0,
    }
    totals = normalise_carried(old)
    assert totals["codecarbon_kwh"] == 0.5
    assert totals["codecarbon_gpu_kwh"] == 0.3
    assert totals["attempts"] == 1
    attrs = energy_attributes(totals, "USA")
    assert attrs["energy_source"] == "codecarbon"
    assert attrs["emissions_kg"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="energy snapshot format 99 is newer"):
        normalise_carried({"format": 99})


@pytest.mark.parametrize(
    "carried", [{"format": 99}, {"format": 2, "attempts": "many"}, {"format": 2, "unavailable": "x"}]
)
def test_unreadable_carried_totals(gpus, no_rapl, monkeypatch, carried):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    meter = gpu_meter(no_rapl, carried=carried)
    meter.start()
    gpus[0].energy_mj += 3_600_000
    attrs = meter.stop()
    assert attrs["attempts"] == 2
    assert attrs["nvml_kwh"] == pytest.approx(0.001)
    assert attrs["energy_source"] == "none", "the unmeasured earlier attempts rule out a headline"
    assert "carried: energy totals of earlier attempts unreadable" in attrs["unavailable"]


# ====================================================================== codecarbon
@pytest.fixture
def stale_lock(tmp_path, monkeypatch) -> Path:
    """A lock file left by a killed codecarbon run, at the path codecarbon checks."""
    lock = tmp_path / ".codecarbon.lock"
    lock.write_text("")
    monkeypatch.setattr(codecarbon.lock, "LOCKFILE", str(lock))
    return lock


def test_codecarbon_measures_despite_stale_lock(stale_lock, no_rapl, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = EnergyMeter("USA", sources=("codecarbon",), powercap_root=no_rapl)
    meter.start()
    sum(i * i for i in range(200_000))
    snapshot = meter.snapshot()
    attrs = meter.stop()

    assert stale_lock.exists()
    assert attrs["codecarbon_attempts"] == 1
    assert attrs["energy_source"] == "codecarbon"
    assert attrs["energy_kwh"] > 0
    assert attrs["energy_kwh"] >= snapshot["codecarbon_kwh"]
    assert attrs["energy_kwh_modelled"] == attrs["energy_kwh"]
    assert attrs["emissions_kg"] == pytest.approx(attrs["emissions_kg_modelled"])
    assert attrs["grid_intensity_kg_per_kwh"] == pytest.approx(energy_lib.country_intensity("USA"))
    assert "codecarbon" not in attrs["unavailable"]


def test_codecarbon_lock_reported_when_honoured(stale_lock):
    # With allow_multiple_runs off, codecarbon obeys the lock, and the meter must report that, not 0 kWh.
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        tracker = energy_lib._Codecarbon("USA", 15.0, allow_multiple_runs=False)
        with pytest.raises(energy_lib.CodecarbonUnavailableError, match=re.escape(str(stale_lock))):
            tracker.start()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_codecarbon_requeue_adds_attempts(no_rapl, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter_a = EnergyMeter("FRA", sources=("codecarbon",), powercap_root=no_rapl)
    meter_a.start()
    carried = meter_a.snapshot()
    meter_a.stop()  # only to end its threads; a killed attempt never gets here

    meter_b = EnergyMeter("FRA", carried, sources=("codecarbon",), powercap_root=no_rapl)
    meter_b.start()
    attrs = meter_b.stop()
    assert attrs["attempts"] == 2
    assert attrs["codecarbon_attempts"] == 2
    assert attrs["codecarbon_kwh"] > carried["codecarbon_kwh"]
    assert attrs["codecarbon_duration_s"] > carried["codecarbon_duration_s"]
    assert attrs["country_iso_code"] == "FRA"


def test_codecarbon_failing_snapshot_stops_tracker(no_rapl, monkeypatch, caplog):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = EnergyMeter("USA", sources=("codecarbon",), powercap_root=no_rapl)
    meter.start()
    tracker = meter.counters["codecarbon"].tracker
    first = meter.snapshot()

    def broken() -> None:
        raise RuntimeError("sensor vanished")

    monkeypatch.setattr(tracker, "_measure_power_and_energy", broken)
    with caplog.at_level(logging.WARNING, logger="jobs.energy"):
        meter.snapshot()
        meter.snapshot()
        attrs = meter.stop()

    assert caplog.text.count("energy source codecarbon unavailable") == 1
    assert "codecarbon reading failed: sensor vanished" in attrs["unavailable"]
    assert attrs["codecarbon_kwh"] == pytest.approx(first["codecarbon_kwh"])
    assert attrs["codecarbon_attempts"] == 0
    assert math.isnan(attrs["energy_kwh_modelled"])
    assert tracker._scheduler is None, "the tracker's threads must be stopped"


# ====================================================================== result file
def test_attributes_stored_in_result_file(gpus, no_rapl, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    meter = gpu_meter(no_rapl)
    meter.start()
    gpus[0].energy_mj += 3_600_000
    energy = meter.stop()

    path = tmp_path / "cell.h5"
    row = {name: "x" for name in CELL_FIELDS}
    write_result(path, row, "done", {"val_bpb": 1.0}, {}, {}, {"host": "h"}, energy, "fingerprint")
    with h5py.File(path, "r") as f:
        stored = dict(f["energy"].attrs)
    assert set(stored) == set(energy)
    for name in ("energy_kwh", "energy_source", "energy_kwh_modelled", "emissions_kg", "unavailable",
                 "nvml_kwh", "nvml_devices", "nvml_duration_s", "nvml_method", "rapl_kwh", "codecarbon_kwh"):
        assert name in stored, name
    summary = read_summary(path)
    assert summary["energy_source"] == "nvml"
    assert summary["energy_kwh"] == pytest.approx(0.001)
    assert math.isnan(summary["energy_kwh_modelled"])


# ====================================================================== SLURM
# Captured on the test cluster (slurm-wlm 22.05.8, AcctGatherEnergyType =
# acct_gather_energy/none) with
#   sacct -j 13_3,19_4,19_5,19 -o JobID,ConsumedEnergyRaw --parsable2 -n
# while 19_5 ran and 19_6..19_35 were pending; a running job's own line is empty.
SACCT_CAPTURED = """\
13_3|0
13_3.batch|0
13_3.0|0
19_0|0
19_0.batch|0
19_0.0|0
19_4|0
19_4.batch|0
19_4.0|0
19_5|
19_5.batch|0
19_5.0|0
19_[6-35%36]|0
"""

# Written by hand in the same format, for a cluster that records energy: 124 was
# requeued once (two lines with --duplicates), 126 has SLURM's NO_VAL64 value.
SACCT_WITH_ENERGY = """\
123|7200000
123.batch|7100000
123.extern|100
124|3600000
124|1800000
124.batch|1700000
125_2|3600000
125_2.0|3600000
126|18446744073709551614
127|3600000
127|0
"""


def test_sacct_parse_captured_not_recorded():
    energy = parse_consumed_energy(SACCT_CAPTURED)
    assert set(energy) == {"13_3", "19_0", "19_4", "19_5", "19_[6-35%36]"}
    assert all(value is None for value in energy.values()), "0 and empty mean not recorded"


def test_sacct_parse_recorded_energy():
    energy = parse_consumed_energy(SACCT_WITH_ENERGY)
    assert energy["123"] == pytest.approx(2.0)
    assert energy["124"] == pytest.approx(1.5)  # both runs of the requeued job
    assert energy["125_2"] == pytest.approx(1.0)
    assert energy["126"] is None
    assert energy["127"] is None, "one run not recorded: the sum would undercount"
    assert "123.batch" not in energy


def test_sacct_parse_skips_malformed(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.slurm_energy"):
        energy = parse_consumed_energy("123|3600000\nsacct: error: something\n\n124|x|y\n")
    assert energy == {"123": pytest.approx(1.0)}
    assert "skipped 2 line(s)" in caplog.text


def fake_sacct(tmp_path: Path, output: str, exit_code: int = 0) -> tuple[str, Path]:
    """Write a sacct stand-in that logs its arguments, one line per call."""
    calls = tmp_path / "sacct-calls.txt"
    script = tmp_path / "sacct"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{calls}"\n'
        f"cat <<'EOF'\n{output}EOF\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return str(script), calls


def test_consumed_energy_one_call(tmp_path):
    output = "50_0|3600000\n50_0.batch|3600000\n50_1|0\n50_2|7200000\n51|3600000\n"
    sacct, calls = fake_sacct(tmp_path, output)
    energy = consumed_energy_kwh(["50_0", "50_1", "51", "12345-local", "50_0"], sacct=sacct)

    assert calls.read_text().splitlines() == [
        "-j 50,51 -o JobID,ConsumedEnergyRaw --parsable2 -n --duplicates"
    ]
    assert energy == {"50_0": pytest.approx(1.0), "50_1": None, "51": pytest.approx(1.0), "12345-local": None}


def test_consumed_energy_sacct_failure(tmp_path, caplog):
    sacct, _ = fake_sacct(tmp_path, "", exit_code=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.slurm_energy"):
        energy = consumed_energy_kwh(["7", "8"], sacct=sacct)
    assert energy == {"7": None, "8": None}
    assert "sacct failed with exit code 1" in caplog.text
    assert consumed_energy_kwh(["7"], sacct=str(tmp_path / "absent")) == {"7": None}


def test_cell_energy_from_ledger(tmp_path):
    sacct, calls = fake_sacct(tmp_path, "60|3600000\n61|7200000\n62|0\n63|3600000\n")
    entries = [
        Entry("cell-a", "60", "slurm", "logs", 1.0, 1),
        Entry("cell-a", "61", "slurm", "logs", 2.0, 2),  # resubmitted: both jobs count
        Entry("cell-b", "62", "slurm", "logs", 1.0, 1),
        Entry("cell-c", "4242", "local", "logs", 1.0, 1),
        Entry("cell-d", "63", "slurm", "logs", 1.0, 1),
        Entry("cell-e", "63", "slurm", "logs", 1.0, 1),  # one job ran two cells
    ]
    energy = cell_energy_kwh(entries, sacct=sacct)
    assert energy == {"cell-a": pytest.approx(3.0), "cell-b": None, "cell-c": None, "cell-d": None, "cell-e": None}
    assert len(calls.read_text().splitlines()) == 1


def _finished_job_id() -> str | None:
    from tests.slurm_cluster import accounting_responds

    if shutil.which("sacct") is None or not accounting_responds():
        return None
    listing = subprocess.run(
        ["sacct", "-X", "-n", "--parsable2", "-a", "-S", "now-30days", "-o", "JobID,State"],
        capture_output=True, text=True, timeout=30,
    ).stdout.splitlines()
    ids = [
        job_id
        for job_id, _, state in (line.partition("|") for line in listing)
        if state == "COMPLETED" and re.match(r"^\d+(_\d+)?$", job_id)
    ]
    return ids[-1] if ids else None


@pytest.mark.slurm
def test_sacct_real_cluster_parse():
    job_id = _finished_job_id()
    if job_id is None:
        pytest.skip("no SLURM accounting responds here, or it holds no finished job")
    raw = subprocess.run(
        ["sacct", "-j", job_id, "-o", "JobID,ConsumedEnergyRaw", "--parsable2", "-n"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    parsed = parse_consumed_energy(raw)
    assert job_id in parsed
    energy = consumed_energy_kwh([job_id])
    assert energy[job_id] == parsed[job_id]
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    if re.search(r"AcctGatherEnergyType\s*=\s*acct_gather_energy/none", config):
        assert energy[job_id] is None, f"no energy plugin, so {raw!r} must read as not recorded"
