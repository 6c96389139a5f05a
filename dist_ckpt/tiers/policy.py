"""Which saves are promoted to the root, and which local checkpoints retention may delete."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping


def promotion_due(save_index: int, every_n_saves: int, *, force: bool, moved_best: bool) -> bool:
    """Whether the ``save_index``-th save of this manager (counted from 1) goes to the root:
    every ``every_n_saves``-th, and any that moved a ``best:*`` pointer or was forced."""
    return force or moved_best or save_index % every_n_saves == 0


def moved_best(before: Mapping[str, float], after: Mapping[str, float]) -> bool:
    """A metric's best value changed with this save: the checkpoint is a new ``best:<metric>``."""
    return any(before.get(metric) != value for metric, value in after.items())


def local_drops(local_steps: Iterable[int], keep_last: int, unsettled: Collection[int]) -> list[int]:
    """Local steps retention deletes: all but the newest ``keep_last``, except those whose
    promotion is still queued (``unsettled``): a step leaves the local tier only once its due
    promotion is committed at the root (or it was never due)."""
    steps = sorted(set(local_steps))
    keep = set(steps[-keep_last:]) | set(unsettled)
    return [s for s in steps if s not in keep]
