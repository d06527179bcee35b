"""An exclusive lock between processes that may run on different hosts.

`flock` on a lock file is the first choice: the kernel (or the NFS lock
manager) releases it when the holder exits, even on `kill -9`. Some shared
filesystems reject it (NFS mounted without a lock manager, Lustre mounted
without `flock`): the call fails with ENOLCK, EOPNOTSUPP or ENOSYS. There the
lock falls back to an owner file created with `O_CREAT | O_EXCL` next to the
lock file (`<lock>.owner`), holding the host, pid and start time of its holder
as JSON. The holder touches the owner file every `heartbeat_s` seconds.

Stale-lock rule for the owner file: the next process removes it when its
holder ran on this host and that pid no longer exists. It also removes it
when its modification time is more than `stale_after_s` seconds old, because
then the heartbeat stopped: the holder died on another host, or hangs.
NOTE: the age compares the file server's mtime with the local clock, so the
clocks must agree to well within `stale_after_s` (600 s by default).

A process that holds the flock also honours a live owner file, so a host
whose mount has no POSIX locks and a host whose mount has them still
exclude each other.

`flock` between hosts works only where the filesystem forwards it: on a
Lustre mount with `localflock` the lock is local to each node, so run the
nightly job from one place only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# flock errors that mean "this filesystem has no POSIX locks", not "held by someone".
UNSUPPORTED_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})

FLOCK = "flock"
OWNER_FILE = "owner file"

# Locks this process holds by flock. A forked child closes its copies of
# their descriptors (see _forget_in_child), so a child that outlives its
# parent cannot keep the lock held.
_HELD_BY_FLOCK: weakref.WeakSet[ExclusiveLock] = weakref.WeakSet()


class LockBusyError(Exception):
    """The lock is held by another process and the caller asked not to wait.

    Attributes
    ----------
    holder : str
        Who holds the lock ("pid 123 on host n1 since 2026-01-01 03:00:00"), or
        "an unknown process" when the lock file has no holder record.
    """

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"lock {str(path)!r} is held by {holder}")
        self.path = path
        self.holder = holder


class ExclusiveLock:
    """An exclusive, inter-process lock on `path`, usable as a context manager.

    Parameters
    ----------
    path
        The lock file. It is created when missing and never removed, because
        removing a flock file lets two processes lock two different files.
    wait
        Block until the lock is free (True) or raise LockBusyError at once.
    notice_after_s
        Log one warning naming the holder after waiting this long.
    poll_s
        Seconds between attempts while waiting.
    stale_after_s
        Age of the owner file's modification time after which it is stale
        (owner-file mechanism only).
    heartbeat_s
        Seconds between touches of the owner file while it is held.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        wait: bool = True,
        notice_after_s: float = 5.0,
        poll_s: float = 0.2,
        stale_after_s: float = 600.0,
        heartbeat_s: float = 30.0,
    ) -> None:
        if heartbeat_s >= stale_after_s:
            raise ValueError(
                f"invalid heartbeat_s {heartbeat_s} >= stale_after_s {stale_after_s}; "
                "the heartbeat must be shorter than the stale age, or a live holder looks stale"
            )
        self.path = Path(path)
        self.owner_path = self.path.with_name(self.path.name + ".owner")
        self.wait = wait
        self.notice_after_s = notice_after_s
        self.poll_s = poll_s
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.mechanism: str | None = None  # FLOCK or OWNER_FILE once acquired
        self._fd: int | None = None
        self._token = ""
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._fallback_logged = False

    # -- public API --------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock; wait for it, or raise LockBusyError when `wait` is False.

        Raises
        ------
        LockBusyError
            When `wait` is False and another process holds the lock.
        OSError
            When the lock file cannot be created or opened (for example a
            read-only directory).
        """
        if self.mechanism is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        noticed = False
        while True:
            holder = self._try_acquire()
            if holder is None:
                log.info("acquired %s with %s", self.path, self.mechanism)
                return
            if not self.wait:
                raise LockBusyError(self.path, holder)
            if not noticed and time.monotonic() - started >= self.notice_after_s:
                log.warning("waiting for %s, held by %s", self.path, holder)
                noticed = True
            time.sleep(self.poll_s)

    def release(self) -> None:
        """Give the lock back; a lock that is not held is left alone."""
        if self.mechanism == OWNER_FILE:
            self._stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join()
            self._remove_own_owner_file()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # so a later reader does not name a holder that left
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            _HELD_BY_FLOCK.discard(self)
        self.mechanism = None

    def __enter__(self) -> ExclusiveLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    # -- one attempt ---------------------------------------------------------

    def _try_acquire(self) -> str | None:
        """Try once; return None when acquired, else a description of the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return describe_holder(read_holder(self.path))
        except OSError as err:
            os.close(fd)
            if err.errno not in UNSUPPORTED_ERRNOS:
                raise
            return self._try_owner_file(err)

        # The flock is ours. A live owner file means a process on a mount
        # without POSIX locks holds the lock, so step back.
        owner = self._live_owner()
        if owner is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return owner
        self._fd = fd
        self.mechanism = FLOCK
        _HELD_BY_FLOCK.add(self)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
        return None

    def _try_owner_file(self, flock_error: OSError) -> str | None:
        if not self._fallback_logged:
            log.info(
                "flock on %s failed (%s): this filesystem has no POSIX locks, "
                "so the lock falls back to the owner file %s",
                self.path, os.strerror(flock_error.errno or 0), self.owner_path,
            )
            self._fallback_logged = True
        # Two tries: the first may only find and remove a stale owner file.
        for _ in range(2):
            record = holder_record()
            try:
                fd = os.open(self.owner_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._live_owner()
                if owner is not None:
                    return owner
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self._token = record["token"]
            self.mechanism = OWNER_FILE
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
            self._heartbeat.start()
            return None
        return describe_holder(read_holder(self.owner_path))

    # -- owner file ----------------------------------------------------------

    def _live_owner(self) -> str | None:
        """Return the holder named by a live owner file; remove a stale one and return None."""
        try:
            text = self.owner_path.read_text()
            mtime = self.owner_path.stat().st_mtime
        except FileNotFoundError:
            return None
        record = parse_holder(text)
        reason = stale_reason(record, mtime, self.stale_after_s)
        if reason is None:
            return describe_holder(record)
        self._remove_stale(text, record, reason)
        return None

    def _remove_stale(self, text: str, record: dict[str, Any] | None, reason: str) -> None:
        # Rename first, then check the content: if a new holder replaced the
        # stale file after we read it, the renamed file is theirs and goes back.
        aside = self.owner_path.with_name(f"{self.owner_path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.owner_path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text() != text:
                try:
                    os.link(aside, self.owner_path)
                except FileExistsError:
                    pass
                return
            log.warning(
                "removed the stale lock %s held by %s: %s",
                self.owner_path, describe_holder(record), reason,
            )
        finally:
            aside.unlink(missing_ok=True)

    def _remove_own_owner_file(self) -> None:
        try:
            record = parse_holder(self.owner_path.read_text())
        except FileNotFoundError:
            log.warning("owner file %s vanished while held; another process judged it stale", self.owner_path)
            return
        if record is not None and record.get("token") == self._token:
            self.owner_path.unlink(missing_ok=True)
        else:
            log.warning("owner file %s names another holder; left in place", self.owner_path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.owner_path)
            except OSError as err:
                log.warning("heartbeat on %s failed: %s", self.owner_path, err)


def holder_record() -> dict[str, Any]:
    """Return this process's host, pid, start time and a unique token."""
    host = socket.gethostname()
    now = time.time()
    return {
        "host": host,
        "pid": os.getpid(),
        "started": now,
        "token": f"{host}:{os.getpid()}:{now:.6f}",
    }


def parse_holder(text: str) -> dict[str, Any] | None:
    """Return the holder record in a lock file's text, or None when it has none."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return parse_holder(path.read_text())
    except OSError:
        return None


def describe_holder(record: dict[str, Any] | None) -> str:
    """Return "pid P on host H since T" for a holder record."""
    if not record or "pid" not in record:
        return "an unknown process"
    since = record.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"pid {record['pid']} on host {record.get('host', '?')}{when}"


def stale_reason(record: dict[str, Any] | None, mtime: float, stale_after_s: float) -> str | None:
    """Return why an owner file is stale, or None when its holder may be alive.

    An unparsable file is judged by its age only, because a holder may be
    between creating the file and writing it.
    """
    age = time.time() - mtime
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (stale after {stale_after_s:.0f} s)"
    if record is None or record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} no longer runs on this host"
    except PermissionError:
        return None  # a process of another user: alive
    return None


def _forget_in_child() -> None:
    """Close a forked child's copies of the flock descriptors this process holds.

    A flock belongs to the open file description, which fork shares, so a
    child that kept its copy would keep the lock held after the parent died
    (for example worker processes orphaned by `kill -9`). Closing the copy
    leaves the parent's lock in place. The child's lock objects are marked as
    not held, so it never unlocks the parent's lock.
    """
    for held in list(_HELD_BY_FLOCK):
        if held._fd is not None:
            os.close(held._fd)
        held._fd = None
        held.mechanism = None
    _HELD_BY_FLOCK.clear()


os.register_at_fork(after_in_child=_forget_in_child)
