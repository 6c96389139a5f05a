"""Every use of torch.distributed.checkpoint's private API, behind small named functions.

DCP's public API has no way to flatten a state dict as ``dcp.save`` does, to build the write
items of one value, to reuse its plan cache from a planner that plans a staged (already flat)
state, or to tell its "duplicated flatten key" error from other ``ValueError``s. dist_ckpt
needs each of these; they are reached only through this module, so a torch upgrade that moves
or changes one breaks here, loudly, in ``tests/unit/test_dcp_internals.py`` (which names the
torch version these were checked against) rather than somewhere inside a save.

Besides the functions below, :class:`dist_ckpt.planner.JsonSavePlanner` overrides two of
``DefaultSavePlanner``'s private hooks, listed in :data:`OVERRIDDEN_SAVE_PLANNER_HOOKS` (the
test checks that DCP still has and calls them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import _nested_dict
from torch.distributed.checkpoint import filesystem as _filesystem
from torch.distributed.checkpoint import planner_helpers as _helpers
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem

CHECKED_WITH_TORCH = "2.13"  # the torch version (major.minor) this module was checked against

# DefaultSavePlanner's private methods JsonSavePlanner overrides: the global plan (compact
# plans are unpacked there) and the dedup of replicated items (DDP spread writes).
OVERRIDDEN_SAVE_PLANNER_HOOKS = ("_create_global_plan", "_dedup_save_plans")

_DUPLICATED_KEY_TEXT = "duplicated flatten key"  # DCP's message (_traverse / flatten_state_dict)

FlatMapping = dict[str, tuple[str | int, ...]]


def flatten_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], FlatMapping]:
    """The flat state dict DCP saves for ``state_dict`` and each flat key's path in it."""
    return _nested_dict.flatten_state_dict(state_dict)  # type: ignore[arg-type]


def set_element(root: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Set the value at ``path`` in the nested ``root`` as DCP's load does (creating levels)."""
    _nested_dict.set_element(root, path, value)


def duplicated_flatten_key(error: ValueError) -> str | None:
    """The flat key DCP's flattening found twice, when ``error`` is that error; else None."""
    text = str(error)
    return text.rsplit(" ", 1)[-1] if _DUPLICATED_KEY_TEXT in text else None


def create_write_items(fqn: str, obj: Any) -> list[WriteItem]:
    """DCP's write items for one flat value (a tensor, a DTensor or a bytes value)."""
    return _helpers._create_write_items(fqn, obj)


def create_chunk_list(tensor: torch.Tensor) -> list[ChunkStorageMetadata]:
    """The chunks of ``tensor`` this rank holds (one for a plain tensor, its shard's for a DTensor)."""
    return _helpers._create_chunk_list(tensor)


def use_plan_cache(planner: SavePlanner, cache_key: str) -> None:
    """Make ``planner`` (built with ``enable_plan_caching=True``) keep its plans under
    ``cache_key`` rather than its class name, so one manager's saves never reuse another's."""
    planner._cached_plans_key = cache_key  # type: ignore[attr-defined]


def plan_cache_key(planner: SavePlanner) -> str | None:
    """The key ``planner`` caches its plans under, or None when plan caching is off."""
    if not getattr(planner, "_enable_plan_caching", False):
        return None
    return planner._cached_plans_key  # type: ignore[attr-defined]


def reuse_cached_local_plan(planner: SavePlanner, plan: SavePlan) -> bool:
    """As ``DefaultSavePlanner.create_local_plan`` does with caching on: True when ``plan``
    equals the cached local plan (send DCP an unusable plan, it reuses the cached one);
    otherwise remember ``plan`` as the one DCP caches once the save's plans are final."""
    key = plan_cache_key(planner)
    if key is None:
        return False
    cached = SavePlanner._cached_save_plan.get(key)
    if cached is not None and _helpers._compare_save_plans(plan, cached):
        return True
    planner._pending_local_plan = plan  # type: ignore[attr-defined]
    return False


def forget_cached_plans(cache_key: str) -> None:
    """Drop DCP's class-level plan caches of ``cache_key`` (they live as long as the process)."""
    for cache in (
        SavePlanner._cached_save_plan,
        SavePlanner._cached_all_plans,
        SavePlanner._cached_global_plan,
        SavePlanner._cached_metadata,
        SavePlanner._cached_final_save_plan,
    ):
        cache.pop(cache_key, None)


def cached_plan_keys() -> set[str]:
    """Every key DCP's plan caches hold something under (tests: nothing leaks past ``close()``)."""
    return set(SavePlanner._cached_save_plan) | set(SavePlanner._cached_final_save_plan)


def filesystem_storage_info_class() -> type:
    """``FileSystemWriter``'s per-item storage record, which a DCP folder's ``.metadata``
    pickle names (the importer's allow-list of classes)."""
    return _filesystem._StorageInfo
