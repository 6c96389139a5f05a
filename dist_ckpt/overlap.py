"""Overlapped staging (``async_save="overlap"``): the staging copy runs during the next
forward/backward instead of inside ``save()``.

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

Not seen by the version counter (so not covered; use ``async_save=True`` for such loops):
in-place writes through ``param.data`` (a tensor with a counter of its own), writes by other
processes or through raw pointers (custom kernels, NCCL into a parameter's storage).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

CHUNK_BYTES = 16 << 20  # copies run in pieces so a test (or a profiler) can act between them


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


def prepare(state: Any, join: Callable[[], None]) -> frozenset[int]:
    """For one overlapped save of ``state`` (a TrainingState): hook its optimizers and return
    the storages whose copy may be deferred."""
    optimizers = [obj for name, obj in state.objects.items() if state.kinds[name] == "optimizer"]
    hook_optimizers(optimizers, join)
    return deferrable(state.models.values(), optimizers)


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
        return self.verdict()

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
        names = ", ".join(self._changed[:10]) + (
            f" (+{len(self._changed) - 10} more)" if len(self._changed) > 10 else ""
        )
        return (
            "SnapshotInconsistent",
            f"step {self.step}: {len(self._changed)} tracked tensor(s) changed in place between save() and the "
            f"next optimizer step, before the overlapped staging copy had them: {names}. With "
            "async_save='overlap', parameters and optimizer state may change only in optimizer.step() until the "
            "copy is joined; nothing of this step was committed. Call mgr.wait_staged() before changing them "
            "elsewhere, or use async_save=True (the copy is taken inside save()).",
        )
