"""Where a tracked data loader stands in its epoch: the saved record, and the pure arithmetic
of continuing an interrupted epoch — at the same world size or at another one.

A record is one JSON document per rank (never pickle), stored by the manager under
``<name>.rank_<r>``:

- ``epoch``: the ``DistributedSampler``'s epoch when the pass started (None for other samplers)
- ``yielded``: batches the loader handed to the training loop in that pass
- ``finished``: the pass raised ``StopIteration``
- ``start`` / ``current``: RNG states (base64) of the generators the pass draws from — the
  global torch CPU generator and the loader's / sampler's own ``generator``, if any — when
  the pass's sampler started, and (own generators only) at save time
- ``base``: the state the worker base seed was drawn from, and the generator it came from
- ``order``: for a ``DistributedSampler``, what defines the epoch's global sample order
  (dataset length, seed, shuffle, drop_last, the world size the epoch started with) and the
  count of global positions consumed before this pass (``offset``: non-zero only when the
  pass continues an epoch after a world-size change, see :func:`step_sizes`)
"""

from __future__ import annotations

import base64
import copy
import json
import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.utils.data import DistributedSampler

from dist_ckpt.errors import CorruptCheckpoint

FORMAT = 1


def encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


_STATE_BYTES = torch.Generator().get_state().numel()


def decode_state(text: str, where: str = "data position") -> torch.Tensor:
    """A CPU generator state saved by :func:`encode_state`; checked before any generator
    is set from it."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        raise CorruptCheckpoint(f"{where}: a generator state is not base64 ({e})") from e
    if len(raw) != _STATE_BYTES:
        raise CorruptCheckpoint(f"{where}: a generator state has {len(raw)} bytes, expected {_STATE_BYTES}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def advance_by_seed_draw(state: torch.Tensor) -> torch.Tensor:
    """The state after the draw ``DataLoader`` makes for a worker base seed (one int64)."""
    scratch = torch.Generator()
    scratch.set_state(state)
    torch.empty((), dtype=torch.int64).random_(generator=scratch)
    return scratch.get_state()


@dataclass(frozen=True)
class GlobalOrder:
    """What fixes a ``DistributedSampler`` epoch's global order (rank ``r`` of ``world``
    takes positions ``r, r + world, …`` of it)."""

    length: int
    seed: int
    shuffle: bool
    drop_last: bool
    world: int
    offset: int = 0  # global positions consumed before this pass (a continued epoch)
    spread_world: int | None = None  # set when this pass spreads the rest over another world
    spread_batch: int | None = None


@dataclass(frozen=True)
class PassRecord:
    epoch: int | None
    yielded: int = 0
    finished: bool = False
    started: bool = False  # the sampler produced its first batch (its draws are made)
    start: dict[str, str] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)
    base_source: str | None = None
    base_state: str | None = None
    order: GlobalOrder | None = None
    batch_size: int | None = None
    rank: int = 0
    world: int = 1
    length: int | None = None  # batches the pass has in all

    @property
    def complete(self) -> bool:
        return self.finished or (self.length is not None and self.yielded >= self.length)

    def encode(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def decode(cls, text: str, where: str) -> PassRecord:
        try:
            doc = json.loads(text)
            if doc.pop("format") != FORMAT:
                raise ValueError("unknown format")
            order = doc.pop("order")
            record = cls(**doc, order=GlobalOrder(**order) if order is not None else None)
            if not (
                isinstance(record.yielded, int)
                and record.yielded >= 0
                and isinstance(record.world, int)
                and (record.epoch is None or isinstance(record.epoch, int))
            ):
                raise ValueError("epoch, yielded or world is not a count")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptCheckpoint(f"{where}: not a data-position record ({e})") from e
        for text in [*record.start.values(), *record.current.values(), *filter(None, [record.base_state])]:
            decode_state(text, where)  # refuse a damaged state before any generator is set
        return record

    def consumed(self) -> int:
        """Global positions of the epoch's order trained on by all ranks together (ranks of
        one job step in lockstep, so each rank's record gives the same count)."""
        order = self.order
        if order is None:
            return 0
        if self.complete:  # also what a drop_last loader left out: the epoch is over
            return order_total(order)
        if order.spread_world is not None:
            sizes = step_sizes(order_total(order) - order.offset, order.spread_world, order.spread_batch or 1)
            return order.offset + sum(sizes[: self.yielded])
        per_rank = order_total(order) // order.world
        return min(self.yielded * (self.batch_size or 1), per_rank) * order.world

    def with_yielded(self, yielded: int, finished: bool) -> PassRecord:
        return replace(self, yielded=yielded, finished=finished)


def order_of(sampler: DistributedSampler, offset: int = 0) -> GlobalOrder:
    return GlobalOrder(
        len(sampler.dataset),
        int(sampler.seed),
        bool(sampler.shuffle),
        bool(sampler.drop_last),  # type: ignore[arg-type]
        int(sampler.num_replicas),
        offset,
    )


def _as_world(sampler: DistributedSampler, order: GlobalOrder, rank: int) -> DistributedSampler:
    """A copy of ``sampler`` as rank ``rank`` of ``order.world`` saw it (the subclass and its
    ``__iter__`` kept; the sizes recomputed by ``DistributedSampler.__init__`` itself)."""
    clone = copy.copy(sampler)
    DistributedSampler.__init__(
        clone,
        sampler.dataset,
        num_replicas=order.world,
        rank=rank,  # type: ignore[arg-type]
        shuffle=order.shuffle,
        seed=order.seed,
        drop_last=order.drop_last,
    )
    return clone


def order_total(order: GlobalOrder) -> int:
    """Length of the epoch's global order (padded or trimmed to a multiple of the world)."""
    if order.drop_last and order.length % order.world != 0:
        per_rank = math.ceil((order.length - order.world) / order.world)
    else:
        per_rank = math.ceil(order.length / order.world)
    return per_rank * order.world


def global_order(sampler: DistributedSampler, order: GlobalOrder, epoch: int) -> list[int]:
    """The epoch's sample indices in the global order the sampler defined for ``order.world``
    ranks: position ``p`` is the ``p // world``-th index of rank ``p % world``."""
    per_rank = []
    for r in range(order.world):
        clone = _as_world(sampler, order, r)
        clone.set_epoch(epoch)
        per_rank.append(list(iter(clone)))
    return [per_rank[p % order.world][p // order.world] for p in range(order.world * len(per_rank[0]))]


def step_sizes(remaining: int, world: int, batch: int) -> list[int]:
    """Samples per step (all ranks together) to finish ``remaining`` samples on ``world``
    ranks with batches of at most ``batch``: full steps first; every rank gets at least one
    sample per step where the counts allow it, so all ranks take the same number of steps."""
    if remaining <= 0:
        return []
    full = world * batch
    steps = math.ceil(remaining / full)
    sizes = [full] * (steps - 1) + [remaining - (steps - 1) * full]
    if sizes[-1] < world and steps >= 2 and batch >= 2:
        moved = world - sizes[-1]  # the previous step keeps >= world*(batch-1) >= world
        sizes[-2] -= moved
        sizes[-1] += moved
    return sizes


def spread_batches(rest: list[int], world: int, rank: int, batch: int) -> tuple[list[list[int]], bool]:
    """Rank ``rank``'s batches of ``rest`` (the remaining global order) over ``world`` ranks,
    step by step in that order, dealt like ``DistributedSampler`` (rank r takes every
    ``world``-th entry of a step). Returns the batches and whether a rank had to repeat a
    sample (only when fewer samples than ranks remain for a step)."""
    out: list[list[int]] = []
    repeated = False
    pos = 0
    for size in step_sizes(len(rest), world, batch):
        chunk = rest[pos : pos + size]
        pos += size
        mine = chunk[rank::world]
        if not mine:  # every rank must take the step (DDP collectives): repeat one sample
            mine, repeated = [chunk[rank % len(chunk)]], True
        out.append(mine)
    return out, repeated
