"""The run's writer lock: one job writes a run root at a time.

``LOCK`` at the run root holds a :class:`~dist_ckpt.lock_fence.LockInfo` as JSON. The
coordinator creates it with create-if-absent when its manager starts (``dist-ckpt
gc|prune|copy`` too, for as long as they change the run) and deletes it on ``close()`` or at
interpreter exit. While held, a daemon thread refreshes its heartbeat every ``stale_after / 4``
seconds by a conditional write (:func:`~dist_ckpt.lock_fence.renew`), independent of saves.

When is a lock *stale* — taken over, by compare-and-swap so only one job wins?

* its owner runs on this machine (same host name, boot and pid namespace): only when that
  process is gone (dead, a zombie, or its pid reused by another process) — a live owner keeps
  the run however old its heartbeat, e.g. while it is stopped (SIGSTOP) or busy;
* its owner runs elsewhere: when its heartbeat is older than the owner's ``stale_after``
  (recorded in the lock; clocks must agree to well within it);
* the record is unreadable.

A job whose lock was taken over learns it from the heartbeat thread (its next ``save()`` fails
at once) and, at the latest, from the fence its commit checks (:class:`~dist_ckpt.lock_fence.Fence`):
it then makes nothing visible and raises :class:`RunLocked`. ``break_lock`` takes a lock over
although its owner looks alive (``dist-ckpt ... --break-lock``: only when that job is gone).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import replace

from dist_ckpt.errors import RunLocked, StorageError
from dist_ckpt.lock_fence import LOCK, Fence, LockInfo, LockLost, renew
from storage_backends import Backend, BackendError, ObjectExists, PreconditionFailed

__all__ = ["LOCK", "LockInfo", "RunLock", "stale_reason"]

log = logging.getLogger(__name__)

_MIN_INTERVAL = 0.05
_JOIN_TIMEOUT = 30.0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid`` from /proc; None when there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state is field 3, starttime field 22
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _process_alive(pid: int, start: int) -> bool:
    """Whether ``pid`` is a running process — the one started at ``start`` when that is known."""
    if os.path.isdir("/proc/self"):
        info = _proc_stat(pid)
        if info is None:
            return False
        state, started = info
        if state in ("Z", "X"):
            return False  # killed, not yet reaped by its parent
        return not (start and started != start)  # a different process that got the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_process(stale_after: float) -> LockInfo:
    """The lock record this process writes when it takes a run."""
    host, pid, now = socket.gethostname(), os.getpid(), time.time()
    own = _proc_stat(pid)
    return LockInfo(
        f"{host}:{pid}:{uuid.uuid4().hex[:8]}",
        host,
        pid,
        now,
        now,
        _read("/proc/sys/kernel/random/boot_id"),
        _pid_ns(),
        own[1] if own else 0,
        float(stale_after),
    )


def stale_reason(held: LockInfo | None, me: LockInfo, stale_after: float) -> str | None:
    """Why the lock ``held`` may be taken over by ``me``, or None while its owner counts as alive."""
    if held is None:
        return "its record is unreadable"
    same_machine = held.host == me.host and held.boot_id == me.boot_id and held.pid_ns == me.pid_ns
    if same_machine:
        if held.pid == me.pid:
            return "it was taken by this same process (an earlier manager that was not closed)"
        if _process_alive(held.pid, held.start):
            return None  # a live owner on this machine keeps the run, whatever its heartbeat's age
        return f"its owner (pid {held.pid} on this host) is gone"
    limit = held.stale_after or stale_after
    age = time.time() - held.heartbeat
    return f"no heartbeat from host {held.host} for {age:.1f}s (> {limit:g}s)" if age > limit else None


class RunLock:
    """The writer lock of the run at ``backend``: :meth:`acquire`, then :attr:`fence` for the
    commit path, :meth:`raise_if_lost` for a cheap early check, and :meth:`release`."""

    def __init__(self, backend: Backend, stale_after: float = 600.0):
        self.backend, self.stale_after = backend, float(stale_after)
        self.info = this_process(stale_after)
        self.interval = max(_MIN_INTERVAL, self.stale_after / 4)
        self._lost: LockInfo | None | bool = False  # False: held; else who took it (None: nobody)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._atexit = None

    @property
    def fence(self) -> Fence:
        return Fence(self.info)

    def acquire(self, *, break_lock: bool = False) -> None:
        """Take the lock; :class:`RunLocked` naming the owner and its last heartbeat while
        another job holds it. ``break_lock``: take it over even so (dangerous)."""
        try:
            self._take(break_lock)
        except BackendError as e:
            raise StorageError(f"{self.backend.uri}/{LOCK}: {e}") from e
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"dist_ckpt-lock-heartbeat-{os.getpid()}", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        self._atexit = lambda: _at_exit(ref)
        atexit.register(self._atexit)

    def _take(self, break_lock: bool) -> None:
        for _ in range(5):
            self.info = replace(self.info, heartbeat=time.time())
            try:
                self.backend.create_if_absent(LOCK, self.info.dump())
                return
            except ObjectExists:
                pass
            current = self.backend.read_versioned(LOCK)
            if current is None:
                continue  # released meanwhile
            held = LockInfo.parse(current.data)
            why = stale_reason(held, self.info, self.stale_after)
            if why is None and not break_lock:
                assert held is not None
                raise RunLocked(
                    f"{self.backend.uri} is being written by another job: {held.describe()}; its lock is "
                    f"{self.backend.uri}/{LOCK}. Two jobs must not write one run: use another run root, or stop "
                    f"that job. A live owner on the same host keeps the lock; an owner on another host loses it "
                    f"after {held.stale_after or self.stale_after:g}s without heartbeat, a dead one on this host at "
                    "once. Only if you are sure that job is gone (e.g. its host is down), `dist-ckpt gc|prune|copy "
                    "--break-lock` takes the lock from it (dangerous)."
                )
            try:
                self.backend.compare_and_swap(LOCK, self.info.dump(), current.version)
            except PreconditionFailed:
                continue
            if why is None:
                log.warning(
                    "broke the run lock of %s held by %s (--break-lock)",
                    self.backend.uri,
                    held.describe() if held else "?",
                )
            else:
                log.warning(
                    "took over the run lock of %s from %s: %s", self.backend.uri, held.owner if held else "?", why
                )
            return
        raise RunLocked(f"{self.backend.uri}/{LOCK}: could not acquire the run lock: other jobs keep changing it")

    def _beat(self) -> None:
        """The heartbeat thread: renew every ``interval`` until stopped or the lock is lost."""
        while not self._stop.wait(self.interval):
            try:
                self.info = renew(self.backend, self.info)
            except LockLost as e:
                self._lost = e.holder
                log.error(
                    "%s: this job lost the run lock to %s; its saves now fail with RunLocked",
                    self.backend.uri,
                    e.holder.describe() if e.holder else "nobody (released or broken)",
                )
                return
            except BackendError as e:  # transient: the next beat retries; a commit's fence decides
                log.warning("%s: could not refresh the run lock's heartbeat (will retry): %s", self.backend.uri, e)
            except Exception:  # noqa: BLE001 (a daemon thread must not die silently)
                log.exception("%s: the run lock's heartbeat failed (will retry)", self.backend.uri)

    def raise_if_lost(self) -> None:
        """:class:`RunLocked` if the heartbeat thread saw the lock taken over (no storage access)."""
        if self._lost is not False:
            holder = self._lost if isinstance(self._lost, LockInfo) else None
            now = f"it is held by {holder.describe()}" if holder else "it was released or broken"
            raise RunLocked(
                f"{self.backend.uri}: this job ({self.info.owner}) lost the run's writer lock "
                f"({self.backend.uri}/{LOCK}): {now}; it must stop writing this run"
            )

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None

    def release(self) -> None:
        """Stop the heartbeat and delete ``LOCK`` if it is still this job's."""
        self._stop_heartbeat()
        try:
            current = self.backend.read_versioned(LOCK)
            held = LockInfo.parse(current.data) if current is not None else None
            if held is not None and held.owner == self.info.owner:
                self.backend.delete(LOCK)
        except BackendError:
            log.warning("could not release the run lock of %s", self.backend.uri, exc_info=True)


def _at_exit(ref: weakref.ref[RunLock]) -> None:
    lock = ref()
    # a forked child (e.g. a DataLoader worker) inherits the handler, not the lock
    if lock is None or lock.info.pid != os.getpid():
        return
    try:
        lock.release()
    except BaseException as e:  # noqa: BLE001 (nothing is left to raise to at exit)
        # harmless: a lock left behind is taken over at once on this host (its process is
        # gone), after lock_stale_after from another
        log.info("could not release the run lock of %s at exit: %s: %s", lock.backend.uri, type(e).__name__, e)
