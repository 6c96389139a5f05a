"""What the manager's parts need of a :class:`~dist_ckpt.CheckpointManager`, as Protocols.

The save, restore and listing paths (``manager_save``, ``manager_restore``,
``manager_listing``, ``tiers.restore_choice``) are functions of the manager's state. They
type their argument with these Protocols rather than with the class itself, so no part
imports ``dist_ckpt.manager`` back: the manager imports its parts, never the reverse. The
members keep the manager's names (the leading underscore: not public API of the manager).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch.distributed as dist

    from dist_ckpt import manifest as mf
    from dist_ckpt.commit_follow_up import CommitFollowUp
    from dist_ckpt.config import ManagerConfig
    from dist_ckpt.format.shard import ChunkCodec
    from dist_ckpt.progress import Progress
    from dist_ckpt.run_lock import RunLock
    from dist_ckpt.run_store import RunStore
    from storage_backends import Backend


class RunParts(Protocol):
    """The run the manager opened: its options, root backend and store, and its tiers."""

    config: ManagerConfig
    backend: Backend
    store: RunStore
    _tiers: Any  # dist_ckpt.tiers.node.Tiers with local_root, else None


class Collective(Protocol):
    """The manager's place in the job: its rank and group, and rank 0's decisions shared."""

    rank: int
    world_size: int
    _pg: dist.ProcessGroup | None
    _distributed: bool

    def _agree(self, compute: Callable[[], Any] | None) -> Any:
        """``compute`` run on rank 0, its result (or error) on every rank."""
        ...


class RestoringParts(RunParts, Collective, Protocol):
    """What restoring a checkpoint needs (``manager_restore``, ``tiers.restore_choice``)."""

    root: str
    _engine: Any  # dist_ckpt.async_engine.AsyncEngine, or None
    _progress: Progress

    def _manifest(self) -> mf.Manifest:
        """The stored manifest (rebuilt from the markers when missing or damaged)."""
        ...


class SavingParts(RestoringParts, Protocol):
    """What a save needs (``manager_save``)."""

    _codec: ChunkCodec | None
    _lock: RunLock | None
    _save_backend: Backend

    def _decide(self, step: int, metrics: dict[str, float], epoch: int | None, force: bool) -> tuple[Progress, bool]:
        """Rank 0: the progress after ``step`` and whether it is saved."""
        ...

    def _commit_follow_up(self, step: int) -> CommitFollowUp:
        """Rank 0's follow-up of the commit of ``step``, from the manager's current values."""
        ...

    def _committed(self, last_step: int | None) -> None:
        """The foreground's bookkeeping once a save's follow-up is done."""
        ...
