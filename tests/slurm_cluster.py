"""Helpers for tests that run against the single-node SLURM cluster.

``tests/slurm/cluster.sh up`` starts that cluster. The helpers here query it
and change it for one test at a time: lower ``MaxArraySize``, stop the
accounting daemon, wait for the node to become idle. Each change is undone
when its context manager exits, even if the test fails.

The helpers edit ``/etc/slurm/slurm.conf`` (or ``$SLURM_CONF``) and signal
daemons by the pid files named in the configs, so the ones that change the
cluster need root, like ``cluster.sh``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLUSTER_SCRIPT = Path(__file__).resolve().parent / "slurm" / "cluster.sh"
SLURM_CONF = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
SLURMDBD_CONF = SLURM_CONF.with_name("slurmdbd.conf")

# Slurm clients retry for about 10 s when a daemon is down, so a shorter
# limit would report a slow reply as a dead daemon.
COMMAND_TIMEOUT_S = 30.0
# Apt may install four packages and their dependencies first.
CLUSTER_UP_TIMEOUT_S = 900.0
# The largest MaxArraySize that slurm.conf(5) of Slurm 22.05 allows.
MAX_ARRAY_SIZE_LIMIT = 4_000_001


class SlurmClusterError(RuntimeError):
    """A command against the test cluster failed or timed out."""


class ClusterUnavailableError(SlurmClusterError):
    """No cluster runs, and this machine cannot start one (not root, not Debian)."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster, as tests need to address it.

    Attributes
    ----------
    name : str
        ``ClusterName`` from slurm.conf, as sacct and sacctmgr show it.
    partition : str
        The default partition, where jobs without ``--partition`` go.
    nodes : tuple of str
        Node names that sinfo lists.
    """

    name: str
    partition: str
    nodes: tuple[str, ...]


def _run(args: list[str], *, timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output, and raise SlurmClusterError if it fails."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as error:
        raise SlurmClusterError(f"{args[0]} not found on PATH; start the cluster with 'sudo {CLUSTER_SCRIPT} up'") from error
    except subprocess.TimeoutExpired as error:
        raise SlurmClusterError(f"{' '.join(args)} timed out after {timeout:.0f} s") from error
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise SlurmClusterError(f"{' '.join(args)} failed with exit code {result.returncode}: {output}")
    return result


# ------------------------------------------------------------------ queries


def node_states() -> list[str]:
    """Return the state of each node as sinfo prints it, for example ``idle`` or ``down*``.

    Returns an empty list when sinfo is missing or slurmctld does not respond.
    """
    if shutil.which("sinfo") is None:
        return []
    try:
        result = _run(["sinfo", "--noheader", "--Node", "--format=%T"], check=False)
    except SlurmClusterError:
        return []
    if result.returncode != 0:
        return []
    return result.stdout.split()


def accounting_responds() -> bool:
    """Return whether sacct can read job records, that is, slurmdbd and its database respond."""
    try:
        result = _run(["sacct", "--noheader", "--allocations", "--starttime=now", "--format=JobID"], check=False)
    except SlurmClusterError:
        return False
    return result.returncode == 0


def current_max_array_size() -> int:
    """Return the ``MaxArraySize`` that slurmctld uses now (from ``scontrol show config``)."""
    output = _run(["scontrol", "show", "config"]).stdout
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", output, flags=re.MULTILINE)
    if match is None:
        raise SlurmClusterError("'scontrol show config' printed no MaxArraySize line")
    return int(match.group(1))


def sacct_states(job_id: str) -> dict[str, str]:
    """Return ``{JobID: State}`` for a job and its steps as accounting records them.

    Parameters
    ----------
    job_id : str
        A job id; for an array job, the array's id (``"12"``) lists every
        task (``"12_0"``, ``"12_1"``, ...) and their steps (``"12_0.batch"``).
    """
    output = _run(["sacct", "-j", job_id, "-o", "JobID,State", "--parsable2", "-n"]).stdout
    states = {}
    for line in output.splitlines():
        if "|" in line:
            step_id, state = line.split("|", 1)
            states[step_id] = state
    return states


def describe_cluster() -> SlurmCluster:
    """Return the name, default partition and nodes of the running cluster."""
    config = _run(["scontrol", "show", "config"]).stdout
    match = re.search(r"^ClusterName\s*=\s*(\S+)\s*$", config, flags=re.MULTILINE)
    if match is None:
        raise SlurmClusterError("'scontrol show config' printed no ClusterName line")

    partitions = _run(["sinfo", "--noheader", "--format=%P"]).stdout.split()
    # sinfo marks the default partition with a trailing '*'.
    defaults = [name.rstrip("*") for name in partitions if name.endswith("*")]
    if not defaults:
        raise SlurmClusterError(f"no default partition among {partitions}; set Default=YES on one in {SLURM_CONF}")

    nodes = _run(["sinfo", "--noheader", "--Node", "--format=%N"]).stdout.split()
    return SlurmCluster(name=match.group(1), partition=defaults[0], nodes=tuple(dict.fromkeys(nodes)))


# ------------------------------------------------------------------ waiting


def _wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    """Call predicate until it returns True or timeout seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_idle(timeout: float = 60.0) -> None:
    """Wait until every node is idle, that is, no job has any of its CPUs allocated.

    Raises
    ------
    TimeoutError
        If a node is still busy or down after ``timeout`` seconds; the
        message shows the states sinfo printed last.
    """
    states: list[str] = []

    def all_idle() -> bool:
        nonlocal states
        states = node_states()
        return bool(states) and all(state == "idle" for state in states)

    if not _wait_for(all_idle, timeout):
        raise TimeoutError(
            f"nodes not idle after {timeout:.0f} s; sinfo shows {states or 'nothing (slurmctld down?)'}; "
            "cancel leftover jobs with 'scancel --user=$USER'"
        )


def _wait_controller(timeout: float) -> None:
    def controller_up() -> bool:
        try:
            return "is UP" in _run(["scontrol", "ping"], check=False).stdout
        except SlurmClusterError:
            return False

    if not _wait_for(controller_up, timeout):
        raise TimeoutError(f"slurmctld did not respond 'scontrol ping' within {timeout:.0f} s")


# ------------------------------------------------------------------ daemons


def _config_value(path: Path, key: str) -> str:
    """Return the value of ``key=value`` in a Slurm config file (keys are case-insensitive)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise SlurmClusterError(f"cannot read {path}: {error}; the helpers that change the cluster need root") from error
    match = re.search(rf"^\s*{re.escape(key)}\s*=\s*(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
    if match is None:
        raise SlurmClusterError(f"{path} sets no {key}; regenerate it with 'sudo {CLUSTER_SCRIPT} up'")
    return match.group(1)


def _live_pid(pid_file: Path, name: str) -> int | None:
    """Return the pid in pid_file if that process runs (not a zombie) under the given command name."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        # Field 3 of /proc/PID/stat is the state. Splitting on spaces is safe
        # because these daemon names contain none.
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (OSError, ValueError, IndexError):
        return None
    if comm != name or state == "Z":
        return None
    return pid


def _stop_daemon(name: str, pid_file: Path, timeout: float = 60.0) -> None:
    """Send SIGTERM to a daemon and wait until it has exited."""
    pid = _live_pid(pid_file, name)
    if pid is None:
        raise SlurmClusterError(f"{name} is not running (no live process in {pid_file}); start it with 'sudo {CLUSTER_SCRIPT} up'")
    os.kill(pid, signal.SIGTERM)
    if not _wait_for(lambda: _live_pid(pid_file, name) is None, timeout):
        raise TimeoutError(f"{name} (pid {pid}) did not exit within {timeout:.0f} s of SIGTERM")


def _start_daemon(name: str) -> None:
    """Start a Slurm daemon, which forks into the background and logs to the file its config names."""
    # The daemon must not inherit our pipes, or the next capture would wait for it.
    subprocess.run([name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=COMMAND_TIMEOUT_S)


def _restart_slurmctld(timeout: float = 60.0) -> None:
    pid_file = Path(_config_value(SLURM_CONF, "SlurmctldPidFile"))
    _stop_daemon("slurmctld", pid_file)
    _start_daemon("slurmctld")
    _wait_controller(timeout)


# ------------------------------------------------------------------ changes


def _replace_max_array_size(conf_text: str, size: int) -> str:
    """Return slurm.conf text with MaxArraySize set to size, appending the key if absent."""
    pattern = re.compile(r"^\s*MaxArraySize\s*=.*$", flags=re.MULTILINE | re.IGNORECASE)
    line = f"MaxArraySize={size}"
    if pattern.search(conf_text):
        return pattern.sub(line, conf_text)
    return conf_text.rstrip("\n") + "\n" + line + "\n"


def _write_conf(text: str) -> None:
    """Replace slurm.conf atomically, keeping its mode, so no daemon reads half a file."""
    tmp_path = SLURM_CONF.with_name(SLURM_CONF.name + ".tmp")
    tmp_path.write_text(text)
    shutil.copymode(SLURM_CONF, tmp_path)
    os.replace(tmp_path, SLURM_CONF)


def _apply_max_array_size(size: int) -> None:
    """Restart slurmctld so that it enforces the MaxArraySize now in slurm.conf.

    ``scontrol reconfigure`` is not enough. With slurmctld 22.05.8, after a
    reconfigure ``scontrol show config`` prints the new value while sbatch
    still meets the old limit, because job_mgr.c caches MaxArraySize in a
    static variable on first use.
    """
    _restart_slurmctld()
    # A reconfigure makes slurmd reread slurm.conf as well, so that both
    # daemons hash the same file.
    _run(["scontrol", "reconfigure"])
    if current_max_array_size() != size:
        raise SlurmClusterError(
            f"slurmctld reports MaxArraySize={current_max_array_size()} after a restart with {size} in {SLURM_CONF}"
        )


@contextlib.contextmanager
def set_max_array_size(size: int) -> Iterator[None]:
    """Lower or raise the cluster's ``MaxArraySize`` inside a ``with`` block.

    Array indices must then be below ``size``, so ``sbatch --array=0-9``
    fails with ``size=4``. On exit, slurm.conf gets its previous text back
    and slurmctld its previous value. Each change restarts slurmctld (about
    a second); queued and running jobs survive that.

    Parameters
    ----------
    size : int
        New MaxArraySize, from 0 (job arrays disabled) to 4000001.

    Raises
    ------
    ValueError
        If size is outside 0..4000001.
    SlurmClusterError
        If slurm.conf cannot be written or slurmctld does not take the value.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_ARRAY_SIZE_LIMIT:
        raise ValueError(f"MaxArraySize must be an int from 0 to {MAX_ARRAY_SIZE_LIMIT}, got {size!r}")

    original_text = SLURM_CONF.read_text()
    original_size = current_max_array_size()
    _write_conf(_replace_max_array_size(original_text, size))
    try:
        _apply_max_array_size(size)
        yield
    finally:
        _write_conf(original_text)
        _apply_max_array_size(original_size)


@contextlib.contextmanager
def accounting_stopped(timeout: float = 60.0) -> Iterator[None]:
    """Stop slurmdbd inside a ``with`` block, so that sacct and sacctmgr fail there.

    slurmctld keeps running and queues job records until slurmdbd is back.
    On exit, slurmdbd starts again and the block waits until sacct responds.

    Parameters
    ----------
    timeout : float
        Seconds to wait for slurmdbd to exit and, afterwards, for sacct to respond.

    Raises
    ------
    SlurmClusterError
        If slurmdbd is not running at the start.
    TimeoutError
        If sacct does not respond within ``timeout`` seconds after the restart.
    """
    pid_file = Path(_config_value(SLURMDBD_CONF, "PidFile"))
    _stop_daemon("slurmdbd", pid_file, timeout)
    try:
        yield
    finally:
        _start_daemon("slurmdbd")
        if not _wait_for(accounting_responds, timeout):
            log_file = _config_value(SLURMDBD_CONF, "LogFile")
            raise TimeoutError(f"sacct did not respond within {timeout:.0f} s of restarting slurmdbd; see {log_file}")


# ------------------------------------------------------------------ start-up


def _can_start_cluster() -> str | None:
    """Return why cluster.sh cannot run here, or None if it can (root on Debian or Ubuntu)."""
    if os.geteuid() != 0:
        return f"cluster.sh needs root to install packages and start daemons (euid is {os.geteuid()})"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "cluster.sh needs Debian or Ubuntu (apt-get and the Debian slurm-wlm packages)"
    return None


def ensure_cluster() -> SlurmCluster:
    """Return the running cluster, starting it with ``cluster.sh up`` if no node is idle.

    A cluster that already has an idle node is used as it is, even one that
    cluster.sh did not start.

    Raises
    ------
    ClusterUnavailableError
        If no node is idle and this machine cannot run cluster.sh.
    SlurmClusterError
        If ``cluster.sh up`` fails; the message contains its output,
        which ends with the tail of the failing daemon's log.
    """
    if "idle" in node_states():
        return describe_cluster()

    reason = _can_start_cluster()
    if reason is not None:
        raise ClusterUnavailableError(f"no idle SLURM node, and {reason}")

    try:
        result = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "up"],
            capture_output=True,
            text=True,
            timeout=CLUSTER_UP_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        raise SlurmClusterError(f"{CLUSTER_SCRIPT} up timed out after {CLUSTER_UP_TIMEOUT_S:.0f} s") from error
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise SlurmClusterError(f"{CLUSTER_SCRIPT} up failed with exit code {result.returncode}:\n{output}")
    return describe_cluster()
