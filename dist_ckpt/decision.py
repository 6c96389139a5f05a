"""The save decision in one small collective.

``save()`` runs on every rank at every step, and most calls save nothing. Rank 0 decides
(due or not, the recorded metrics, best values, patience, whether an async save is in flight)
and every rank must learn the decision. ``broadcast_object_list`` would take two broadcasts
(sizes, then a pickle); here the decision travels as JSON in one broadcast of a fixed
:data:`CAPACITY`-byte tensor. Only a decision that does not fit (hundreds of metrics) or an
error on rank 0 takes a second, ``broadcast_object_list`` round (the manager's ``agree``).

Rank 0 does not wait for that broadcast (CPU/gloo groups): it already holds the decision, and
gloo's send completes only once every other rank has reached its own ``save()`` — under load,
a late rank's scheduling delay, which the training loop of rank 0 would stall for on every
call. Rank 0 posts the send and goes on (staging its tensors meanwhile); the send is waited
for at the next decision on the same group and by :func:`settle_sends` (the manager's
``close()``), so at most one is outstanding. The other ranks still wait for the decision
before acting on it: no rank ever acts on a decision it has not received, and collectives
stay in the same order on every rank (gloo matches them by their sequence in the group).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from dist_ckpt.progress import Progress

CAPACITY = 1024
# rank 0's decision sends not yet known to be complete, per group (None: the default group):
# keyed by the group object's id (the group is held, so its id is never reused meanwhile): the
# work, the buffer it sends from (which must outlive it) and the group
_SENDS: dict[int, tuple[Any, torch.Tensor, dist.ProcessGroup]] = {}
_HEADER = struct.Struct("<BI")  # status, payload length
_INLINE, _FALLBACK = 1, 2

Decision = tuple[tuple[Progress, bool], bool]  # ((progress, due), async save in flight)


def _device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the group's collectives take a tensor: the device ``broadcast_object_list`` uses
    (CPU for gloo; the current CUDA device for an NCCL-only group)."""
    try:
        from torch.distributed.distributed_c10d import _get_object_coll_device

        kind = _get_object_coll_device(group)
    except ImportError:  # an older/newer torch without the helper: decide from the backend name
        kind = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _pack(decision: Decision) -> bytes:
    (progress, due), busy = decision
    doc = {
        "due": due,
        "busy": busy,
        "step": progress.step,
        "epoch": progress.epoch,
        "metrics": dict(progress.metrics),
        "best": dict(progress.best),
        "since": dict(progress.since_improvement),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _unpack(payload: bytes, base: Progress) -> Decision:
    doc = json.loads(payload)
    progress = replace(
        base,
        step=doc["step"],
        epoch=doc["epoch"],
        metrics=doc["metrics"],
        best=doc["best"],
        since_improvement=doc["since"],
    )
    return (progress, doc["due"]), doc["busy"]


def share_decision(
    compute: Callable[[], Decision],
    *,
    rank: int,
    base: Progress,
    group: dist.ProcessGroup | None,
    distributed: bool,
    agree: Callable[[Callable[[], Any] | None], Any],
) -> Decision:
    """Rank 0 runs ``compute``; every rank returns its result. ``base`` is this rank's
    progress (equal on every rank but for the fields a decision carries); ``agree`` is the
    general rank-0-decides collective, used for errors and oversized decisions."""
    if not distributed:
        return agree(compute)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    buffer = torch.zeros(CAPACITY, dtype=torch.uint8)
    outcome: Any = None
    if rank == 0:
        payload: bytes | None = None
        try:
            outcome = compute()
        except Exception as e:  # noqa: BLE001 (handed to every rank by ``agree`` below)
            outcome = e
        else:
            try:
                payload = _pack(outcome)
            except (TypeError, ValueError):  # e.g. an epoch given as a NumPy integer: the general way
                payload = None
        inline = payload is not None and len(payload) <= CAPACITY - _HEADER.size
        _HEADER.pack_into(
            memoryview(buffer.numpy()), 0, _INLINE if inline else _FALLBACK, len(payload) if inline else 0
        )
        if inline:
            assert payload is not None
            buffer[_HEADER.size : _HEADER.size + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    device = _device(group)
    _wait_send(group)  # the previous decision's send (at most one outstanding per group)
    if rank == 0 and device.type == "cpu" and status_of(buffer) == _INLINE:
        # rank 0 holds the decision already: post the send and go on (see the module docstring)
        work = dist.broadcast(buffer, src=src, group=group, async_op=True)
        resolved = _resolved(group)
        _SENDS[id(resolved)] = (work, buffer, resolved)
        return outcome
    if device.type != "cpu":
        buffer = buffer.to(device)
    dist.broadcast(buffer, src=src, group=group)
    buffer = buffer.cpu()
    status, length = _HEADER.unpack_from(buffer.numpy().tobytes(), 0)
    if status == _INLINE:
        return outcome if rank == 0 else _unpack(buffer[_HEADER.size : _HEADER.size + length].numpy().tobytes(), base)

    def again() -> Decision:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return agree(again if rank == 0 else None)


def status_of(buffer: torch.Tensor) -> int:
    """The status byte rank 0 packed into a decision buffer."""
    return int(buffer[0])


def _resolved(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _get_default_group

    return group if group is not None else _get_default_group()


def _wait_send(group: dist.ProcessGroup | None) -> None:
    pending = _SENDS.pop(id(_resolved(group)), None)
    if pending is not None:
        pending[0].wait()


def settle_sends(group: dist.ProcessGroup | None) -> None:
    """Wait for rank 0's outstanding decision send on ``group`` (None: the default group), if
    any: the manager's ``close()`` calls it, so a process group destroyed right after
    ``close()`` never drops a decision another rank still waits for."""
    if dist.is_available() and dist.is_initialized():
        _wait_send(group)
