"""Overlapped staging (``async_save=True``, the default for async saves, and
``async_save="overlap"``): the staging copy runs during the next forward/backward instead of
inside ``save()``. ``async_save="staged"`` keeps the whole copy inside ``save()``.

A training step does not modify its parameters or its optimizer state until
``optimizer.step()``. So ``save()`` copies only what may change before then — buffers
(BatchNorm statistics change in forward), RNG states, every non-tensor value, and any tensor
that is neither a parameter of a tracked model nor a tracked optimizer's state — and returns;
the background worker copies the parameters and optimizer state ("deferred" tensors) into the
same reused staging buffer while the loop runs forward and backward. A step pre-hook on every
tracked optimizer (``GradScaler.step`` and LR schedulers go through ``optimizer.step()``, so
through the hook) waits for the copy only if it is not done yet.

Consistency is checked, not assumed: each deferred tensor's in-place version counter
(``tensor._version``) is recorded at ``save()`` and read again before and after its copy
(background) and once more in the training thread when it joins the copy (the optimizer
hook, or the next ``save()``/``wait()``/``close()``). An in-place op bumps the counter only
after it has run, so the join — in the thread that made the change, after it — is what sees
a change that raced with the copy. Any change between ``save()`` and the join makes the save
fail loudly (:class:`~dist_ckpt.errors.SnapshotInconsistent`, on every rank, nothing committed, the previous
checkpoint stays the latest): the values at ``save()`` time are gone, so neither keeping the
copy nor copying again could give one consistent state. A change after the copy of that tensor
but before the join also fails the save (the counter cannot tell when it happened): the
check errs on the side of no torn snapshot.

What is deferred (:func:`prepare`). ``"overlap"``: every tracked model's parameters and every
tracked optimizer's state. ``True`` defers only what a step pre-hook guards: the parameters in
the param groups of a tracked optimizer whose ``step()`` runs the hooks (the class's ``step``
is wrapped by ``torch.optim.Optimizer``; a wrapper that never calls it gets no join) and those
optimizers' state. A model nothing optimizes (an EMA copy, frozen weights, a model tracked
without its optimizer) is copied inside ``save()``: nothing would join its copy before it
changes. With no such optimizer at all the save is simply staged (logged once, at debug).

Writes the version counter cannot see — through ``param.data`` (a tensor with a counter of its
own), through raw pointers (custom kernels, NCCL into a parameter's storage) — are caught where
they touch much of a tensor: a sample of every deferred tensor (one element per 4 KiB, and the
last: :mod:`dist_ckpt.overlap_samples`), taken at ``save()``, is compared byte for byte with
the live tensor's sample taken at the join and with its staged copy (by the worker, after the
join: on CUDA the training thread never waits for the samples). A write that changes only
a few elements (a clamp of outliers, an in-place update of some rows) can slip between the
samples: loops that write tracked parameters that way between ``save()`` and the next
``optimizer.step()`` must call ``mgr.wait_staged()`` first or use ``async_save="staged"``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dist_ckpt.overlap_samples import Samples

CHUNK_BYTES = 16 << 20  # copies run in pieces so a test (or a profiler) can act between them

log = logging.getLogger(__name__)


def storage_key(t: torch.Tensor) -> int:
    """The address of the storage ``t`` lives in (0 for an empty one)."""
    local = getattr(t, "_local_tensor", t)  # a DTensor parameter: its local shard
    return int(local.untyped_storage().data_ptr()) if local.numel() else 0


def deferrable(models: Iterable[torch.nn.Module], optimizers: Iterable[torch.optim.Optimizer]) -> frozenset[int]:
    """Storage addresses of the tensors only ``optimizer.step()`` changes in a training step:
    the models' parameters and the optimizers' per-parameter state."""
    keys: set[int] = set()
    for model in models:
        keys.update(storage_key(p) for p in model.parameters())
    for opt in optimizers:
        for per_param in opt.state.values():
            keys.update(storage_key(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    keys.discard(0)
    return frozenset(keys)


_HOOKED: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()


def hook_optimizers(optimizers: Iterable[torch.optim.Optimizer], join: Callable[[], None]) -> None:
    """Make every ``step()`` of these optimizers call ``join`` first (once per optimizer; a
    later manager's ``join`` replaces an earlier one's)."""
    for opt in optimizers:
        old = _HOOKED.pop(opt, None)
        if old is not None:
            old.remove()
        _HOOKED[opt] = opt.register_step_pre_hook(lambda _opt, _args, _kwargs, _join=join: _join())


def runs_step_hooks(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt.step()`` runs its step pre-hooks: ``torch.optim.Optimizer.__init__`` wraps
    the class's ``step`` (and marks it ``hooked``); a subclass that skips it does not."""
    return bool(getattr(type(opt).step, "hooked", False))


def guarded(optimizers: Iterable[torch.optim.Optimizer]) -> frozenset[int]:
    """Storage addresses of what a step pre-hook of these optimizers guards: the parameters of
    their param groups and their per-parameter state (nothing else in a training step changes
    them; ``optimizer.step()`` joins the copy before it does)."""
    keys: set[int] = set()
    for opt in optimizers:
        for group in opt.param_groups:
            keys.update(storage_key(p) for p in group["params"])
        for per_param in opt.state.values():
            keys.update(storage_key(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    keys.discard(0)
    return frozenset(keys)


_STAGED_LOGGED: set[str] = set()


def prepare(state: Any, join: Callable[[], None], mode: bool | str) -> frozenset[int]:
    """For one async save of ``state`` (a TrainingState) with ``async_save=mode``: hook its
    optimizers and return the storages whose copy may be deferred (empty: staged in save())."""
    if mode not in (True, "overlap"):
        return frozenset()
    optimizers = [obj for name, obj in state.objects.items() if state.kinds[name] == "optimizer"]
    if mode == "overlap":
        hook_optimizers(optimizers, join)
        return deferrable(state.models.values(), optimizers)
    hooked = [opt for opt in optimizers if runs_step_hooks(opt)]
    hook_optimizers(hooked, join)
    keys = guarded(hooked)
    why = "no tracked optimizer's step() runs step hooks" if optimizers else "no tracked optimizer"
    if not keys and why not in _STAGED_LOGGED:
        _STAGED_LOGGED.add(why)
        log.debug(
            "async_save=True: %s: staged inside save() (overlapped staging needs a tracked "
            "torch.optim.Optimizer whose step() runs its hooks, to join the copy before it changes anything)",
            why,
        )
    return keys


@dataclass(frozen=True)
class _Item:
    fqn: str
    src: torch.Tensor
    dst: torch.Tensor
    version: int  # the source's version counter at save()


class OverlapCopy:
    """The deferred part of one save's staging copy.

    ``run()`` (background worker) copies, then waits for ``join()`` (training thread), which
    waits for the copy and checks the version counters; ``run()`` returns the verdict: None,
    or a message naming every tensor changed since ``save()``."""

    #: Called between the pieces of the copy (``fqn``, bytes copied of it so far). For tests
    #: that must change a tensor at an exact point of the copy, and for profiling.
    between_chunks: Callable[[str, int], None] | None = None

    def __init__(self, step: int, sources: dict[str, torch.Tensor], views: dict[str, torch.Tensor]):
        self.step = step
        self.items = tuple(_Item(fqn, src, views[fqn], src._version) for fqn, src in sources.items())
        self._at_save = Samples([i.src for i in self.items])  # for writes no version counter counts
        self._at_save.queue_to_host()
        self._at_join: Samples | None = None  # the live tensors' samples, taken by join()
        self.nbytes = sum(i.src.numel() * i.src.element_size() for i in self.items)
        # CUDA: the copies must follow whatever the training stream queued before save()
        self._events = {}
        for item in self.items:
            if item.src.is_cuda and item.src.device not in self._events:
                self._events[item.src.device] = torch.cuda.current_stream(item.src.device).record_event()
        self._copied = threading.Event()
        self._joined = threading.Event()
        self._join_lock = threading.Lock()
        self._changed: list[str] = []  # fqns seen changed (background, then join)
        self._error: BaseException | None = None
        self.copy_s = 0.0  # how long the background copy took
        self.waited_s = 0.0  # how long the training thread waited in join()

    @property
    def copied(self) -> bool:
        return self._copied.is_set()

    # -- background -----------------------------------------------------------------------------
    def run(self) -> tuple[str, str] | None:
        t0 = time.perf_counter()
        try:
            self._copy_all()
        except BaseException as e:  # noqa: BLE001 (becomes the save's verdict, on every rank)
            self._error = e
        finally:
            self.copy_s = time.perf_counter() - t0
            self._copied.set()
        self._joined.wait()
        if self._error is None and self._at_join is not None:
            self._check_samples(self._at_join)
        return self.verdict()

    def _check_samples(self, at_join: Samples) -> None:
        """Here, not in join(): on CUDA the samples reach the host only once the training
        stream's work queued before the join is done, and the training thread must not wait
        for that. A tensor whose sample changed since ``save()`` (live at the join, or in the
        copy) was written where no version counter saw it (``param.data``, raw pointers)."""
        groups = self._at_save.groups
        copied = Samples([i.dst for i in self.items], groups)
        unseen = sorted(set(self._at_save.differing(at_join)) | set(self._at_save.differing(copied)))
        self._changed += [f for f in (self.items[j].fqn for j in unseen) if f not in self._changed]

    def _copy_all(self) -> None:
        streams = {d: torch.cuda.Stream(d) for d in self._events}
        for s_dev, stream in streams.items():
            stream.wait_event(self._events[s_dev])
        hook = type(self).between_chunks
        with torch.no_grad():
            for item in self.items:
                if item.src._version != item.version:
                    self._changed.append(item.fqn)
                    continue
                src, dst = item.src.reshape(-1), item.dst.reshape(-1)
                per_chunk = max(1, CHUNK_BYTES // max(1, src.element_size()))
                for start in range(0, src.numel(), per_chunk):
                    if src.is_cuda:
                        with torch.cuda.stream(streams[src.device]):
                            dst[start : start + per_chunk].copy_(src[start : start + per_chunk], non_blocking=True)
                    else:
                        dst[start : start + per_chunk].copy_(src[start : start + per_chunk])
                    if hook is not None:
                        hook(item.fqn, min(src.numel(), start + per_chunk) * src.element_size())
                if item.src._version != item.version:
                    self._changed.append(item.fqn)
        for stream in streams.values():
            stream.synchronize()

    # -- training thread ------------------------------------------------------------------------
    def join(self) -> None:
        """Wait for the copy (only if it is not done), then check every version counter here,
        in the thread whose in-place ops they count."""
        if self._joined.is_set():
            return
        with self._join_lock:
            if self._joined.is_set():
                return
            t0 = time.perf_counter()
            self._copied.wait()
            self.waited_s = time.perf_counter() - t0
            late = [i.fqn for i in self.items if i.src._version != i.version and i.fqn not in self._changed]
            if self._error is None:  # compared by the worker (run): writes no version counter saw
                self._at_join = Samples([i.src for i in self.items], self._at_save.groups)
                self._at_join.queue_to_host()
            self._changed.extend(late)
            self._joined.set()

    def verdict(self) -> tuple[str, str] | None:
        """None, or (error type name, message) for the snapshot's ``value_error``."""
        if self._error is not None:
            return (
                "CheckpointError",
                f"the overlapped staging copy failed: {type(self._error).__name__}: {self._error}",
            )
        if not self._changed:
            return None
        # in tracked order, not detection order (worker or join: a race), so the names shown
        # first do not depend on timing
        order = {item.fqn: k for k, item in enumerate(self.items)}
        changed = sorted(set(self._changed), key=order.__getitem__)
        names = ", ".join(changed[:10]) + (f" (+{len(changed) - 10} more)" if len(changed) > 10 else "")
        return (
            "SnapshotInconsistent",
            f"step {self.step}: {len(changed)} tracked tensor(s) changed in place between save() and the "
            f"next optimizer step, before the overlapped staging copy had them: {names}. With overlapped "
            "staging (async_save=True or 'overlap'), parameters and optimizer state may change only in "
            "optimizer.step() until the copy is joined; nothing of this step was committed. Call "
            "mgr.wait_staged() before changing them elsewhere, or use async_save='staged' (the copy is taken "
            "inside save()).",
        )
