"""The run's writer lock: one job writes a run root at a time.

``LOCK`` at the run root holds ``{"owner", "host", "pid", "time", "heartbeat"}`` as JSON. The
coordinator creates it with create-if-absent when its manager starts, refreshes the heartbeat
at every save (compare-and-swap, so a job that lost the lock notices), and deletes it on
``close()``. A lock is *stale* — and taken over, by compare-and-swap so only one job wins —
when its owner is a dead process on this host, or when its heartbeat is older than
``stale_after`` seconds (an owner on another host that stopped heart-beating).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from dist_ckpt.errors import RunLocked, StorageError
from storage_backends import Backend, BackendError, ObjectExists, PreconditionFailed

log = logging.getLogger(__name__)

LOCK = "LOCK"


@dataclass(frozen=True)
class LockInfo:
    owner: str
    host: str
    pid: int
    time: float
    heartbeat: float

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        try:
            d = json.loads(data.decode("utf-8"))
            return cls(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["time"]), float(d["heartbeat"]))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            return None  # unreadable: treated as stale

    def dump(self) -> bytes:
        return json.dumps(self.__dict__).encode()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, backend: Backend, stale_after: float = 600.0):
        self.backend, self.stale_after = backend, stale_after
        now = time.time()
        self.info = LockInfo(f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", socket.gethostname(), os.getpid(), now, now)
        self._version: str | None = None

    def _stale(self, held: LockInfo | None) -> bool:
        if held is None:
            return True
        if held.host == self.info.host and (held.pid == self.info.pid or not _pid_alive(held.pid)):
            return True  # a dead process, or a manager of this same process re-opening the run
        return time.time() - held.heartbeat > self.stale_after

    def acquire(self) -> None:
        try:
            for _ in range(5):
                try:
                    self.backend.create_if_absent(LOCK, self.info.dump())
                    self._version = self._read_version()
                    return
                except ObjectExists:
                    pass
                current = self.backend.read_versioned(LOCK)
                if current is None:
                    continue  # released meanwhile
                held = LockInfo.parse(current.data)
                if not self._stale(held):
                    raise RunLocked(
                        f"{self.backend.uri} is being written by another job ({held.owner}, last heartbeat "
                        f"{time.time() - held.heartbeat:.0f}s ago). Two jobs must not write one run: use another "
                        f"run root, or stop that job. A dead owner's lock is taken over after {self.stale_after:.0f}s "
                        f"without heartbeat (at once if it ran on this host); delete {self.backend.uri}/{LOCK} to force."
                    )
                try:
                    self._version = self.backend.compare_and_swap(LOCK, self.info.dump(), current.version)
                    log.warning("took over the stale run lock of %s from %s", self.backend.uri, held.owner if held else "?")
                    return
                except PreconditionFailed:
                    continue
            raise RunLocked(f"{self.backend.uri}: could not acquire the run lock (contended)")
        except BackendError as e:
            raise StorageError(f"{self.backend.uri}/{LOCK}: {e}") from e

    def _read_version(self) -> str | None:
        current = self.backend.read_versioned(LOCK)
        return current.version if current else None

    def heartbeat(self) -> None:
        """Refresh the lock; raise :class:`RunLocked` if another job took it over."""
        new = LockInfo(self.info.owner, self.info.host, self.info.pid, self.info.time, time.time())
        try:
            self._version = self.backend.compare_and_swap(LOCK, new.dump(), self._version)
            self.info = new
        except PreconditionFailed as e:
            raise RunLocked(f"{self.backend.uri}: the run lock was taken over by another job; stop writing this run") from e
        except BackendError as e:
            raise StorageError(f"{self.backend.uri}/{LOCK}: {e}") from e

    def release(self) -> None:
        try:
            current = self.backend.read_versioned(LOCK)
            held = LockInfo.parse(current.data) if current is not None else None
            if held is not None and held.owner == self.info.owner:
                self.backend.delete(LOCK)
        except BackendError:
            log.warning("could not release the run lock of %s", self.backend.uri, exc_info=True)
