"""GPU energy from NVML's total-energy counter, for the GPUs this job was given.

``nvmlDeviceGetTotalEnergyConsumption`` returns the millijoules a GPU has used
since the driver was loaded; NVML documents it for Volta and newer GPUs and
returns Not Supported on older ones. The energy of an attempt is the end
reading minus the start reading, summed over the job's GPUs.

The GPUs come from ``CUDA_VISIBLE_DEVICES``, read the way CUDA reads it:

- unset: every GPU that NVML lists;
- a comma-separated list of entries, each an index, a GPU UUID
  (``GPU-8932f937-...``) or a MIG device UUID (``MIG-...``, or the older
  ``MIG-GPU-<uuid>/<gi>/<ci>``). A UUID may be shortened to any prefix that
  matches one device only;
- the first entry that names no device hides itself and every entry after
  it, so "" , "-1" and SLURM's "NoDevFiles" mean no GPU.

A MIG slice has no energy counter of its own. Its energy is read from the
parent GPU's counter, which also counts the other slices, so the reading is
flagged as shared (`NvmlCounter.shared`). Two slices of one GPU count that
GPU once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

METHOD = "NVML nvmlDeviceGetTotalEnergyConsumption (millijoules), end minus start, summed over GPUs"


class NvmlUnavailableError(RuntimeError):
    """NVML cannot measure the job's GPUs; the message gives the reason."""


class _InvalidEntry(ValueError):
    """A CUDA_VISIBLE_DEVICES entry that names no device."""


@dataclass(frozen=True)
class Gpu:
    """One physical GPU whose counter is read.

    Attributes
    ----------
    entry
        The CUDA_VISIBLE_DEVICES entry that named it ("0", "GPU-...", "MIG-...").
    uuid
        UUID of the physical GPU whose counter is read.
    mig_uuid
        UUID of the MIG slice the job was given, or "" for a whole GPU.
    """

    entry: str
    uuid: str
    mig_uuid: str
    handle: Any

    @property
    def label(self) -> str:
        return f"{self.mig_uuid} on {self.uuid}" if self.mig_uuid else self.uuid


def visible_entries(value: str | None) -> list[str] | None:
    """Split CUDA_VISIBLE_DEVICES into stripped entries; None when it is unset."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",")] if value.strip() else []


def _looks_like_device(entry: str) -> bool:
    return entry.isdigit() or entry.startswith(("GPU-", "MIG-"))


def gpus_requested(value: str | None) -> bool:
    """Return whether CUDA_VISIBLE_DEVICES names at least one device (unset: unknown, False)."""
    entries = visible_entries(value)
    return bool(entries) and _looks_like_device(entries[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_mig_handle(nvml: ModuleType, handle: Any) -> bool:
    try:
        flag = nvml.nvmlDeviceIsMigDeviceHandle(handle)
    except nvml.NVMLError:  # drivers before MIG lack the call, so the handle is a whole GPU
        return False
    return bool(getattr(flag, "value", flag))


def _uuid_matches(nvml: ModuleType, prefix: str, count: int) -> list[Any]:
    """Return the handles (GPUs, and MIG devices for "MIG-") whose UUID starts with `prefix`."""
    matches = []
    for index in range(count):
        try:
            gpu = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError:  # a GPU this job may not open (device cgroup)
            continue
        if prefix.startswith("GPU-"):
            if _text(nvml.nvmlDeviceGetUUID(gpu)).startswith(prefix):
                matches.append(gpu)
            continue
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)
        except nvml.NVMLError:
            continue
        for slot in range(slots):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
            except nvml.NVMLError:  # an empty slot
                continue
            if _text(nvml.nvmlDeviceGetUUID(mig)).startswith(prefix):
                matches.append(mig)
    return matches


def _handle_by_uuid(nvml: ModuleType, uuid: str, count: int) -> Any:
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except nvml.NVMLError:
        pass
    # CUDA accepts any unambiguous prefix of a UUID; NVML wants the whole UUID.
    matches = _uuid_matches(nvml, uuid, count)
    if len(matches) != 1:
        raise _InvalidEntry(f"matches {len(matches)} devices")
    return matches[0]


def resolve_entry(nvml: ModuleType, entry: str, count: int) -> Gpu:
    """Return the physical GPU that one CUDA_VISIBLE_DEVICES entry names.

    Raises
    ------
    _InvalidEntry
        If the entry names no device, or a UUID prefix matches several.
    """
    if entry.isdigit():
        index = int(entry)
        if index >= count:
            raise _InvalidEntry(f"is out of range (NVML lists {count} GPUs)")
        # NOTE: CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID,
        # and NVML numbers them by PCI bus, so an index may name another GPU of the
        # node. The sum over all of a node's GPUs is the same either way.
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    elif entry.startswith("MIG-GPU-"):
        # Older form MIG-GPU-<gpu uuid>/<gpu instance>/<compute instance>: the parent is named.
        handle = _handle_by_uuid(nvml, entry[len("MIG-") :].split("/", 1)[0], count)
        return Gpu(entry, _text(nvml.nvmlDeviceGetUUID(handle)), entry, handle)
    elif entry.startswith(("GPU-", "MIG-")):
        handle = _handle_by_uuid(nvml, entry, count)
    else:
        raise _InvalidEntry("is neither an index nor a GPU-/MIG- UUID")

    if _is_mig_handle(nvml, handle):
        mig_uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        return Gpu(entry, _text(nvml.nvmlDeviceGetUUID(parent)), mig_uuid, parent)
    return Gpu(entry, _text(nvml.nvmlDeviceGetUUID(handle)), "", handle)


def resolve_visible(nvml: ModuleType, value: str | None) -> tuple[list[Gpu], str]:
    """Return the GPUs CUDA_VISIBLE_DEVICES gives this job, one per physical GPU, and a note.

    The note is empty, or names the entry that CUDA ignores together with the entries after it.
    """
    count = int(nvml.nvmlDeviceGetCount())
    entries = visible_entries(value)
    if entries is None:
        entries = [str(index) for index in range(count)]
    gpus: list[Gpu] = []
    note = ""
    for entry in entries:
        try:
            gpu = resolve_entry(nvml, entry, count)
        except _InvalidEntry as err:
            note = f"CUDA_VISIBLE_DEVICES entry {entry!r} {err}, so CUDA ignores it and the entries after it"
            break
        if all(known.uuid != gpu.uuid for known in gpus):
            gpus.append(gpu)
        elif gpu.mig_uuid:
            # A second slice of a GPU already listed: keep one counter, name both slices.
            first = next(known for known in gpus if known.uuid == gpu.uuid)
            merged = Gpu(first.entry, first.uuid, f"{first.mig_uuid}+{gpu.mig_uuid}", first.handle)
            gpus[gpus.index(first)] = merged
    return gpus, note


class NvmlCounter:
    """Energy of the job's GPUs since `start`, from NVML's total-energy counters.

    Parameters
    ----------
    visible_devices
        The value of CUDA_VISIBLE_DEVICES, or None when it is unset.
    """

    def __init__(self, visible_devices: str | None) -> None:
        self.visible_devices = visible_devices
        self.gpus: list[Gpu] = []
        self.note = ""
        self._start_mj: list[int] = []
        self._nvml: ModuleType | None = None

    @property
    def devices(self) -> str:
        return ",".join(gpu.label for gpu in self.gpus)

    @property
    def shared(self) -> bool:
        """Whether any reading is a MIG parent's counter that other slices also feed."""
        return any(gpu.mig_uuid for gpu in self.gpus)

    def start(self) -> None:
        """Initialise NVML, resolve the GPUs and take the start readings.

        Raises
        ------
        NvmlUnavailableError
            If pynvml is missing, NVML fails to initialise, no GPU is visible,
            or a GPU has no energy counter. NVML is shut down again first.
        """
        try:
            import pynvml as nvml  # the nvidia-ml-py package
        except ImportError as err:
            raise NvmlUnavailableError(f"pynvml (package nvidia-ml-py) cannot be imported: {err}") from err
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise NvmlUnavailableError(f"NVML failed to initialise: {err}") from err
        self._nvml = nvml
        try:
            self.gpus, self.note = resolve_visible(nvml, self.visible_devices)
            if self.note:
                log.warning("%s", self.note)
            if not self.gpus:
                raise NvmlUnavailableError(f"no GPU visible (CUDA_VISIBLE_DEVICES={self.visible_devices!r})")
            self._start_mj = self._read_mj()
        except NvmlUnavailableError:
            self.close()
            raise
        except nvml.NVMLError as err:
            self.close()
            raise NvmlUnavailableError(f"NVML failed while listing GPUs: {err}") from err

    def _read_mj(self) -> list[int]:
        nvml = self._nvml
        assert nvml is not None, "start() first"
        readings = []
        for gpu in self.gpus:
            try:
                readings.append(int(nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)))
            except nvml.NVMLError as err:
                if getattr(err, "value", None) == nvml.NVML_ERROR_NOT_SUPPORTED:
                    raise NvmlUnavailableError(
                        f"GPU {gpu.uuid} (CUDA_VISIBLE_DEVICES entry {gpu.entry!r}) has no total energy "
                        "counter (NVML returned Not Supported, and the counter needs a Volta or newer GPU)"
                    ) from err
                raise NvmlUnavailableError(f"reading the energy counter of GPU {gpu.uuid} failed: {err}") from err
        return readings

    def read_joules(self) -> float:
        """Return the energy of the job's GPUs since `start`, in joules.

        Raises
        ------
        NvmlUnavailableError
            If a reading fails, or a counter went backwards (the driver was
            reloaded, which resets it).
        """
        now = self._read_mj()
        total_mj = 0
        for gpu, before, after in zip(self.gpus, self._start_mj, now):
            if after < before:
                raise NvmlUnavailableError(
                    f"energy counter of GPU {gpu.uuid} went back from {before} to {after} mJ (driver reloaded?)"
                )
            total_mj += after - before
        return total_mj / 1000.0

    def close(self) -> None:
        """Shut NVML down once (NVML counts inits, so other users such as codecarbon are unaffected)."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as err:
                log.debug("nvmlShutdown failed: %s", err)
            self._nvml = None
