"""Staging of async saves: one flat host buffer, allocated on the first save, reused after.

``save()`` flattens the state dict exactly as DCP's planner does (``a.b.c`` keys), describes
every local tensor (plain tensors; DTensor shards with their offset in the global tensor),
and copies the tensors into views of one flat ``uint8`` buffer. The buffer is kept and reused
by every later save whose layout (keys, shapes, dtypes, shard offsets) is unchanged; a new
layout (e.g. the optimizer's state appearing after its first step) allocates a new one.

The buffer is

* plain host memory when every tensor is on the CPU;
* page-locked (pinned) when some tensor lives on CUDA, so the device-to-host copies run at
  full bandwidth (``non_blocking`` copies, then one synchronisation);
* shared memory (``UntypedStorage._new_shared``, the file-descriptor strategy: no name is
  left in ``/dev/shm``) when a background *process* writes the checkpoint — it is sent to
  that process once and mapped there; CUDA-resident states pin it with ``cudaHostRegister``
  (``torch.cuda._pin_memory_utils``, as ``torch.distributed.checkpoint``'s own stager does).

Non-tensor values (optimizer hyper-parameters, scheduler state, the manager's progress record,
RNG states) are deep-copied at ``save()`` time (they are small) and JSON-encoded in the
background by the planner, inside DCP's planning step, so an unsupported value fails that
save on every rank (raised at the next call) instead of one rank's ``save()``.

``torch.distributed.checkpoint.staging.DefaultStager`` was considered: it allocates one
storage per tensor (one shared-memory segment and one pin registration each), keys its reuse
on the identity of the source storages, and hands back a deep copy of the whole state dict
(DTensors and their device meshes included), which a separate process could not rebuild
without the training job's process groups. One flat buffer is one allocation, one segment to
pass to a worker process once, and an exact budget for ``max_staging_bytes``.
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from dist_ckpt.compact_plan import MeshSplit, split_of
from dist_ckpt.dcp_internals import flatten_state_dict
from dist_ckpt.errors import ConfigError
from dist_ckpt.format import json_values

log = logging.getLogger(__name__)

ALIGN = 64  # every view starts on a cache line (and on any dtype's alignment)
# Flat keys whose values save() builds anew for every call (rng.capture(), the progress record
# Progress.encode()): nothing else holds them, so they are not deep-copied (the Python RNG
# state alone is 625 ints; copying it was a measurable part of a small state's stall).
FRESH_PREFIXES = ("rng.", "_dist_ckpt")


def _snapshot_values(values: dict[str, Any]) -> dict[str, Any]:
    live = {k: v for k, v in values.items() if not k.startswith(FRESH_PREFIXES)}
    return {**values, **copy.deepcopy(live)}


@dataclass(frozen=True)
class TensorSpec:
    """Where one local tensor lives in the staging buffer."""

    fqn: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunk_offsets: tuple[int, ...] | None = None  # DTensor shard: its offset in the global tensor
    global_shape: tuple[int, ...] | None = None  # DTensor shard: the global shape
    split: MeshSplit | None = None  # DTensor shard a split rule describes (compact_plan)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.fqn, self.shape, self.dtype, self.chunk_offsets, self.global_shape)


@dataclass
class Layout:
    """The flattened state of one ``save()``: tensors described, sources not yet copied."""

    specs: tuple[TensorSpec, ...]
    sources: dict[str, torch.Tensor]  # fqn → live local tensor
    values: dict[str, Any]  # fqn → live non-tensor value
    order: tuple[str, ...]  # flat keys in DCP's order
    mappings: dict[str, Any]
    nbytes: int

    @property
    def key(self) -> tuple[Any, ...]:
        return tuple(s.key for s in self.specs)


@dataclass
class Snapshot:
    """What the background writes: tensors (staged views, or live ones when unstaged), values
    as JSON bytes, and the layout needed to plan the DCP save."""

    tensors: dict[str, torch.Tensor]
    values: dict[str, Any]  # deep copies taken at save() time
    specs: tuple[TensorSpec, ...]
    order: tuple[str, ...]
    mappings: dict[str, Any]
    shards: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    encoded: dict[str, bytes] | None = None  # the values' JSON, when encoded already
    value_error: tuple[str, str] | None = None  # (type name, message) of a failed encoding
    spread: frozenset[str] = frozenset()  # keys written by all ranks in balanced parts (spread_writes)

    def flat_state_dict(self) -> dict[str, Any]:
        return {fqn: self.tensors[fqn] if fqn in self.tensors else self.values[fqn] for fqn in self.order}


def _shard_of(obj: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(obj.shape, obj.device_mesh, obj.placements)
    return tuple(int(s) for s in sizes), tuple(int(o) for o in offsets)


def describe(state_dict: dict[str, Any]) -> Layout:
    """Flatten ``state_dict`` (as DCP's planner would) and lay its local tensors out."""
    flat, mappings = flatten_state_dict(state_dict)
    specs: list[TensorSpec] = []
    sources: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    order: list[str] = []
    offset = 0
    for fqn, obj in flat.items():
        chunk: tuple[int, ...] | None = None
        global_shape: tuple[int, ...] | None = None
        if isinstance(obj, DTensor):
            if obj.device_mesh.get_coordinate() is None:
                continue  # this rank holds no part of it (DCP skips it too)
            sizes, chunk = _shard_of(obj)
            global_shape = tuple(obj.shape)
            local = obj._local_tensor
            if tuple(local.shape) != sizes:
                raise ConfigError(
                    f"{fqn}: DTensor local shape {list(local.shape)} differs from its shard {list(sizes)}"
                )
        elif isinstance(obj, torch.Tensor):
            if type(obj) not in (torch.Tensor, torch.nn.Parameter):
                raise ConfigError(
                    f"{fqn}: async saves stage plain tensors and DTensors, not {type(obj).__qualname__}; "
                    "use async_save=False for this state"
                )
            local = obj
        else:
            values[fqn] = obj
            order.append(fqn)
            continue
        nbytes = local.numel() * local.element_size()
        split = split_of(obj) if chunk is not None else None
        specs.append(TensorSpec(fqn, offset, nbytes, tuple(local.shape), local.dtype, chunk, global_shape, split))
        sources[fqn] = local
        order.append(fqn)
        offset += math.ceil(nbytes / ALIGN) * ALIGN
    return Layout(tuple(specs), sources, values, tuple(order), mappings, offset)


def views(buffer: torch.Tensor, specs: tuple[TensorSpec, ...]) -> dict[str, torch.Tensor]:
    """The staged tensors: views of ``buffer`` as ``specs`` lay them out."""
    return {s.fqn: buffer[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in specs}


def shards_of(specs: tuple[TensorSpec, ...]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {s.fqn: (s.chunk_offsets, s.global_shape) for s in specs if s.chunk_offsets is not None}  # type: ignore[misc]


def encode_values(values: dict[str, Any]) -> dict[str, bytes]:
    return {fqn: json_values.encode(value, fqn) for fqn, value in values.items()}


def _allocate(nbytes: int, *, pinned: bool, shared: bool) -> tuple[torch.Tensor, Any]:
    """A flat uint8 buffer and the finaliser that unpins it (or None)."""
    nbytes = max(nbytes, ALIGN)  # never empty: a state without tensors still gets one
    if not shared:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned), None
    storage = torch.UntypedStorage._new_shared(nbytes, device="cpu")  # no private copy first
    buffer = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
    if not pinned:
        return buffer, None
    import torch.cuda._pin_memory_utils as pin_memory_utils

    pin_memory_utils.pin_memory(buffer.data_ptr(), nbytes)
    finaliser = weakref.finalize(storage, pin_memory_utils.unpin_memory, buffer.data_ptr())
    finaliser.atexit = False  # never after the CUDA context is gone
    return buffer, finaliser


class Stager:
    """Owns the staging buffer of one manager and copies states into it."""

    def __init__(self, *, shared: bool = False):
        self.shared = shared
        self.buffer: torch.Tensor | None = None
        self.allocations = 0  # how many buffers were allocated (tests, logs)
        self.generation = 0  # bumped whenever ``buffer`` is replaced
        self._key: tuple[Any, ...] | None = None
        self._views: dict[str, torch.Tensor] = {}
        self._unpin: Any = None

    def staged(self) -> dict[str, torch.Tensor]:
        """The staging tensors (views of the buffer) by flat key."""
        return dict(self._views)

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def stage(self, layout: Layout, defer: frozenset[str] = frozenset()) -> Snapshot:
        """Copy the layout's tensors into the (reused) buffer — except those named in ``defer``,
        whose views the caller fills later (:mod:`dist_ckpt.overlap`) —; snapshot its values."""
        values = _snapshot_values(layout.values)
        self._ensure(layout)
        cuda_devices: set[torch.device] = set()
        with torch.no_grad():
            for spec in layout.specs:
                if spec.fqn in defer:
                    continue
                src = layout.sources[spec.fqn]
                if src.is_cuda:
                    cuda_devices.add(src.device)
                    self._views[spec.fqn].copy_(src, non_blocking=True)
                else:
                    self._views[spec.fqn].copy_(src)
        for device in cuda_devices:  # the copies were queued on each device's current stream
            torch.cuda.current_stream(device).synchronize()
        return Snapshot(dict(self._views), values, layout.specs, layout.order, layout.mappings, shards_of(layout.specs))

    @staticmethod
    def unstaged(layout: Layout) -> Snapshot:
        """A snapshot that refers to the live tensors (a synchronous save streams from them)."""
        return Snapshot(
            dict(layout.sources),
            _snapshot_values(layout.values),
            layout.specs,
            layout.order,
            layout.mappings,
            shards_of(layout.specs),
        )

    def _ensure(self, layout: Layout) -> None:
        if self.buffer is not None and self._key == layout.key:
            return
        pinned = any(t.is_cuda for t in layout.sources.values()) and torch.cuda.is_available()
        if self.buffer is not None:
            log.info("state layout changed: new staging buffer of %d bytes (was %d)", layout.nbytes, self.nbytes)
        self.release()
        self.buffer, self._unpin = _allocate(layout.nbytes, pinned=pinned, shared=self.shared)
        self._views = views(self.buffer, layout.specs)
        self._key = layout.key
        self.allocations += 1
        self.generation += 1

    def release(self) -> None:
        """Drop the buffer (unpinning it). Views handed out earlier must no longer be used."""
        self._views = {}
        self._key = None
        self.buffer = None
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
