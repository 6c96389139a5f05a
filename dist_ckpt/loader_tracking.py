"""Exact mid-epoch resume for a plain ``torch.utils.data.DataLoader``.

``iter(loader)`` draws the worker base seed from the global torch generator (or the loader's
``generator``), and a shuffling sampler without its own generator draws its seed from it too.
In the run that was checkpointed those draws happened *before* the saved steps; a resumed
script calls ``iter(loader)`` again after ``restore()`` and would draw again, shifting every
random number of the resumed run — and it would start the epoch from its first batch.

``track()`` therefore swaps the loader's class for a subclass (same object, same attributes;
:mod:`dist_ckpt.loader_hooks`) that, on every ``iter()``, records the states of the generators
the pass draws from and counts the batches it yields. Tracking changes nothing in a run that is not resumed. After
``restore()``, the next ``iter()`` of the interrupted epoch replays the pass start from the
recorded states — same base seed, same sampler permutation — skips the batches already
trained on at the level of sampler indices (no sample is loaded), and puts every generator
back to the restored state, so the first resumed step sees exactly the uninterrupted run's RNG.
After a world-size change a ``DistributedSampler`` epoch is finished over the new ranks
(:mod:`dist_ckpt.data_position`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from dist_ckpt import data_position as dp
from dist_ckpt.errors import ConfigError
from dist_ckpt.loader_hooks import (
    TRACKER_ATTR,
    CountingIterator,
    CurrentPass,
    IndexSampler,
    ScratchSeed,
    generator_sources,
    tracked_class,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Replay:
    """How the next pass's sampler iteration must begin."""

    start: dict[str, torch.Tensor]
    skip: int
    started: bool
    targets: dict[str, torch.Generator]  # the live generators (not the scratch seed generator)
    batches: list[list[int]] | None = None  # a continued epoch after a world-size change


class LoaderPosition:
    """The tracked form of a plain ``DataLoader``: ``state_dict()`` is this rank's position
    record (JSON) under ``rank_<r>``; ``load_state_dict()`` arms the resume of the next pass."""

    def __init__(self, loader: DataLoader, name: str, rank: int, world_size: int):
        if isinstance(loader.dataset, IterableDataset):
            raise ConfigError(
                f"track({name}=...): the DataLoader reads an iterable-style dataset, whose position "
                "cannot be derived from sampler indices. Use torchdata's StatefulDataLoader with a "
                "dataset that implements state_dict()/load_state_dict(), and track that loader."
            )
        self.loader, self.name, self.rank, self.world = loader, name, rank, world_size
        self._pass: CurrentPass | None = None
        self._pending: dp.PassRecord | None = None  # the interrupted pass, until the next iter()
        self._spread_from: list[dp.PassRecord] | None = None  # all old ranks' records (world change)
        self._restored_base: tuple[str, torch.Tensor] | None = None  # persistent workers
        self._replay: _Replay | None = None
        self._wrapper: IndexSampler | None = None
        loader.__class__ = tracked_class(type(loader))
        setattr(loader, TRACKER_ATTR, self)

    # -- hooks the loader class calls --------------------------------------------------------
    def index_sampler(self, inner: Any) -> IndexSampler:
        if self._wrapper is None or self._wrapper.inner is not inner:
            self._wrapper = IndexSampler(inner, self)
        return self._wrapper

    def worker_shift(self) -> int:
        """While a resumed pass's iterator is built: the batches it skips, modulo the workers."""
        replay = self._replay
        return replay.skip % self.loader.num_workers if replay is not None and self.loader.num_workers else 0

    def sampler_iter(self, inner: Any) -> Iterator[Any]:
        replay = self._replay
        if replay is None:
            return self._watch(iter(inner))
        if replay.batches is not None:
            return iter(replay.batches[replay.skip :])
        if not replay.started:
            return self._watch(iter(inner))  # the pass had made no sampler draws yet
        # Called once per iterator construction (twice with workers): start over each time.
        for role, g in replay.targets.items():
            if role in replay.start:
                g.set_state(replay.start[role])
        it = iter(inner)
        for _ in range(replay.skip):
            if next(it, None) is None:
                return iter(())
        first = next(it, None)  # makes the sampler's start-of-epoch draws now, inside the replay
        return iter(()) if first is None else itertools.chain([first], it)

    def _watch(self, it: Iterator[Any]) -> Iterator[Any]:
        current = self._pass
        for item in it:
            if current is not None and not current.record.started:
                current.record = replace(current.record, started=True)
            yield item

    def iterate(self, make: Callable[[], Any]) -> Any:
        loader = self.loader
        sources = generator_sources(loader)
        creates = not (loader.persistent_workers and loader.num_workers > 0 and loader._iterator is not None)
        base_role = "loader" if loader.generator is not None else "global"
        pending, self._pending = self._pending, None
        spread, self._spread_from = self._spread_from, None
        sampler = loader.sampler
        epoch = int(sampler.epoch) if isinstance(sampler, DistributedSampler) else None
        if pending is not None and pending.epoch != epoch and not pending.complete:
            log.warning(
                "%s: the checkpoint was taken in epoch %s of the loader's DistributedSampler, but the "
                "first pass after restore() is epoch %s: the rest of epoch %s is not trained",
                self.name,
                pending.epoch,
                epoch,
                pending.epoch,
            )
        if pending is not None and pending.epoch != epoch:
            pending = None
        if spread is not None and spread[0].epoch != epoch:
            spread = None
        if pending is not None and pending.complete and spread is None:
            # saved after the pass's last batch: the interrupted epoch has nothing left, and
            # building an iterator would draw from the generators
            self._pass = CurrentPass(pending, _decoded(pending.start), _decoded_base(pending))
            return CountingIterator(iter(()), self._pass)
        if pending is not None or spread is not None:
            return self._resume(make, pending, spread, sources, creates, base_role)
        start = {role: g.get_state() for role, g in sources.items()}
        restored_base, self._restored_base = self._restored_base, None
        base = None
        if creates and restored_base is None:
            base = start[base_role]
            start[base_role] = dp.advance_by_seed_draw(base)  # the sampler starts after the seed draw
        elif creates:
            base = restored_base[1]  # persistent workers: the seed the saved run's workers had
        elif self._pass is not None:
            base = self._pass.base
        record = dp.PassRecord(
            epoch,
            base_source=base_role,
            order=self._order(sampler),
            batch_size=loader.batch_size,
            rank=self.rank,
            world=self.world,
            length=_length(loader._index_sampler),
        )
        current = CurrentPass(record, start, base)
        self._pass = current
        with ScratchSeed(loader, base if creates and restored_base is not None else None):
            it = make()
        return CountingIterator(it, current)

    def _order(self, sampler: Any, offset: int = 0) -> dp.GlobalOrder | None:
        if isinstance(sampler, DistributedSampler) and self.loader.batch_size is not None:
            return dp.order_of(sampler, offset)
        return None

    def _resume(
        self,
        make: Callable[[], Any],
        pending: dp.PassRecord | None,
        spread: list[dp.PassRecord] | None,
        sources: dict[str, torch.Generator],
        creates: bool,
        base_role: str,
    ) -> Any:
        """The first pass after restore() continues the interrupted one; every generator is
        left exactly as restore() set it."""
        restored = {role: g.get_state() for role, g in sources.items()}
        if spread is not None:
            record, replay = self._spread_pass(spread, pending, sources)
        else:
            assert pending is not None
            record = pending
            replay = _Replay(_decoded(pending.start), pending.yielded, pending.started, sources)
            if record.order is not None and record.order.spread_world is not None:
                replay = replace(replay, batches=self._continued_batches(record))
        base = _decoded_base(record)
        if creates:
            self._restored_base = None  # used right here
        current = CurrentPass(record, replay.start, base)
        self._pass = current
        self._replay = replay
        try:
            with ScratchSeed(self.loader, base if creates else None):
                it = make()
        finally:
            self._replay = None
            for role, g in sources.items():
                g.set_state(restored[role])
        return CountingIterator(it, current)

    # -- world-size change -------------------------------------------------------------------
    def _spread_pass(
        self, records: list[dp.PassRecord], own: dp.PassRecord | None, sources: dict[str, torch.Generator]
    ) -> tuple[dp.PassRecord, _Replay]:
        sampler = self.loader.sampler
        counts = sorted({r.consumed() for r in records})
        if len(counts) > 1:
            log.warning(
                "%s: the saved ranks had consumed different numbers of samples %s; continuing after the "
                "smallest, so a few samples may be trained twice",
                self.name,
                counts,
            )
        first = records[0]
        assert first.order is not None
        order = replace(
            first.order, offset=counts[0], spread_world=int(sampler.num_replicas), spread_batch=self.loader.batch_size
        )
        record = dp.PassRecord(
            first.epoch,
            base_source=own.base_source if own else None,
            base_state=own.base_state if own else None,
            order=order,
            batch_size=self.loader.batch_size,
            rank=self.rank,
            world=self.world,
            started=True,
        )
        batches = self._continued_batches(record)
        return replace(record, length=len(batches)), _Replay({}, 0, True, sources, batches)

    def _continued_batches(self, record: dp.PassRecord) -> list[list[int]]:
        order = record.order
        assert order is not None and order.spread_world is not None and record.epoch is not None
        sampler = self.loader.sampler
        full = dp.global_order(sampler, order, record.epoch)
        batches, repeated = dp.spread_batches(
            full[order.offset :], order.spread_world, int(sampler.rank), order.spread_batch or 1
        )
        if repeated:
            log.warning(
                "%s: fewer samples than ranks were left for the last step of epoch %s; rank %d repeats one",
                self.name,
                record.epoch,
                self.rank,
            )
        return batches

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, str]:
        sources = generator_sources(self.loader)
        current = {role: dp.encode_state(g.get_state()) for role, g in sources.items() if role != "global"}
        if self._pass is None:
            record = self._pending or dp.PassRecord(None, rank=self.rank, world=self.world)
        else:
            p = self._pass
            record = replace(
                p.record,
                start={r: dp.encode_state(s) for r, s in p.start.items()},
                base_state=dp.encode_state(p.base) if p.base is not None else None,
            )
        return {f"rank_{self.rank}": replace(record, current=current).encode()}

    def load_template(self, stored: Collection[str]) -> dict[str, str]:
        ranks = sorted(int(k.rsplit("_", 1)[1]) for k in stored if k.startswith(f"{self.name}.rank_"))
        if self.rank in ranks and len(ranks) == self.world:
            return {f"rank_{self.rank}": ""}
        return {f"rank_{r}": "" for r in ranks}

    def load_state_dict(self, state: dict[str, str]) -> None:
        records = {int(k.rsplit("_", 1)[1]): dp.PassRecord.decode(v, f"{self.name}.{k}") for k, v in state.items()}
        self._pass = self._pending = self._spread_from = self._restored_base = None
        if not records:
            if self.rank == 0:
                log.warning(
                    "%s: the checkpoint holds no position of this loader; its epoch starts from the beginning",
                    self.name,
                )
            return
        own = records.get(self.rank)
        sources = generator_sources(self.loader)
        if own is not None:
            for role, text in own.current.items():  # the loader's/sampler's own generators
                if role in sources:
                    sources[role].set_state(dp.decode_state(text))
            if own.base_state is not None and self.loader.persistent_workers:
                self._restored_base = (own.base_source or "global", dp.decode_state(own.base_state))
        saved_world = next(iter(records.values())).world
        if saved_world == self.world and own is not None:
            self._pending = own if own.epoch is not None or own.yielded or own.started or own.finished else None
            return
        ordered = [records[r] for r in sorted(records)]
        if ordered[0].order is not None and isinstance(self.loader.sampler, DistributedSampler):
            self._pending = own  # only its base seed state is used
            self._spread_from = ordered
            return
        log.warning(
            "%s: world size changed (%d -> %d) and the loader has no DistributedSampler with batch_size=: %s",
            self.name,
            saved_world,
            self.world,
            "this rank continues its own interrupted pass" if own else "this rank starts the epoch from the beginning",
        )
        self._pending = own


def _decoded(states: dict[str, str]) -> dict[str, torch.Tensor]:
    return {role: dp.decode_state(text) for role, text in states.items()}


def _decoded_base(record: dp.PassRecord) -> torch.Tensor | None:
    return dp.decode_state(record.base_state) if record.base_state else None


def _length(index_sampler: Any) -> int | None:
    try:
        return len(index_sampler)
    except TypeError:  # a sampler without __len__
        return None
