"""Which saves are promoted to the root, and which local checkpoints retention may delete."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from dist_ckpt import manifest as mf


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


def tiered_listing(
    root_entries: list[mf.Entry], local_entries: list[mf.Entry]
) -> tuple[list[mf.Entry], dict[int, tuple[str, ...]]]:
    """Merge a run's root entries with a local tier's: every step once, with its tiers
    (``"local"``, ``"root"``), oldest first."""
    by_step = {e.step: e for e in local_entries}
    by_step.update({e.step: e for e in root_entries})
    root_steps, local = {e.step for e in root_entries}, {e.step for e in local_entries}
    tiers = {s: tuple(t for t, has in (("local", s in local), ("root", s in root_steps)) if has) for s in by_step}
    return [by_step[s] for s in sorted(by_step)], tiers
