"""The async save engine of a :class:`~dist_ckpt.CheckpointManager`.

``save()`` (on every rank, together) stages the state — one memory copy into a buffer that
is allocated on the first save and reused (:mod:`dist_ckpt.staging`) — and hands the
snapshot to a background worker; it returns as soon as the copy is done. The worker plans
the DCP save (plans cached while the layout is unchanged), encodes, compresses, writes,
commits, and — on rank 0 — runs the job's ``after_commit`` hook (the manifest update, a
:class:`~dist_ckpt.commit_follow_up.CommitFollowUp` built from values at submit: no manager
code runs here); then every rank's worker exchanges its outcome
(:func:`dist_ckpt.async_job.agree_verdict`), so all ranks hold the same verdict, which the
foreground consumes (:meth:`drain`: it raises the failure, or hands the result to the job's
``on_consumed`` hook). Tests and benchmarks watch saves through
``observer`` (:class:`dist_ckpt.async_job.SaveObserver`).

With overlapped staging (``async_save=True`` or ``"overlap"``) the parameters and optimizer
state are left out of that copy: the worker copies them during the next forward/backward and
the tracked optimizers' step pre-hook joins it (:mod:`dist_ckpt.overlap`).

Worker: a thread (default), or with ``async_mode="process"`` a process started once per
manager (:mod:`dist_ckpt.async_process`) that maps the staging buffer (shared memory, sent
once per layout) and joins its own gloo group; the thread then only relays.

Process groups: two gloo groups are created once, over the manager's ranks, and the training
group is never used from the background:

* ``background`` — the DCP collectives of background saves (thread mode) and the exchange of
  outcomes at the end of each save;
* ``control`` — ``should_stop()``'s all-reduce (foreground, the calling thread).

``save()`` adds no collective of its own to the manager's decision broadcast: whether a save
is still in flight travels inside it (rank 0's answer, :meth:`settle`), and a staging
failure on one rank is reported to the others by DCP's planning step in the background.
(One exception: with ``max_staging_bytes`` and the writer process, an all-reduce on the
control group tells whether any rank is over the budget — see below.)

One save in flight: ``submit`` first waits for the previous one. Outcomes are consumed in
lockstep — by :meth:`drain` (every rank waits for its own worker, whose final exchange makes
the verdicts identical) or by :meth:`settle` once rank 0's worker is done — so a background
failure is raised on every rank at the same call (the next ``save()``, ``wait()`` or
``close()``), and only once. A failed step has no ``COMMITTED``;
the previous checkpoint stays the latest.

Memory budget (``max_staging_bytes``): on a rank whose tensors exceed it, the save is
synchronous — no staging copy, DCP streams from the live tensors in the calling thread,
``save()`` returns after the commit — and the staging buffer is released; its outcome is
consumed at the next call like any other. Ranks under the budget stage and save in their
background thread as usual (the collectives pair up across threads). With the writer
process, a save where any rank is over the budget runs in the training processes on every
rank (the writer processes have their own group, which the over-budget rank cannot join for
that save). Memory stays at the model's size; the stall is the whole save. (Staging and
writing in bounded pieces while the caller waits would need one checkpoint assembled from
several DCP saves; not done.)

Interpreter exit with a save in flight waits for it (``atexit``; a warning names the step),
then stops the worker process; a failure nobody consumed is printed loudly.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import queue
import threading
import time
import uuid
import weakref
from typing import Any

import torch
import torch.distributed as dist

from dist_ckpt.async_job import (
    CommitHooks,
    Job,
    NoObserver,
    SaveObserver,
    SubmitTimings,
    agree_verdict,
    gloo_group,
    hand_to_every_rank,
    loud,
)
from dist_ckpt.async_write import write_snapshot
from dist_ckpt.config import ManagerConfig
from dist_ckpt.dcp_internals import forget_cached_plans
from dist_ckpt.errors import CheckpointError
from dist_ckpt.format.shard import ChunkCodec
from dist_ckpt.lock_fence import Fence
from dist_ckpt.overlap import OverlapCopy, storage_key
from dist_ckpt.preemption import Preemption
from dist_ckpt.staging import Snapshot, Stager, describe
from storage_backends import Backend

log = logging.getLogger(__name__)

EXIT_WAIT_S = 600.0  # how long interpreter exit waits for an in-flight save


class AsyncEngine:
    """See the module docstring. Built by the manager when ``async_save`` or
    ``save_on_sigterm`` is set; every method is called on every rank together."""

    def __init__(
        self,
        config: ManagerConfig,
        backend: Backend,
        codec: ChunkCodec | None,
        *,
        process_group: dist.ProcessGroup | None,
        rank: int,
        world_size: int,
    ):
        self.config = config
        self.backend = backend
        self.codec = codec
        self.rank, self.world_size = rank, world_size
        self.async_save = config.async_save
        self.distributed = dist.is_available() and dist.is_initialized()
        self._control = gloo_group(process_group) if self.distributed else None
        self._background = gloo_group(process_group) if self.distributed and self.async_save else None
        self.preemption = Preemption(self._control, install=config.save_on_sigterm)
        self._closed = False
        self._job: Job | None = None
        self.observer: SaveObserver = NoObserver()  # the seam tests and benchmarks watch saves through
        self.stager = Stager(shared=config.async_mode == "process")
        self.cache_key = f"dist_ckpt.async.{uuid.uuid4().hex}"
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.process: Any = None
        if self.async_save:
            if config.async_mode == "process":
                from dist_ckpt.async_process import WriterProcess

                self.process = WriterProcess(
                    config,
                    backend,
                    rank=rank,
                    world_size=world_size,
                    control_group=self._control,
                    cache_key=self.cache_key,
                )
            self._thread = threading.Thread(target=self._worker, name=f"dist_ckpt-async-rank{rank}", daemon=True)
            self._thread.start()
        ref = weakref.ref(self)
        self._atexit = lambda: _at_exit(ref)
        atexit.register(self._atexit)

    # -- public -----------------------------------------------------------------------------------
    def busy_here(self) -> bool:
        """Whether this rank's save is still running (no collective). The manager evaluates
        it on rank 0 inside the decision it broadcasts anyway, and passes it to :meth:`settle`."""
        return self._job is not None and not self._job.done.is_set()

    def in_flight_step(self) -> int | None:
        """The step of the save submitted and not consumed yet (running or done), or None."""
        job = self._job
        return job.step if job is not None else None

    def settle(self, busy_on_rank0: bool) -> bool:
        """Whether a save is in flight, agreed: rank 0's answer. When rank 0's save is done,
        every rank's is done or about to be (rank 0 finished the outcome exchange, the last
        collective of a save), so each waits for its own and consumes it here: a failure is
        raised on every rank at the same call."""
        if self._job is None:
            return False
        if busy_on_rank0:
            return True
        self.drain()
        return False

    def join_copy(self) -> None:
        """Overlapped staging: wait for the in-flight save's staging copy (only if it is
        not done) and check it (the optimizer step pre-hook calls this; so do drain and exit)."""
        job = self._job
        if job is not None and job.copy is not None:
            job.copy.join()

    def drain(self) -> None:
        """Wait for the in-flight save; raise its failure (on every rank)."""
        job = self._job
        if job is None:
            return
        self.join_copy()
        job.done.wait()
        self._job = None
        if job.failure is not None:
            raise job.failure
        if job.hooks.on_consumed is not None:
            job.hooks.on_consumed(job.result)

    def submit(
        self,
        step: int,
        prefix: str,
        state_dict: dict[str, Any],
        commit_info: dict[str, Any],
        hooks: CommitHooks,
        fence: Fence | None = None,
        deferrable: frozenset[int] = frozenset(),
        spread: frozenset[str] = frozenset(),
    ) -> None:
        """Stage ``state_dict`` and save it in the background as ``prefix`` (waits for the
        previous save first). Synchronous when the memory budget is exceeded on any rank.
        ``deferrable``: storages (:func:`dist_ckpt.overlap.deferrable`) whose tensors are
        copied in the background, during the next forward/backward (overlapped staging)."""
        t0 = time.perf_counter()
        self.drain()
        t1 = time.perf_counter()
        cap = self.config.max_staging_bytes
        over = False
        overlap: OverlapCopy | None = None
        try:
            layout = describe(state_dict)
            over = cap is not None and layout.nbytes > cap
            if over:  # nothing is copied: this rank saves synchronously, from its live tensors
                self.stager.release()  # the budget: no buffer is kept either
                snapshot = Stager.unstaged(layout)
            else:
                defer = frozenset(f for f, t in layout.sources.items() if deferrable and storage_key(t) in deferrable)
                snapshot = self.stager.stage(layout, defer)
                if defer:
                    overlap = OverlapCopy(
                        step, {f: layout.sources[f] for f in layout.sources if f in defer}, snapshot.tensors
                    )
            nbytes = layout.nbytes
        except Exception as e:  # noqa: BLE001
            # No collective here to tell the other ranks: the save goes ahead with a snapshot
            # that fails inside DCP's planning, which reports it to every rank.
            log.error("step %d: staging failed: %s: %s", step, type(e).__name__, e)
            snapshot, nbytes = Snapshot({}, {}, (), (), {}, value_error=(type(e).__name__, f"staging failed: {e}")), 0
        snapshot.spread = spread
        t2 = time.perf_counter()
        self.observer.submitted(
            SubmitTimings(step, t1 - t0, t2 - t1, nbytes, overlap.nbytes if overlap is not None else 0)
        )
        over_anywhere = over
        if cap is not None and self.process is not None and self._control is not None:
            flag = torch.tensor([1 if over else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control)
            over_anywhere = bool(flag.item())
        job = Job(
            step,
            prefix,
            snapshot,
            dict(commit_info),
            hooks,
            self.stager.buffer,
            self.stager.generation,
            fence=fence,
            copy=overlap,
        )
        job.in_process = self.process is not None and not over_anywhere
        self._job = job
        if over:
            log.info(
                "step %d: %d bytes of tensors exceed max_staging_bytes=%d: saving synchronously", step, nbytes, cap
            )
            self._execute(job)  # its outcome is consumed like any other's
        else:
            self._queue.put(job)

    def should_stop(self) -> bool:
        return self.preemption.should_stop()

    def close(self) -> None:
        """Wait for the in-flight save, stop the worker (and its process), free the buffer,
        restore the SIGTERM handler. Raises an unconsumed background failure afterwards."""
        if self._closed:
            return
        self._closed = True
        failure: BaseException | None = None
        try:
            self.drain()
        except BaseException as e:  # noqa: BLE001 (raised after the clean-up)
            failure = e
        self._shutdown()
        if failure is not None:
            raise failure

    # -- worker -------------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._execute(job)

    def _execute(self, job: Job) -> None:
        error: BaseException | None = None
        t0 = time.perf_counter()
        try:
            if job.copy is not None:  # copy during the loop's forward/backward; wait for its join
                problem = job.copy.run()
                if problem is not None and job.snapshot is not None:  # fails DCP's planning on every rank
                    log.error("step %d: %s", job.step, problem[1])
                    job.snapshot = dataclasses.replace(job.snapshot, value_error=problem)
            try:
                if job.in_process:
                    self.process.save(job)
                else:
                    write_snapshot(
                        self.backend,
                        job.prefix,
                        job.snapshot,
                        codec=self.codec,
                        commit_info=job.commit_info,
                        process_group=self._background,
                        cache_key=self.cache_key,
                        fence=job.fence,
                    )
            except BaseException as e:  # noqa: BLE001 (reported to every rank)
                error = e
            t1 = time.perf_counter()
            if error is None and job.hooks.after_commit is not None and self.rank == 0:
                try:
                    job.result = job.hooks.after_commit()
                except BaseException as e:  # noqa: BLE001
                    error = e
            t2 = time.perf_counter()
            job.failure = self._agree(job.step, error)
            if job.failure is None and job.hooks.on_every_rank is not None:
                job.failure = self._agree(job.step, hand_to_every_rank(job, job.result, self._background))
            t3 = time.perf_counter()
            job.finished = time.monotonic()  # committed, in the manifest, verdict agreed
            if job.failure is None and job.hooks.after_verdict is not None and self.rank == 0:
                try:  # after the verdict: deleting old steps is clean-up, not committing (done waits for it)
                    job.hooks.after_verdict(job.result)
                except Exception:  # noqa: BLE001 (the save is committed; gc removes what is left)
                    log.exception(
                        "step %d: retention after the commit failed; `dist-ckpt gc` removes what is left", job.step
                    )
            job.timings = {
                "write_s": t1 - t0,
                "after_commit_s": t2 - t1,
                "agree_s": t3 - t2,
                "retention_s": time.perf_counter() - t3,
            }
        except BaseException as e:  # noqa: BLE001 (never leave a job without a verdict)
            job.failure = CheckpointError(f"background save of step {job.step} failed: {type(e).__name__}: {e}")
        finally:
            job.snapshot = job.buffer = None  # no reference to the staging buffer outlives the save
            if job.copy is not None:
                job.copy.items = ()  # joined already (run() waits for it): its views go too
            if job.finished is None:
                job.finished = time.monotonic()
            if job.failure is not None:
                log.error("background save of step %d failed: %s", job.step, job.failure)
            self.observer.finished(job)  # before done: a test that waited sees it
            job.done.set()

    def _agree(self, step: int, error: BaseException | None) -> BaseException | None:
        return agree_verdict(step, error, self._background, rank=self.rank, world_size=self.world_size)

    # -- shutdown -----------------------------------------------------------------------------
    def _shutdown(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None
        if self.process is not None:
            self.process.close()
            self.process = None
        self.stager.release()
        forget_cached_plans(self.cache_key)
        self.preemption.restore()
        atexit.unregister(self._atexit)

    def exit_wait(self, timeout: float = EXIT_WAIT_S) -> None:
        """At interpreter exit: wait for the in-flight save (loudly), then clean up."""
        if self._closed:
            return
        self._closed = True
        job = self._job
        if job is not None:
            self.join_copy()
            if not job.done.is_set():
                loud(
                    f"dist_ckpt: interpreter exit with the save of step {job.step} in flight; waiting for it "
                    f"(up to {timeout:.0f}s). Call mgr.close() before exiting to do this explicitly."
                )
            if not job.done.wait(timeout):
                loud(
                    f"dist_ckpt: the save of step {job.step} did not finish within {timeout:.0f}s; exiting "
                    "without it (it is not committed; the previous checkpoint stays the latest)"
                )
                return
            self._job = None
            if job.failure is not None:
                loud(
                    f"dist_ckpt: the background save of step {job.step} FAILED and nobody called save(), "
                    f"wait() or close() afterwards to see it: {job.failure}"
                )
        self._shutdown()


def _at_exit(ref: weakref.ref[AsyncEngine]) -> None:
    engine = ref()
    if engine is not None:
        engine.exit_wait()
