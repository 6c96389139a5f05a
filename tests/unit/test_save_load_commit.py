"""dist_ckpt.save / dist_ckpt.load in one process: only committed checkpoints load; incompatible state is named."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import dist_ckpt
from dist_ckpt import CheckpointNotFound, IncompatibleCheckpoint, StepAlreadyExists

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# --- commit: only committed checkpoints are ever loaded --------------------------------------


def _committed(tmp_path: Path, name: str = "step_000000005") -> tuple[Path, dict]:
    uri = tmp_path / "run" / name
    state = {"w": torch.randn(4, 4), "v": 1}
    dist_ckpt.save(state, str(uri))
    return uri, state


def test_step_without_committed_is_never_loaded(tmp_path):
    uri, state = _committed(tmp_path)
    (uri / "COMMITTED").unlink()
    target = {"w": torch.zeros(4, 4), "v": None}
    with pytest.raises(CheckpointNotFound, match=r"step was not committed") as info:
        dist_ckpt.load(target, str(uri))
    assert str(uri) in str(info.value)
    assert torch.count_nonzero(target["w"]) == 0 and target["v"] is None


def test_staging_dir_is_never_loaded_even_with_committed(tmp_path):
    """A crash between writing COMMITTED and the rename leaves step_X.tmp-<id> holding a
    COMMITTED marker; it is still an unpublished attempt and must not load."""
    uri, _ = _committed(tmp_path)
    tmp_dir = uri.parent / f"{uri.name}.tmp-0123456789ab"
    shutil.copytree(uri, tmp_dir)
    assert (tmp_dir / "COMMITTED").exists()
    with pytest.raises(CheckpointNotFound, match=r"step was not committed"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(tmp_dir))
    (tmp_dir / "COMMITTED").unlink()
    with pytest.raises(CheckpointNotFound, match=r"step was not committed"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(tmp_dir))


def test_step_with_only_shards_is_not_committed(tmp_path):
    uri, _ = _committed(tmp_path)
    (uri / "COMMITTED").unlink()
    (uri / "metadata.json").unlink()
    with pytest.raises(CheckpointNotFound, match=r"step was not committed"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(uri))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFound, match=r"no checkpoint here"):
        dist_ckpt.load({"w": torch.zeros(1)}, str(tmp_path / "run" / "step_9"))


def test_committed_without_metadata_is_corrupt(tmp_path):
    uri, _ = _committed(tmp_path)
    (uri / "metadata.json").unlink()
    with pytest.raises(dist_ckpt.CorruptCheckpoint, match=r"metadata\.json is missing"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(uri))


def test_saving_a_step_twice_raises_and_keeps_the_first(tmp_path):
    uri, state = _committed(tmp_path)
    before = {p.name: p.read_bytes() for p in uri.iterdir()}
    with pytest.raises(StepAlreadyExists, match=r"already committed"):
        dist_ckpt.save({"w": torch.ones(4, 4), "v": 2}, str(uri))
    assert {p.name: p.read_bytes() for p in uri.iterdir()} == before
    assert sorted(os.listdir(uri.parent)) == [uri.name]  # no staging leftovers
    target = {"w": torch.zeros(4, 4), "v": None}
    dist_ckpt.load(target, str(uri))
    assert torch.equal(target["w"], state["w"]) and target["v"] == 1


def test_publish_race_loser_raises_step_already_exists(tmp_path, monkeypatch):
    """Two jobs save the same step; the second reaches publish after the first committed."""
    from storage_backends.local import LocalBackend

    uri = tmp_path / "run" / "step_1"
    real_publish = LocalBackend.publish

    def racing_publish(self, staging, final):
        # the other job commits first, between our COMMITTED and our rename
        monkeypatch.setattr(LocalBackend, "publish", real_publish)
        dist_ckpt.save({"w": torch.full((2,), 7.0)}, str(uri))
        return real_publish(self, staging, final)

    monkeypatch.setattr(LocalBackend, "publish", racing_publish)
    with pytest.raises(StepAlreadyExists, match=r"committed by another job"):
        dist_ckpt.save({"w": torch.full((2,), 1.0)}, str(uri))
    target = {"w": torch.zeros(2)}
    dist_ckpt.load(target, str(uri))
    assert torch.equal(target["w"], torch.full((2,), 7.0))
    assert sorted(os.listdir(uri.parent)) == ["step_1"]  # the loser's staging dir is removed


# --- incompatible state ----------------------------------------------------------------------


def test_wrong_keys_are_named(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"enc.w": torch.zeros(2, 2), "dec.w": torch.zeros(3)}, uri)
    with pytest.raises(IncompatibleCheckpoint) as info:
        dist_ckpt.load({"enc.w": torch.zeros(2, 2), "dec.w": torch.zeros(3), "head.w": torch.zeros(1), "extra": 1}, uri)
    msg = str(info.value)
    assert "keys missing from the checkpoint" in msg and "head.w" in msg and "extra" in msg
    assert "enc.w" not in msg


def test_partial_load_allows_missing_keys(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"a": torch.ones(2)}, uri)
    target = {"a": torch.zeros(2), "new": torch.zeros(3)}
    dist_ckpt.load(target, uri, allow_partial_load=True)
    assert torch.equal(target["a"], torch.ones(2)) and torch.equal(target["new"], torch.zeros(3))


def test_wrong_shapes_are_named(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"w": torch.zeros(3, 4), "b": torch.zeros(4), "v": 1}, uri)
    target = {"w": torch.ones(4, 3), "b": torch.ones(4), "v": None}
    with pytest.raises(IncompatibleCheckpoint) as info:
        dist_ckpt.load(target, uri)
    msg = str(info.value)
    assert "w: checkpoint shape [3, 4], state shape [4, 3]" in msg
    assert "b:" not in msg
    assert torch.equal(target["b"], torch.ones(4))  # nothing was loaded


def test_tensor_versus_value_mismatch_is_named(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"x": torch.zeros(2), "y": 5}, uri)
    with pytest.raises(IncompatibleCheckpoint) as info:
        dist_ckpt.load({"x": 3, "y": torch.zeros(1)}, uri)
    msg = str(info.value)
    assert "x: checkpoint has a tensor [2], state has a int" in msg
    assert "y: checkpoint has a non-tensor value, state has a tensor [1]" in msg


def test_many_missing_keys_are_summarised(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"a": torch.zeros(1)}, uri)
    target = {"a": torch.zeros(1), **{f"k{i:02d}": torch.zeros(1) for i in range(30)}}
    with pytest.raises(IncompatibleCheckpoint, match=r"\(\+10 more\)"):
        dist_ckpt.load(target, uri)
