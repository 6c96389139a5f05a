"""How a tracked ``DataLoader`` calls its :class:`~dist_ckpt.loader_tracking.LoaderPosition`.

``track()`` swaps the loader's class for a subclass (:func:`tracked_class`: same object, same
attributes) whose ``__iter__``, ``_index_sampler`` and ``_get_iterator`` hand over to the
position tracker (:class:`PositionHooks`). The wrappers here see a pass begin, count the
batches it yields, start the workers of a resumed pass at the right one, and draw a worker
base seed from a recorded state without touching the live generators; what to record and how
to resume is :mod:`dist_ckpt.loader_tracking`'s concern.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from dist_ckpt import data_position as dp

TRACKER_ATTR = "_dist_ckpt_position"  # the loader attribute holding its tracker


class PositionHooks(Protocol):
    """What the tracked loader class and its sampler wrapper call."""

    def iterate(self, make: Callable[[], Any]) -> Any: ...

    def index_sampler(self, inner: Any) -> Any: ...

    def worker_shift(self) -> int: ...

    def sampler_iter(self, inner: Any) -> Iterator[Any]: ...


def generator_sources(loader: DataLoader) -> dict[str, torch.Generator]:
    """The CPU generators a pass of ``loader`` can draw from, by role (each object once)."""
    out: dict[str, torch.Generator] = {"global": torch.default_generator}
    seen = {id(torch.default_generator)}
    for role, holder in (("loader", loader), ("sampler", loader.sampler), ("batch_sampler", loader.batch_sampler)):
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator) and g.device.type == "cpu" and id(g) not in seen:
            out[role] = g
            seen.add(id(g))
    return out


@dataclass
class CurrentPass:
    """The loader's current pass (mutable: counted as batches are yielded)."""

    record: dp.PassRecord
    start: dict[str, torch.Tensor] = field(default_factory=dict)
    base: torch.Tensor | None = None


class IndexSampler:
    """Stands in for the loader's (batch) sampler so the tracker sees the pass begin and can
    skip consumed batches by index."""

    def __init__(self, inner: Any, tracker: PositionHooks):
        self.inner = inner
        self._tracker = tracker

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        return self._tracker.sampler_iter(self.inner)


class CountingIterator:
    """The loader's iterator, counting the batches handed to the training loop."""

    def __init__(self, it: Any, current: CurrentPass):
        self._it = it
        self._pass = current

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            self._pass.record = replace(self._pass.record, finished=True)
            raise
        self._pass.record = replace(self._pass.record, yielded=self._pass.record.yielded + 1)
        return batch

    def __len__(self) -> int:
        return len(self._it)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._it, name)


class ShiftedWorkers(_MultiProcessingDataLoaderIter):
    """The worker iterator of a resumed pass. Batch ``i`` of a pass goes to worker
    ``i % num_workers`` (round robin from worker 0); after ``shift`` skipped batches the first
    batch goes to the worker that loaded it in the saved run, so it gets the same worker seed."""

    def __init__(self, loader: DataLoader, shift: int):
        self._dist_ckpt_shift = shift
        super().__init__(loader)

    @property
    def _worker_queue_idx_cycle(self) -> Any:
        return self._dist_ckpt_cycle

    @_worker_queue_idx_cycle.setter
    def _worker_queue_idx_cycle(self, cycle: Any) -> None:
        for _ in range(self._dist_ckpt_shift):  # only the pass being resumed: later epochs start at 0
            next(cycle)
        self._dist_ckpt_shift = 0
        self._dist_ckpt_cycle = cycle


_CLASSES: dict[type, type] = {}


def tracked_class(cls: type) -> type:
    if cls not in _CLASSES:

        class Tracked(cls):  # type: ignore[valid-type, misc]
            def __iter__(self) -> Any:
                return getattr(self, TRACKER_ATTR).iterate(lambda: super(Tracked, self).__iter__())

            @property
            def _index_sampler(self) -> Any:
                return getattr(self, TRACKER_ATTR).index_sampler(super()._index_sampler)

            def _get_iterator(self) -> Any:
                shift = getattr(self, TRACKER_ATTR).worker_shift()
                if shift and self.num_workers > 0:
                    return ShiftedWorkers(self, shift)
                return super()._get_iterator()

        Tracked.__name__ = Tracked.__qualname__ = f"Tracked{cls.__name__}"
        _CLASSES[cls] = Tracked
    return _CLASSES[cls]


class ScratchSeed:
    """While a new loader iterator is built: draw its worker base seed from a scratch
    generator in the recorded ``state``, so the live generators are not touched."""

    def __init__(self, loader: DataLoader, state: torch.Tensor | None):
        self._loader, self._state = loader, state
        self._saved: Any = None

    def __enter__(self) -> None:
        if self._state is not None:
            scratch = torch.Generator()
            scratch.set_state(self._state)
            self._saved = self._loader.generator
            self._loader.generator = scratch

    def __exit__(self, *exc: object) -> None:
        if self._state is not None:
            self._loader.generator = self._saved
