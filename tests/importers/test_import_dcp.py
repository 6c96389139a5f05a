"""Import of DCP checkpoints written by torch's own FileSystemWriter (issue 18, item 3).

A 2-rank FSDP2 job saves ``{"model": ..., "optim": ...}`` with ``dcp.save``; the folder is
imported and restored with ``CheckpointManager.restore`` at 2 ranks (FSDP2) and in one plain
process (resharded), bit-identical to the state the saving job gathered. A ``.metadata`` pickle
gadget and a payload gadget are refused by name and never run.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import _dcp_workers as workers
import pytest
import torch
from import_support import assert_bit_identical
from support.dist import run_ranks
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import dist_ckpt
from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CorruptCheckpoint


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dcp") / "ckpt"
    ref = run_ranks(workers.write_dcp, 2, str(folder))[0]
    return folder, ref


@pytest.fixture
def small_dcp(tmp_path: Path) -> Path:
    """A one-process dcp.save folder (FileSystemWriter), for the refusal tests."""
    import torch.distributed.checkpoint as dcp

    model = workers.build_model(0)
    folder = tmp_path / "small"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_fsdp2_dcp_checkpoint_imports_and_restores_bit_identical_at_2_and_1_ranks(
    dcp_checkpoint, tmp_path: Path
) -> None:
    folder, ref = dcp_checkpoint
    # torch's FileSystemWriter layout, one data file per rank: the shards really are split
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    run = tmp_path / "run"
    result = dist_ckpt.import_checkpoint(str(folder), str(run), step=30)
    assert (result.format, result.step, result.objects) == ("dcp", 30, {"model": "model", "optim": "optimizer"})
    assert (run / "step_000000030" / "COMMITTED").is_file()

    got = run_ranks(workers.restore_fsdp, 2, str(run))[0]  # FSDP2 at 2 ranks
    assert got.pop("step") == 30
    assert_bit_identical(got, ref)

    model = workers.build_model(2)  # one plain process: resharded from 2 FSDP2 ranks
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    with CheckpointManager(str(run), read_only=True) as mgr:
        assert mgr.restore(mgr.track(model=model, optim=opt)).step == 30
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert_bit_identical({"model": msd, "optim": osd}, ref)

    fresh = workers.build_model(3)  # weights only
    with CheckpointManager(str(run), read_only=True) as mgr:
        assert int(mgr.load_weights(fresh)) == 30
    assert_bit_identical(fresh.state_dict(), ref["model"])


class _Gadget:
    """What an attacker would put in a file: unpickling it runs ``touch <path>``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def _metadata_with(planner_data: object) -> bytes:
    from torch.distributed.checkpoint.metadata import Metadata

    return pickle.dumps(Metadata(state_dict_metadata={}, planner_data=planner_data))


def test_metadata_pickle_gadget_is_refused_by_name_and_never_runs(small_dcp: Path, tmp_path: Path) -> None:
    folder = small_dcp
    control = tmp_path / "control-sentinel"
    pickle.loads(_metadata_with({"x": _Gadget(control)}))  # the gadget is live: a plain unpickler runs it
    assert control.exists()

    sentinel = tmp_path / "sentinel"
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for p in folder.iterdir():
        (crafted / p.name).write_bytes(p.read_bytes())
    (crafted / ".metadata").write_bytes(_metadata_with({"x": _Gadget(sentinel)}))
    with pytest.raises(CorruptCheckpoint) as e:
        dist_ckpt.import_checkpoint(str(crafted), str(tmp_path / "run"))
    assert f"{crafted}/.metadata" in str(e.value) and "posix.system" in str(e.value)
    assert not sentinel.exists()
    assert not (tmp_path / "run").exists()  # nothing written
    # the command line refuses it the same way (exit 5, one line naming the global)
    proc = subprocess.run(
        [sys.executable, "-m", "dist_ckpt.cli", "import", str(crafted), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 5, proc.stderr
    assert "refused to load the global posix.system" in proc.stderr
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_payload_gadget_is_refused_by_torch_load_weights_only(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    sentinel = tmp_path / "sentinel"
    folder = tmp_path / "crafted"
    folder.mkdir()
    import io

    buf = io.BytesIO()
    torch.save({"x": _Gadget(sentinel)}, buf)
    (folder / "__0_0.distcp").write_bytes(buf.getvalue())
    meta = Metadata(
        state_dict_metadata={"extra.x": BytesStorageMetadata()},
        storage_data={MetadataIndex("extra.x"): _StorageInfo("__0_0.distcp", 0, len(buf.getvalue()))},
    )
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(
        CorruptCheckpoint,
        match=r"value 'extra.x' \(__0_0.distcp\): refused or unreadable by torch.load\(weights_only=True\)",
    ):
        dist_ckpt.import_checkpoint(str(folder), str(tmp_path / "run"))
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_damaged_dcp_folders_are_refused_naming_the_file(small_dcp: Path, tmp_path: Path) -> None:
    folder = small_dcp
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in folder.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / ".metadata").write_bytes(b"not a pickle at all")
    with pytest.raises(CorruptCheckpoint, match=f"{broken}/.metadata: not a readable DCP .metadata file"):
        dist_ckpt.import_checkpoint(str(broken), str(tmp_path / "run"))
    (broken / ".metadata").write_bytes((folder / ".metadata").read_bytes())
    data = (broken / "__0_0.distcp").read_bytes()
    (broken / "__0_0.distcp").write_bytes(data[: len(data) // 2])  # truncated data file
    with pytest.raises(CorruptCheckpoint, match=f"{broken}/__0_0.distcp: .* is recorded at bytes"):
        dist_ckpt.import_checkpoint(str(broken), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_dcp_key_layouts_bare_state_dict_and_app_state(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from dist_ckpt.errors import ConfigError

    model = workers.build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    workers.train(model, opt, 0)
    msd, osd = get_state_dict(model, opt)
    bare, app = tmp_path / "bare", tmp_path / "app"
    dcp.save(model.state_dict(), checkpoint_id=str(bare), no_dist=True)  # keys "0.weight", ...
    dcp.save({"app": {"model": msd, "optim": osd}}, checkpoint_id=str(app), no_dist=True)  # the DCP tutorial's AppState

    with pytest.raises(ConfigError, match=r"keys \['0.bias'.* are not under an object name.*--name model"):
        dist_ckpt.import_checkpoint(str(bare), str(tmp_path / "run1"))
    dist_ckpt.import_checkpoint(str(bare), str(tmp_path / "run1"), name="model")
    restored = workers.build_model(1)
    with CheckpointManager(str(tmp_path / "run1"), read_only=True) as mgr:
        mgr.restore(mgr.track(model=restored))
    assert_bit_identical(restored.state_dict(), model.state_dict())

    with pytest.raises(ConfigError, match=r"no key starts with 'nope.' .*\['app'\]"):
        dist_ckpt.import_checkpoint(str(app), str(tmp_path / "run2"), key="nope")
    result = dist_ckpt.import_checkpoint(str(app), str(tmp_path / "run2"), key="app")
    assert result.objects == {"model": "model", "optim": "optimizer"}
    m2 = workers.build_model(2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
    with CheckpointManager(str(tmp_path / "run2"), read_only=True) as mgr:
        mgr.restore(mgr.track(model=m2, optim=o2))
    got = get_state_dict(m2, o2, options=StateDictOptions(full_state_dict=True))
    want = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert_bit_identical({"model": got[0], "optim": got[1]}, {"model": want[0], "optim": want[1]})
