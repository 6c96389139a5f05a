"""The run lock's record, and the *fence*: how a writer proves it still holds the lock.

``LOCK`` at the run root holds one :class:`LockInfo` as JSON. Its holder refreshes the
``heartbeat`` by a conditional write (:func:`renew`): read the lock, check that it still names
this holder, and replace it by compare-and-swap on the version just read — the S3 object's ETag
(``If-Match``), locally the file's content hash under the backend's lock-file protocol. A
takeover in between makes the swap fail, so a job that lost the lock can never write it back.

A :class:`Fence` carries the holder's record to wherever a commit happens — the coordinator's
``finish`` in the training process, the async worker thread, the async writer *process* — and
:meth:`Fence.check` renews the lock right before each write that makes something visible
(``COMMITTED``, the manifest update, a retention delete). Renewing (rather than only reading)
matters: a successful renewal restarts the lease, so no other host may take the lock over for
the next ``stale_after`` seconds — the commit write that follows within milliseconds is covered.
The fence holds no version, only the owner token, so the heartbeat thread of the training
process and a fence check in the writer process never mistake each other's renewals for a
takeover. (What no lease can cover is a pause of more than ``stale_after`` seconds *between*
the check and the write it guards; see docs/architecture.md, "Run lock".)

Nothing here imports torch; the fence pickles (it crosses to the writer process).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

from dist_ckpt.errors import RunLocked, StorageError
from dist_ckpt.layout import LOCK
from storage_backends import Backend, BackendError, PreconditionFailed

_RENEW_ATTEMPTS = 10  # swaps lost to this holder's own concurrent renewals (thread vs. writer process)


@dataclass(frozen=True)
class LockInfo:
    """The content of ``LOCK``: who holds the run, where, and when it last proved alive.

    ``host``/``boot_id``/``pid_ns`` say whether the owner runs on the machine looking at it
    (then its liveness is checked directly); ``start`` (the process's start time in clock
    ticks) guards against a reused pid; ``stale_after`` is the owner's own staleness limit."""

    owner: str
    host: str
    pid: int
    time: float
    heartbeat: float
    boot_id: str = ""
    pid_ns: str = ""
    start: int = 0
    stale_after: float = 0.0

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        """The lock record, or None when it is unreadable (an unreadable lock counts as stale)."""
        try:
            d = json.loads(data.decode("utf-8"))
            return cls(
                str(d["owner"]),
                str(d["host"]),
                int(d["pid"]),
                float(d["time"]),
                float(d["heartbeat"]),
                str(d.get("boot_id", "")),
                str(d.get("pid_ns", "")),
                int(d.get("start", 0)),
                float(d.get("stale_after", 0.0)),
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def dump(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        """``owner (pid P on host H), last heartbeat Ns ago`` — for error messages."""
        age = time.time() - self.heartbeat
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.heartbeat))
        return f"{self.owner} (pid {self.pid} on host {self.host}), last heartbeat {age:.1f}s ago ({stamp})"


class LockLost(Exception):
    """Raised by :func:`renew`: ``LOCK`` no longer names the holder. ``holder`` is who holds it
    now (None: nobody, or an unreadable record)."""

    def __init__(self, holder: LockInfo | None):
        super().__init__(holder.owner if holder else "nobody")
        self.holder = holder


def renew(backend: Backend, mine: LockInfo) -> LockInfo:
    """Refresh ``mine``'s heartbeat in ``LOCK`` by a conditional write and return the record
    written. Raises :class:`LockLost` when another job holds the lock (or nobody does), a
    :class:`BackendError` when the storage fails."""
    for _ in range(_RENEW_ATTEMPTS):
        current = backend.read_versioned(LOCK)
        held = LockInfo.parse(current.data) if current is not None else None
        if current is None or held is None or held.owner != mine.owner:
            raise LockLost(held)
        new = replace(mine, heartbeat=time.time())
        try:
            backend.compare_and_swap(LOCK, new.dump(), current.version)
            return new
        except PreconditionFailed:
            continue  # changed since read: our own renewal from another thread or process, or a takeover
    raise BackendError(
        f"{backend.uri}/{LOCK}: the run lock changed {_RENEW_ATTEMPTS} times while being renewed",
        key=LOCK,
        code="Contended",
    )


@dataclass(frozen=True)
class Fence:
    """Proof-of-ownership for the commit path: the holder's lock record (see the module docstring)."""

    holder: LockInfo

    def check(self, backend: Backend, before: str) -> None:
        """Renew the run lock by a conditional write, right before ``before`` (what is about to
        be made visible). Raises :class:`RunLocked` naming the new owner when the lock was lost:
        then nothing more of this save may be written; its staging is left to gc."""
        try:
            renew(backend, self.holder)
        except LockLost as e:
            now = f"it is held by {e.holder.describe()}" if e.holder else "it was released or broken"
            raise RunLocked(
                f"{backend.uri}: this job ({self.holder.owner}) lost the run's writer lock ({backend.uri}/{LOCK}): "
                f"{now}. Stopped before {before}: nothing of this save becomes visible (its staging is left to "
                "`dist-ckpt gc`). The lock is taken over when its owner stopped heart-beating for longer than "
                "lock_stale_after (a SIGSTOP, a long pause, a network partition) or with --break-lock; this job "
                "must stop writing this run."
            ) from e
        except BackendError as e:
            raise StorageError(f"{backend.uri}/{LOCK}: could not confirm the run lock before {before}: {e}") from e
