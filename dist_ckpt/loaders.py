"""Data loaders as tracked state: which adapter a loader gets, and the note when none is
tracked (see :mod:`dist_ckpt.loader_tracking` and :mod:`dist_ckpt.loader_stateful`)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from torch.utils.data import DataLoader

log = logging.getLogger("dist_ckpt.manager")
_noted = False


class TrackedLoader(Protocol):
    def state_dict(self) -> dict[str, str]: ...
    def load_template(self, stored: Any) -> dict[str, str]: ...
    def load_state_dict(self, state: dict[str, str]) -> None: ...


def is_loader(obj: Any) -> bool:
    return isinstance(obj, DataLoader)


def track_loader(loader: DataLoader, name: str, rank: int, world_size: int) -> TrackedLoader:
    """The adapter that saves and restores ``loader``'s position (installed in place; a
    loader tracked again, e.g. by a second manager, keeps its adapter)."""
    for attr in ("_dist_ckpt_position", "_dist_ckpt_stateful"):
        if (existing := getattr(loader, attr, None)) is not None:
            return existing  # type: ignore[no-any-return]
    if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
        from dist_ckpt.loader_stateful import StatefulLoaderPosition

        return StatefulLoaderPosition(loader, name, rank, world_size)
    from dist_ckpt.loader_tracking import LoaderPosition

    return LoaderPosition(loader, name, rank, world_size)


def note_untracked_loader(tracks_a_loader: bool, rank: int) -> None:
    """Say once per process (rank 0) what a restore without a tracked loader leaves out."""
    global _noted
    if tracks_a_loader or rank != 0 or _noted:
        return
    _noted = True
    log.warning(
        "restore(): no data loader is tracked, so the position inside the epoch and the loader's RNG "
        "draws (worker base seed, shuffling) are not restored: the resumed run restarts the epoch and "
        "its random numbers differ from an uninterrupted run. Track it: mgr.track(..., loader=train_loader)."
    )
