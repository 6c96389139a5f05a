"""Path traversal: a metadata.json whose file table (and chunk references) name ``../../x`` or an
absolute path, and a manifest naming such paths as steps or pointers. A valid copy of the shard
waits at each target ("bait"), so only the checks — not a missing file — can stop the read.
Refused with an error naming metadata.json (the manifest is rebuilt); an audit hook proves
nothing outside the run root was opened, listed, created, renamed or removed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_bit_identical, assert_named_error, build
from fault_audit import Audit
from safetensors.torch import load_file

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointError, CorruptCheckpoint

pytestmark = QUIET
SHARD = "rank_00000.safetensors"


def _tree(base: Path, skip: Path) -> dict[str, str]:
    """Content hash of every file under ``base`` outside ``skip``."""
    out = {}
    for p in sorted(base.rglob("*")):
        if p.is_file() and skip not in p.parents:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The run root sits three levels below the test dir, so ../../x stays inside tmp_path."""
    root, refs = tmp_path / "a" / "b" / "run", tmp_path / "refs"
    job = LocalJob(str(root), refs)
    job.save(1)
    job.save(2)
    job.close()
    return root, refs, tmp_path


def _bait_targets(root: Path, tmp_path: Path) -> dict[str, Path]:
    step = root / "step_000000002"
    return {
        "../../x": (step / "../../x").resolve(),  # a/b/x
        "../../../../escape.safetensors": (step / "../../../../escape.safetensors").resolve(),
        "ABS": tmp_path / "abs" / "evil.safetensors",
        "sub/../../x": (step / "../x").resolve(),
    }


@pytest.mark.parametrize(
    "name",
    ["../../x", "../../../../escape.safetensors", "ABS", "sub/../../x", "..", "/etc/passwd", "a\\..\\..\\x", "x\x00y"],
    ids=[
        "dotdot",
        "dotdot-escape-tmp",
        "absolute-bait",
        "sub-dotdot",
        "bare-dotdot",
        "etc-passwd",
        "backslashes",
        "nul",
    ],
)
def test_metadata_file_table_naming_a_path_outside_the_run(run, name: str) -> None:
    root, refs, tmp_path = run
    step = root / "step_000000002"
    targets = _bait_targets(root, tmp_path)
    if name in targets:
        targets[name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(step / SHARD, targets[name])  # a valid shard waits at the target
    if name == "ABS":
        name = str(targets["ABS"])
    meta = json.loads((step / "metadata.json").read_text())
    meta["files"] = {name: meta["files"][SHARD]}
    for t in meta["tensors"].values():
        for c in t.get("chunks", ()):  # format 2 lists no files per chunk (the rank's file is used)
            c["file"] = name
    for v in meta["values"].values():
        v["file"] = name
    (step / "metadata.json").write_text(json.dumps(meta))
    before = _tree(tmp_path, root)

    model, opt = build(seed=11)
    with Audit() as audit, CheckpointManager(str(root), read_only=True) as mgr:
        with pytest.raises(CheckpointError) as err:
            mgr.restore(mgr.track(model=model, optimizer=opt))
    assert isinstance(err.value, CorruptCheckpoint), err.value
    assert_named_error(err.value, "step_000000002/metadata.json")
    assert any(p.startswith(str(root)) for _, p in audit.paths()), "the audit hook saw nothing"
    assert audit.outside(root, tmp_path) == [], "touched something outside the run root"
    assert _tree(tmp_path, root) == before, "a file outside the run root was written"
    # the earlier checkpoint is unaffected
    with CheckpointManager(str(root), read_only=True) as mgr:
        m, o = build(seed=12)
        assert mgr.restore(mgr.track(model=m, optimizer=o), 1).step == 1


@pytest.mark.parametrize(
    "manifest",
    [
        {"pointers": {"last": "../../x"}},
        {"pointers": {"last": "/abs/step_000000001"}},
        {"checkpoints": [{"step": "../../x"}]},
        {"checkpoints": [{"step": "/etc"}], "pointers": {"last": "/etc"}},
    ],
    ids=["pointer-relative", "pointer-absolute", "entry-relative", "entry-and-pointer-absolute"],
)
def test_manifest_naming_a_path_outside_the_run(run, manifest: dict) -> None:
    root, refs, tmp_path = run
    doc = json.loads((root / "manifest.json").read_text())
    doc.update(manifest)
    (root / "manifest.json").write_text(json.dumps(doc))
    before = _tree(tmp_path, root)
    model, opt = build(seed=13)
    with Audit() as audit:
        for read_only in (True, False):  # a reader, then a writer's start (which rebuilds it)
            with CheckpointManager(str(root), read_only=read_only, best={"loss": "min"}) as mgr:
                info = mgr.restore(mgr.track(model=model, optimizer=opt))
                assert info.step == 2
    assert audit.outside(root, tmp_path) == []
    assert _tree(tmp_path, root) == before
    from _fault_lib import flatten

    assert_bit_identical(flatten(model, opt), load_file(str(refs / "step_2.safetensors")), "step 2")
    assert json.loads((root / "manifest.json").read_text())["pointers"]["last"] == 2
