"""How a tensor's chunks are laid out across ranks, described in O(1) where a rule fits.

Format 2 of ``metadata.json`` describes each tensor's chunks in one of three forms:

``"on": R``
    one chunk, the whole tensor, stored by rank ``R`` (replicated state written once).
``"split": [dim, first_rank, count, chunk]``
    ``count`` chunks along ``dim``, chunk ``i`` stored by rank ``first_rank + i`` at offset
    ``min(i * chunk, n)`` with ``max(0, min(chunk, n - i * chunk))`` rows (``n`` the tensor's
    size along ``dim``; every other dimension whole): what ``torch.chunk`` and DTensor
    ``Shard(dim)`` produce, even or near-even, empty trailing chunks included.
``"chunks": [[offsets, sizes, rank], ...]``
    anything else, listed chunk by chunk (only the tensors that need it).

The entry holding a chunk is named from the key and the chunk's offsets (:func:`entry_name`),
so neither form stores names; the chunk's checksum and stored size are in the per-rank index
of the file that holds it (:mod:`dist_ckpt.format.rank_index`). No torch here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


def entry_name(fqn: str, offsets: Sequence[int] | None) -> str:
    """The shard entry name of the chunk of ``fqn`` at ``offsets`` (None: a value)."""
    if offsets is None or not any(offsets):
        return fqn
    return f"{fqn}@{','.join(map(str, offsets))}"


@dataclass(frozen=True)
class Placed:
    """One chunk as the writer saw it: its box and the rank that stored it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    rank: int


@dataclass(frozen=True)
class SplitRule:
    """``count`` chunks of ``chunk`` rows along ``dim``, chunk ``i`` on rank ``first_rank + i``."""

    size: tuple[int, ...]
    dim: int
    first_rank: int
    count: int
    chunk: int

    def box(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = self.size[self.dim]
        start = min(i * self.chunk, n)
        rows = max(0, min(self.chunk, n - i * self.chunk))
        offsets = tuple(start if d == self.dim else 0 for d in range(len(self.size)))
        sizes = tuple(rows if d == self.dim else s for d, s in enumerate(self.size))
        return offsets, sizes

    def placed(self, i: int) -> Placed:
        offsets, sizes = self.box(i)
        return Placed(offsets, sizes, self.first_rank + i)


def _follows(rule: SplitRule, offsets: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]]) -> bool:
    """Whether chunk ``i`` is ``rule.box(i)`` for every ``i``: one list comparison per
    dimension instead of a box per chunk."""
    n, length, step = rule.count, rule.size[rule.dim], rule.chunk
    starts = [min(i * step, length) for i in range(n)]
    for d, full in enumerate(rule.size):
        if d == rule.dim:
            if [o[d] for o in offsets] != starts or [s[d] for s in sizes] != [
                max(0, min(step, length - a)) for a in starts
            ]:
                return False
        elif [o[d] for o in offsets].count(0) != n or [s[d] for s in sizes].count(full) != n:
            return False
    return True


def layout_json(
    size: tuple[int, ...], offsets: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]], ranks: Sequence[int]
) -> dict[str, Any]:
    """The compact description of the chunks ``(offsets[i], sizes[i])`` stored by ``ranks[i]``
    (see the module docstring). The coordinator calls this once per tensor: a rule is checked
    with a few list comparisons (C loops), so the pass over 2 million chunks takes seconds."""
    n = len(ranks)
    if n == 1 and not any(offsets[0]) and tuple(sizes[0]) == size:
        return {"on": ranks[0]}
    if n and ranks != list(range(ranks[0], ranks[0] + n)):  # not in rank order: order, then try
        order = sorted(range(n), key=lambda i: (ranks[i], tuple(offsets[i])))
        offsets, sizes, ranks = [offsets[i] for i in order], [sizes[i] for i in order], [ranks[i] for i in order]
    if n and size and ranks == list(range(ranks[0], ranks[0] + n)):
        diff = [d for d, (s, full) in enumerate(zip(sizes[0], size)) if s != full]
        if len(diff) <= 1:
            dim = diff[0] if diff else 0
            rule = SplitRule(size, dim, ranks[0], n, sizes[0][dim] if n > 1 else size[dim])
            if _follows(rule, offsets, sizes):
                return {"split": [rule.dim, rule.first_rank, rule.count, rule.chunk]}
    return {"chunks": [[list(o), list(s), r] for o, s, r in zip(offsets, sizes, ranks)]}


class Layout(Sequence[Placed]):
    """A tensor's chunks, computed on access from a rule (or listed): parsing a rule costs
    O(1) however many ranks it spans."""

    def __init__(self, size: tuple[int, ...], rule: SplitRule | None, listed: tuple[Placed, ...] = ()):
        self.size, self.rule, self.listed = size, rule, listed

    def __len__(self) -> int:
        return self.rule.count if self.rule is not None else len(self.listed)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.rule is None:
            return self.listed[i]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.rule.placed(i)

    def __iter__(self) -> Iterator[Placed]:
        if self.rule is None:
            return iter(self.listed)
        return (self.rule.placed(i) for i in range(self.rule.count))

    @property
    def listed_count(self) -> int:
        return len(self.listed)


def _ints(obj: Any, where: str, n: int | None = None) -> tuple[int, ...]:
    if (
        not isinstance(obj, list)
        or not all(type(v) is int and v >= 0 for v in obj)
        or (n is not None and len(obj) != n)
    ):
        want = f"a list of {n} non-negative integers" if n is not None else "a list of non-negative integers"
        raise ValueError(f"{where}: expected {want}, found {obj!r:.80}")
    return tuple(obj)


def parse_layout(obj: dict[str, Any], size: tuple[int, ...], world_size: int, where: str) -> Layout:
    """The :class:`Layout` a tensor record describes; ``ValueError`` naming ``where`` if malformed."""
    forms = [k for k in ("on", "split", "chunks") if k in obj]
    if len(forms) != 1:
        raise ValueError(f"{where}: expected exactly one of 'on', 'split', 'chunks', found {sorted(obj)}")
    if "on" in obj:
        (rank,) = _ints([obj["on"]], where)
        if rank >= world_size:
            raise ValueError(f"{where}: rank {rank} outside world size {world_size}")
        return Layout(size, None, (Placed((0,) * len(size), size, rank),))
    if "split" in obj:
        dim, first, count, chunk = _ints(obj["split"], f"{where}: split", 4)
        if dim >= len(size) or count < 1 or first + count > world_size:
            raise ValueError(f"{where}: split {obj['split']} does not fit size {list(size)} at world size {world_size}")
        return Layout(size, SplitRule(size, dim, first, count, chunk))
    listed = []
    if not isinstance(obj["chunks"], list):
        raise ValueError(f"{where}: 'chunks' must be a list")
    for c in obj["chunks"]:
        if not isinstance(c, list) or len(c) != 3:
            raise ValueError(f"{where}: a chunk is [offsets, sizes, rank], found {c!r:.80}")
        offsets, sizes = _ints(c[0], where, len(size)), _ints(c[1], where, len(size))
        (rank,) = _ints([c[2]], where)
        if rank >= world_size:
            raise ValueError(f"{where}: rank {rank} outside world size {world_size}")
        listed.append(Placed(offsets, sizes, rank))
    return Layout(size, None, tuple(listed))
