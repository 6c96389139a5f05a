"""One background save of the :class:`~dist_ckpt.async_engine.AsyncEngine`: the job, the
verdict every rank agrees on, and the observer seam tests and benchmarks watch it through.

The worker writes and commits the job, runs its :class:`CommitHooks` (values captured when the
save was submitted: rank 0's manifest update returns a result, it touches no state of the
manager), and :func:`agree_verdict` makes every rank hold the same outcome before ``Job.done``
is set. The foreground consumes the outcome at the next ``save()``, ``wait()`` or ``close()``:
it raises ``Job.failure``, or hands ``Job.result`` to ``CommitHooks.on_consumed`` (the
manager's bookkeeping, in the foreground).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dist_ckpt.errors import CheckpointError, error_class
from dist_ckpt.lock_fence import Fence
from dist_ckpt.overlap import OverlapCopy
from dist_ckpt.staging import Snapshot

log = logging.getLogger(__name__)


def gloo_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A new gloo group over the ranks of ``process_group`` (all ranks call it together)."""
    if process_group is None or process_group == dist.GroupMember.WORLD:
        return dist.new_group(backend="gloo")
    ranks = dist.get_process_group_ranks(process_group)
    return dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)


@dataclass(frozen=True)
class CommitHooks:
    """What follows a background save's commit: each hook, the thread and the ranks it runs on.
    Built when the save is submitted, from values: the worker runs no code of the manager's."""

    after_commit: Callable[[], Any] | None = None
    """Rank 0, the worker, before the verdict (its failure fails the save): the manifest update.
    Its result becomes ``Job.result``."""
    after_verdict: Callable[[Any], None] | None = None
    """Rank 0, the worker, after a successful verdict, with the result: retention's deletes
    (clean-up, not committing: a failure is logged, ``dist-ckpt gc`` removes what is left)."""
    on_every_rank: Callable[[Any], None] | None = None
    """Every rank, the worker, before the verdict, with rank 0's result (tiers: each node
    completes its local commit)."""
    on_consumed: Callable[[Any], None] | None = None
    """Every rank, the foreground, when it consumes the save's success, with the result (None
    but on rank 0): the manager's own bookkeeping."""


@dataclass
class Job:
    """One save, from ``submit`` to its verdict (the worker fills in the results)."""

    step: int
    prefix: str
    snapshot: Snapshot | None  # dropped once written (it holds views of the staging buffer)
    commit_info: dict[str, Any]
    hooks: CommitHooks
    buffer: torch.Tensor | None = None
    generation: int = 0
    submitted: float = field(default_factory=time.monotonic)
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)  # write / after_commit / agree seconds
    in_process: bool = False  # written by the writer process (else in this process, on the background group)
    fence: Fence | None = None  # rank 0: the run lock, checked right before COMMITTED (also in the writer process)
    copy: OverlapCopy | None = None  # overlapped staging: the deferred part of the staging copy
    result: Any = None  # rank 0: what hooks.after_commit returned (consumed by hooks.on_consumed)

    @property
    def seconds(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted


@dataclass(frozen=True)
class SubmitTimings:
    """What ``save()`` spent in :meth:`AsyncEngine.submit` before returning."""

    step: int
    wait_previous_s: float  # waiting for the previous save
    stage_s: float  # the staging copy (the part of it not deferred)
    bytes: int
    deferred_bytes: int  # overlapped staging: copied in the background


class SaveObserver(Protocol):
    """Watches the engine's saves (tests, benchmarks); production uses :class:`NoObserver`."""

    def submitted(self, timings: SubmitTimings) -> None: ...

    def finished(self, job: Job) -> None: ...


class NoObserver:
    def submitted(self, timings: SubmitTimings) -> None:
        pass

    def finished(self, job: Job) -> None:
        pass


def agree_verdict(
    step: int, error: BaseException | None, group: dist.ProcessGroup | None, *, rank: int, world_size: int
) -> BaseException | None:
    """The same verdict on every rank of ``group``: the lowest failing rank's error, or None.

    One ``all_reduce`` of a flag first: a save that succeeded everywhere (the common case) is
    agreed in that one small collective; only when some rank failed do the ranks gather the
    errors (``all_gather_object``: two more collectives and a pickle), as before."""
    mine = None if error is None else (type(error).__name__, str(error))
    reports: list[Any] = [mine]
    if group is not None:
        failed_somewhere = torch.tensor([0 if error is None else 1], dtype=torch.int32)
        dist.all_reduce(failed_somewhere, op=dist.ReduceOp.MAX, group=group)
        if not failed_somewhere.item():
            return None
        reports = [None] * world_size
        dist.all_gather_object(reports, mine, group=group)
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return None
    failed_rank, (type_name, message) = failed[0]
    cls = error_class(type_name)
    if cls is None:
        cls, message = CheckpointError, f"{type_name}: {message}"
    # DCP hands a rank's write failure to every rank; name a rank only when some succeeded
    where = f" on rank {failed_rank}" if 1 < world_size and len(failed) < world_size else ""
    exc = cls(f"background save of step {step} failed{where}: {message}")
    if failed_rank == rank and error is not None:
        exc.__cause__ = error
    return exc


def hand_to_every_rank(job: Job, result: Any, group: dist.ProcessGroup | None) -> BaseException | None:
    """Rank 0's after_commit result handed to ``job.hooks.on_every_rank`` on every rank (tiers:
    each node completes its local commit); its error, to be agreed on."""
    shared = [result]
    if group is not None:
        dist.broadcast_object_list(shared, src=dist.get_global_rank(group, 0), group=group)
    try:
        assert job.hooks.on_every_rank is not None
        job.hooks.on_every_rank(shared[0])
    except BaseException as e:  # noqa: BLE001 (reported to every rank)
        return e
    return None


def loud(message: str) -> None:
    log.warning(message)
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 (stderr may be gone at exit)
        pass
