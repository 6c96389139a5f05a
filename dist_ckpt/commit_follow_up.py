"""What follows a committed step on rank 0: list it in the run's manifest, then apply retention.

:class:`CommitFollowUp` is built from values when ``save()`` submits the step, so the async
worker that runs it after a background commit runs no manager code and shares no mutable
state with the foreground: it returns the outcome (a :class:`~dist_ckpt.run_store.Retention`),
which the foreground consumes at the next ``save()``, ``wait()`` or ``close()``. The tiers'
uploader records its promotions through the same :func:`record_commit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from dist_ckpt import manifest as mf
from dist_ckpt.layout import COMMITTED, step_prefix
from dist_ckpt.run_store import Retention, RunStore, entry_from_committed
from storage_backends import join_key

if TYPE_CHECKING:
    from dist_ckpt.lock_fence import Fence


@dataclass(frozen=True)
class RunPolicy:
    """What recording a commit needs of the run's configuration, as values."""

    best_modes: Mapping[str, str] = field(default_factory=dict)
    """Tracked metric → ``"min"``/``"max"``: the ``best:<metric>`` pointers."""
    keep_last: int | None = None
    """Retention: the newest steps kept (None: all)."""
    keep_every_n_steps: int | None = None
    """Retention: steps that are multiples of it are kept as well."""
    tracker_run_id: str | None = None
    """The experiment tracker's run id stamped on the manifest."""
    config_hash: str | None = None
    """The training config's hash stamped on the manifest."""
    overwrite_stamps: bool = True
    """True: the run id and config hash replace the manifest's (the job that owns the run).
    False: they only fill in missing ones (an uploader promoting a step on a job's behalf)."""


def record_commit(
    store: RunStore,
    step: int,
    policy: RunPolicy,
    *,
    fence: Fence | None = None,
    deletes_later: bool = False,
    marker: bytes | None = None,
) -> Retention:
    """Add the committed ``step`` (its entry comes from its ``COMMITTED`` marker: ``marker``,
    or read from ``store``) to the manifest, then apply retention (see
    :meth:`RunStore.apply_retention` for ``fence`` and ``deletes_later``)."""
    key = join_key(step_prefix(step), COMMITTED)
    entry = entry_from_committed(step, marker if marker is not None else store.backend.read(key), f"{store.uri}/{key}")

    def change(current: mf.Manifest | None) -> mf.Manifest:
        base = current if current is not None else mf.rebuild(store.committed_entries(), policy.best_modes)
        new = mf.with_entry(base, entry, policy.best_modes)
        if policy.overwrite_stamps:
            return replace(new, tracker_run_id=policy.tracker_run_id, config_hash=policy.config_hash)
        return replace(
            new,
            tracker_run_id=new.tracker_run_id or policy.tracker_run_id,
            config_hash=new.config_hash or policy.config_hash,
        )

    return store.apply_retention(
        change, policy.keep_last, policy.keep_every_n_steps, fence=fence, deletes_later=deletes_later
    )


@dataclass(frozen=True)
class CommitFollowUp:
    """Rank 0's follow-up of one save's commit, captured when the save is submitted."""

    store: RunStore
    step: int
    policy: RunPolicy
    fence: Fence | None = None  # a job that lost the run lock changes nothing

    def record(self, *, deletes_later: bool = False) -> Retention:
        """The manifest update and retention (the deletes too, unless ``deletes_later``)."""
        return record_commit(self.store, self.step, self.policy, fence=self.fence, deletes_later=deletes_later)

    def delete_dropped(self, kept: Retention) -> None:
        """The deletes :meth:`record` left for later (``deletes_later=True``): run by the async
        worker once the save's verdict is agreed — clean-up, not part of committing."""
        self.store.delete_dropped(kept.drops, fence=self.fence)
