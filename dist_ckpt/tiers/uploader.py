"""The node-local uploader: a detached process that drains one local tier's promotion queue.

Started by the first manager on a node that needs it (:func:`ensure_uploader`) as
``python -m dist_ckpt.tiers.uploader <local_root>`` in a new session (``start_new_session``:
no signal to the job's process group, nor the job's end, reaches it), shared by every rank
of the node and by the next job (which finds it running, or starts a new one that resumes the
queue). It holds an exclusive ``flock`` on ``.tiers/uploader.lock`` for as long as it lives:
the kernel releases it when the process dies in any way, so a lock that can be taken means no
uploader is alive, and a second uploader exits at once — never two for one local root.

It promotes queued steps oldest first; a storage error (the root unreachable) is retried with
backoff, a damaged local checkpoint is recorded as failed (``.tiers/failed/``). It exits after
``idle_exit`` seconds with an empty queue; after releasing the lock it looks once more, so a
request enqueued while it was deciding to exit is never stranded. It needs no torch.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from dist_ckpt.errors import CheckpointError, StorageError
from dist_ckpt.layout import COMMITTED, STEP_PREFIX, parse_step_prefix, step_prefix
from dist_ckpt.tiers.policy import local_drops
from dist_ckpt.tiers.promote import Outcome, promote
from dist_ckpt.tiers.queue import TIERS_DIR, PromotionQueue, PromotionRequest
from storage_backends import Backend, BackendError, open_backend

log = logging.getLogger(__name__)

LOCK_NAME = "uploader.lock"
LOG_NAME = "uploader.log"
DEFAULT_IDLE_EXIT_S = float(os.environ.get("DIST_CKPT_UPLOADER_IDLE_S", "30"))  # tests shorten it
_POLL_S = 0.1
_MAX_BACKOFF_S = 10.0
_WAITING_POLL_S = 0.25


def _lock_path(local_root: str) -> Path:
    return Path(local_root) / TIERS_DIR / LOCK_NAME


def try_lock(local_root: str) -> IO[bytes] | None:
    """The uploader lock's open file if this process took it, else None (one is alive)."""
    path = _lock_path(local_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def holds_current_lock(held: IO[bytes], local_root: str) -> bool:
    """Whether ``held`` is still the lock file at ``local_root``: a local tier deleted and
    re-created under a live uploader (a wiped node disk, ``rm -rf``) has a new lock file that
    a new uploader takes — the old one must then stop, or two would serve one queue."""
    try:
        return os.fstat(held.fileno()).st_ino == os.stat(_lock_path(local_root)).st_ino
    except FileNotFoundError:
        return False


def uploader_alive(local_root: str) -> bool:
    held = try_lock(local_root)
    if held is None:
        return True
    held.close()  # closing releases the flock
    return False


def ensure_uploader(local_root: str, idle_exit: float | None = None) -> bool:
    """Start the uploader of ``local_root`` unless one is alive. Returns whether one was started.
    Two callers racing both start one; the second exits at once (the lock)."""
    for proc, where in list(_started):  # reap; one of ours still starting counts as alive
        if proc.poll() is not None:
            _started.remove((proc, where))
        elif where == os.path.realpath(local_root):
            return False
    if uploader_alive(local_root):
        return False
    log_path = Path(local_root) / TIERS_DIR / LOG_NAME
    idle_exit = DEFAULT_IDLE_EXIT_S if idle_exit is None else idle_exit
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dist_ckpt.tiers.uploader", str(local_root), "--idle-exit", str(idle_exit)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            env=env,
            cwd="/",
        )
    _started.append((proc, os.path.realpath(local_root)))  # reaped by later calls; an orphan by init
    log.info("started the uploader of %s (pid %d, log %s)", local_root, proc.pid, log_path)
    return True


_started: list[tuple[subprocess.Popen[bytes], str]] = []


class Uploader:
    """The loop of the uploader process (see the module docstring)."""

    def __init__(self, local_root: str, idle_exit: float, held: IO[bytes] | None = None):
        self.local_root = str(local_root)
        self._held = held  # the uploader lock this process holds (None: not checked, in tests)
        self.queue = PromotionQueue(local_root)
        self.local = open_backend(self.local_root)
        self.idle_exit = idle_exit
        self._roots: dict[str, Backend] = {}
        self._retry_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}

    def _root(self, request: PromotionRequest) -> Backend:
        if request.root not in self._roots:
            self._roots[request.root] = open_backend(request.root, **request.backend_options)
        return self._roots[request.root]

    def run(self) -> bool:
        """Serve the queue until idle (returns True) or until the local tier was replaced
        under this process (returns False: the new tier has, or gets, its own uploader)."""
        idle_since = time.monotonic()
        while True:
            if self._held is not None and not holds_current_lock(self._held, self.local_root):
                log.warning("%s was deleted and re-created; leaving its queue to its new uploader", self.local_root)
                return False
            requests = self.queue.pending()
            if not requests:
                if time.monotonic() - idle_since >= self.idle_exit:
                    return True
                time.sleep(_POLL_S)
                continue
            idle_since = time.monotonic()
            for request in requests:
                # Strictly in step order: a node starts sending step N+1 only once N is committed
                # (so a step the root's retention dropped after its commit is never waited for).
                if self._retry_at.get(request.step, 0.0) > time.monotonic() or not self._one(request):
                    break
            time.sleep(_POLL_S)

    def _one(self, request: PromotionRequest) -> bool:
        started = time.monotonic()
        try:
            outcome = promote(self.local, self._root(request), request)
        except (StorageError, BackendError) as e:
            self._later(request.step, f"root unreachable or failing ({e})")
            return False
        except CheckpointError as e:
            if request.step not in self.queue.pending_steps():
                return True  # settled meanwhile (by an uploader of a replaced tier), not a failure
            log.error("step %d cannot be promoted: %s", request.step, e)
            self.queue.fail(request.step, str(e))
            return True
        if outcome is Outcome.WAITING:  # another node's uploader commits when its files are there
            self._retry_at[request.step] = time.monotonic() + _WAITING_POLL_S
            return False
        self._retry_at.pop(request.step, None)
        self._backoff.pop(request.step, None)
        self.queue.done(request.step)
        log.info("step %d committed at %s (%.2f s)", request.step, request.root, time.monotonic() - started)
        self.local_retention(request.local_keep_last)
        return True

    def _later(self, step: int, why: str) -> None:
        delay = min(_MAX_BACKOFF_S, self._backoff.get(step, 0.25) * 2)
        self._backoff[step] = delay
        self._retry_at[step] = time.monotonic() + delay
        log.warning("step %d: %s; retrying in %.1f s", step, why, delay)

    def local_retention(self, keep_last: int) -> None:
        apply_local_retention(self.local, self.queue, keep_last)


def local_steps(local: Backend) -> list[int]:
    """Committed steps of a local tier (its COMMITTED markers)."""
    steps = []
    for o in local.list(STEP_PREFIX):
        top, _, rest = o.key.partition("/")
        step = parse_step_prefix(top)
        if step is not None and rest == COMMITTED:
            steps.append(step)
    return sorted(steps)


def apply_local_retention(local: Backend, queue: PromotionQueue, keep_last: int) -> list[int]:
    """Delete the local steps beyond ``keep_last`` whose due promotion is committed (or was
    never due, or failed for good: a failed one is kept — ``failed/`` says why)."""
    unsettled = queue.pending_steps() | {s for s in local_steps(local) if queue.failure(s) is not None}
    drops = local_drops(local_steps(local), keep_last, unsettled)
    for step in drops:
        prefix = step_prefix(step)
        try:
            local.delete(f"{prefix}/{COMMITTED}")  # a half-deleted step is never taken for committed
            local.delete_prefix(prefix + "/")
            queue.forget(step)
        except BackendError:
            log.exception("local retention could not delete %s/%s", local.uri, prefix)
    return drops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_ckpt.tiers.uploader", description=__doc__.split("\n\n")[0])
    p.add_argument("local_root")
    p.add_argument("--idle-exit", type=float, default=DEFAULT_IDLE_EXIT_S, help="exit after this many idle seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s uploader[{os.getpid()}] %(levelname)s %(message)s")
    queue = PromotionQueue(args.local_root)
    while True:
        held = try_lock(args.local_root)
        if held is None:
            log.info("another uploader serves %s; exiting", args.local_root)
            return 0
        held.seek(0)
        held.truncate()
        held.write(f"{os.getpid()}\n".encode())
        held.flush()
        log.info("serving %s", args.local_root)
        served = Uploader(args.local_root, args.idle_exit, held).run()
        held.close()  # releases the lock
        if not served:
            return 0
        if not queue.pending():  # a request enqueued while we decided to exit is served
            log.info("idle for %.0f s; exiting", args.idle_exit)
            return 0


if __name__ == "__main__":
    sys.exit(main())
