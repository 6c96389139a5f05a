"""The run's listing: :meth:`CheckpointManager.checkpoints` and the manifest it reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dist_ckpt import manifest as mf
from dist_ckpt.run_store import step_prefix

if TYPE_CHECKING:
    from dist_ckpt.manager_parts import RunParts


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint of the run, as ``checkpoints()`` and ``dist-ckpt list`` show it."""

    step: int
    epoch: int | None
    metrics: Mapping[str, float]
    time: float
    size: int
    world_size: int
    codec: str
    pointers: tuple[str, ...]
    uri: str
    tiers: tuple[str, ...] = ("root",)  # with local_root: "local" (this node's tier) and/or "root"
    logical_size: int = 0  # bytes of every file it reads: own (``size``) + referenced (incremental)


def stored_manifest(mgr: RunParts) -> mf.Manifest:
    """The stored manifest, or the one the COMMITTED markers give when it is missing or
    damaged — written back, unless this manager is read-only."""
    manifest, _ = mgr.store.read_manifest()
    if manifest is None:
        manifest = mgr.store.reconciled_manifest(mgr.config.best, write=not mgr.config.read_only)
    return manifest


def list_checkpoints(mgr: RunParts) -> list[CheckpointInfo]:
    """The run's committed checkpoints, oldest first, with the pointers naming each."""
    manifest = stored_manifest(mgr)
    names: dict[int, list[str]] = {}
    for name, step in manifest.pointers.items():
        names.setdefault(step, []).append(name)
    entries, tiers = list(manifest.entries), {}
    if mgr._tiers is not None:  # local-only steps too, and where each one is
        entries, tiers = mgr._tiers.listing(entries)
    return [
        CheckpointInfo(
            e.step,
            e.epoch,
            dict(e.metrics),
            e.time,
            e.size,
            e.world_size,
            e.codec,
            tuple(sorted(names.get(e.step, []))),
            f"{mgr.backend.uri}/{step_prefix(e.step)}",
            tiers.get(e.step, ("root",)),
            e.logical_size or e.size,
        )
        for e in entries
    ]
