"""dist_ckpt.dcp_internals against real DCP objects: each private-API use still does what
dist_ckpt relies on. Checked against torch 2.13; a torch upgrade that moves or changes one of
them fails here, by name, rather than somewhere inside a save."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

import dist_ckpt
from dist_ckpt import dcp_internals

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_checked_against_this_torch() -> None:
    assert dcp_internals.CHECKED_WITH_TORCH == "2.13"
    assert torch.__version__.startswith(dcp_internals.CHECKED_WITH_TORCH), (
        f"dist_ckpt/dcp_internals.py was checked against torch {dcp_internals.CHECKED_WITH_TORCH}, this is "
        f"{torch.__version__}: re-check each private use there (this file's tests), then update CHECKED_WITH_TORCH"
    )


def test_flatten_state_dict_and_set_element_round_trip() -> None:
    t = torch.arange(3.0)
    state = {"model": {"w": t, "layers": [{"b": 1}, {"b": 2}]}, "step": 7}
    flat, mappings = dcp_internals.flatten_state_dict(state)
    assert flat == {"model.w": t, "model.layers.0.b": 1, "model.layers.1.b": 2, "step": 7}
    assert mappings["model.layers.1.b"] == ("model", "layers", 1, "b")
    rebuilt: dict = {}
    for fqn, value in flat.items():
        dcp_internals.set_element(rebuilt, mappings[fqn], value)
    assert rebuilt["model"]["layers"] == [{"b": 1}, {"b": 2}] and rebuilt["step"] == 7


def test_duplicated_flatten_key_recognises_dcps_error_only() -> None:
    with pytest.raises(ValueError) as caught:
        dcp_internals.flatten_state_dict({"a.b": 1, "a": {"b": 2}})
    assert dcp_internals.duplicated_flatten_key(caught.value) == "a.b"
    assert dcp_internals.duplicated_flatten_key(ValueError("some other problem")) is None


def test_create_write_items_and_chunk_list() -> None:
    t = torch.zeros(4, 3)
    (tensor_item,) = dcp_internals.create_write_items("w", t)
    assert tensor_item.type == WriteItemType.TENSOR and tensor_item.index.fqn == "w"
    assert tuple(tensor_item.tensor_data.size) == (4, 3)
    (bytes_item,) = dcp_internals.create_write_items("v", b"{}")
    assert bytes_item.type == WriteItemType.BYTE_IO
    (chunk,) = dcp_internals.create_chunk_list(t)
    assert tuple(chunk.offsets) == (0, 0) and tuple(chunk.sizes) == (4, 3)


class _Recording(DefaultSavePlanner):
    """Records which of DefaultSavePlanner's private hooks DCP calls during a save."""

    called: list[str] = []

    def _create_global_plan(self, all_plans):  # type: ignore[no-untyped-def]
        self.called.append("_create_global_plan")
        return super()._create_global_plan(all_plans)

    def _dedup_save_plans(self, all_plans):  # type: ignore[no-untyped-def]
        self.called.append("_dedup_save_plans")
        return super()._dedup_save_plans(all_plans)


def test_the_overridden_planner_hooks_exist_and_dcp_calls_them(tmp_path: Path) -> None:
    assert set(dcp_internals.OVERRIDDEN_SAVE_PLANNER_HOOKS) == {"_create_global_plan", "_dedup_save_plans"}
    for name in dcp_internals.OVERRIDDEN_SAVE_PLANNER_HOOKS:
        assert callable(getattr(DefaultSavePlanner, name, None)), f"DefaultSavePlanner.{name} is gone"
    _Recording.called = []
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path), planner=_Recording(), no_dist=True)
    assert set(_Recording.called) == set(dcp_internals.OVERRIDDEN_SAVE_PLANNER_HOOKS)


def _save_cached(tmp_path: Path, key: str, tag: str) -> DefaultSavePlanner:
    planner = DefaultSavePlanner(enable_plan_caching=True)
    dcp_internals.use_plan_cache(planner, key)
    dcp.save(
        {"w": torch.ones(2), "b": torch.zeros(3)}, checkpoint_id=str(tmp_path / tag), planner=planner, no_dist=True
    )
    return planner


def test_plan_cache_key_reuse_and_forget(tmp_path: Path) -> None:
    key = "dist_ckpt.test.dcp_internals"
    assert dcp_internals.plan_cache_key(DefaultSavePlanner()) is None  # caching off
    first = _save_cached(tmp_path, key, "first")
    assert dcp_internals.plan_cache_key(first) == key
    assert key in dcp_internals.cached_plan_keys(), "DCP cached the plans under our key"
    try:
        same = DefaultSavePlanner(enable_plan_caching=True)
        dcp_internals.use_plan_cache(same, key)
        same.set_up_planner({"w": torch.ones(2), "b": torch.zeros(3)}, is_coordinator=True)
        plan = SavePlan(
            [
                *dcp_internals.create_write_items("w", torch.ones(2)),
                *dcp_internals.create_write_items("b", torch.zeros(3)),
            ]
        )
        assert dcp_internals.reuse_cached_local_plan(same, plan), "an unchanged local plan is the cached one"
        changed = SavePlan(dcp_internals.create_write_items("w", torch.ones(5)))
        assert not dcp_internals.reuse_cached_local_plan(same, changed)
        assert same._pending_local_plan is changed  # what DCP caches once the plans are final
    finally:
        dcp_internals.forget_cached_plans(key)
    assert key not in dcp_internals.cached_plan_keys()


def test_filesystem_storage_info_class_is_what_a_dcp_folder_records(tmp_path: Path) -> None:
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path), no_dist=True)
    metadata = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    cls = dcp_internals.filesystem_storage_info_class()
    assert metadata.storage_data and all(isinstance(v, cls) for v in metadata.storage_data.values())
    assert {f.name for f in dataclasses.fields(cls)} >= {"relative_path", "offset", "length"}


# DCP's private attributes dist_ckpt relies on: reached only in dcp_internals.py
_PRIVATE_DCP_ATTRIBUTES = {
    "_cached_save_plan",
    "_cached_all_plans",
    "_cached_global_plan",
    "_cached_metadata",
    "_cached_final_save_plan",
    "_cached_plans_key",
    "_enable_plan_caching",
    "_pending_local_plan",
}


def _private_dcp_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed.checkpoint"):
            private = any(part.startswith("_") for part in (node.module or "").split("."))
            names = [a.name for a in node.names if a.name.startswith("_")]
            if private or names:
                found.append(f"{path.name}:{node.lineno} from {node.module} import {', '.join(names) or '...'}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if alias.name.startswith("torch.distributed.checkpoint") and any(p.startswith("_") for p in parts):
                    found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in _PRIVATE_DCP_ATTRIBUTES:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "duplicated flatten key" in node.value:
            found.append(f"{path.name}:{node.lineno} DCP's error text")
    return found


def test_no_module_but_dcp_internals_uses_dcps_private_api() -> None:
    package = Path(dist_ckpt.__file__).parent
    offenders = [
        use
        for path in sorted(package.rglob("*.py"))
        if path.name != "dcp_internals.py"
        for use in _private_dcp_uses(path)
    ]
    assert not offenders, "DCP's private API outside dist_ckpt/dcp_internals.py: " + "; ".join(offenders)
    assert _private_dcp_uses(package / "dcp_internals.py"), "the scan finds the uses where they are"
