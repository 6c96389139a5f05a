"""Malicious payloads: pickle gadgets whose ``__reduce__`` creates a sentinel file, planted where
a pickle-based checkpointer would unpickle them — the JSON value entries of a shard (rebuilt so
every size and checksum agrees: only "never unpickle" stands in the way), metadata.json, DCP's
own ``.metadata``, the manifest, the COMMITTED marker and the run lock. Every one is refused or
ignored through the real user path (``CheckpointManager``), the sentinel never appears, and no
unpickler ever resolves a class (``pickle.find_class`` audit events)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_bit_identical, assert_named_error, build, restore_into_fresh
from fault_audit import Audit
from safetensors.torch import load_file
from support.ckpt_edit import restamp_index

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointError, CorruptCheckpoint
from dist_ckpt.format.shard import PendingEntry, save_shard
from storage_backends.local import LocalBackend

pytestmark = QUIET
SHARD = "rank_00000.safetensors"


class Gadget:
    """Unpickling this creates ``path`` (stands in for arbitrary code execution)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_gadget_is_live(tmp_path: Path) -> None:
    """Control: unpickling it really creates the sentinel."""
    pickle.loads(pickle.dumps(Gadget(tmp_path / "control")))
    assert (tmp_path / "control").exists()


@pytest.fixture
def run(tmp_path: Path) -> tuple[str, Path]:
    root, refs = str(tmp_path / "run"), tmp_path / "refs"
    job = LocalJob(root, refs)
    job.save(1)
    job.save(2)
    job.close()
    return root, refs


def _restore(root: str):
    model, opt = build(seed=5)
    with Audit() as audit, CheckpointManager(root, read_only=True) as mgr:
        try:
            mgr.restore(mgr.track(model=model, optimizer=opt))
            error = None
        except CheckpointError as e:
            error = e
    return error, audit


def _rebuild_shard_with_pickles(step_dir: Path, payload: bytes, which: set[str] | None) -> list[str]:
    """Rewrite the shard with ``payload`` as the bytes of the value entries named in ``which``
    (all when None), through the library's own shard writer, and fix metadata.json so every
    size and checksum agrees. Returns the replaced entries."""
    from dist_ckpt.format.shard import ShardReader

    backend = LocalBackend(str(step_dir))
    meta = json.loads((step_dir / "metadata.json").read_text())
    reader = ShardReader(backend, SHARD, None)
    replaced, entries = [], []
    for name, info in sorted(reader.header.entries.items(), key=lambda kv: kv[1].begin):
        raw = backend.read(SHARD, info.begin, info.end - info.begin)
        if info.kind == "json" and (which is None or name in which):
            replaced.append(name)
            entries.append(PendingEntry(name, "U8", (len(payload),), memoryview(payload), "json"))
        else:
            entries.append(PendingEntry(name, info.dtype, info.shape, memoryview(raw), info.kind))
    written = save_shard(backend, SHARD, entries, None)
    meta["files"][SHARD].update(size=written.size, checksum=written.checksum)
    for ref in meta["values"].values():
        ref["checksum"] = written.entry_checksums[ref["entry"]]
        ref["stored_bytes"] = written.stored_bytes[ref["entry"]]
    (step_dir / "metadata.json").write_text(json.dumps(meta))
    # format 2: tensor chunk checksums live in the shard's rank index
    restamp_index(step_dir, SHARD, written.entry_checksums, written.stored_bytes)
    return replaced


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL], ids=["protocol0", "protocol-highest"])
@pytest.mark.parametrize("target", ["progress-record", "optimizer-param-group", "rng-state", "every-value"])
def test_pickle_gadget_in_json_value_entries(run, tmp_path: Path, protocol: int, target: str) -> None:
    root, refs = run
    sentinel = tmp_path / "pwned"
    which = {
        "progress-record": {"_dist_ckpt"},
        "optimizer-param-group": {"optimizer.param_groups.0.lr"},
        "rng-state": {"rng.rank_0.python"},
        "every-value": None,
    }[target]
    replaced = _rebuild_shard_with_pickles(
        Path(root) / "step_000000002", pickle.dumps(Gadget(sentinel), protocol), which
    )
    assert replaced
    error, audit = _restore(root)
    assert isinstance(error, CorruptCheckpoint), error
    assert_named_error(error, f"step_000000002/{SHARD}")
    assert any(name in str(error) for name in replaced), f"names none of {replaced}: {error}"
    assert not sentinel.exists() and audit.unpickled() == []
    info, state = restore_into_fresh(root, None, 1)
    assert_bit_identical(state, load_file(str(refs / "step_1.safetensors")), "step 1")


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL], ids=["protocol0", "protocol-highest"])
def test_pickle_gadget_as_metadata_json(run, tmp_path: Path, protocol: int) -> None:
    root, _ = run
    sentinel = tmp_path / "pwned"
    (Path(root) / "step_000000002" / "metadata.json").write_bytes(pickle.dumps(Gadget(sentinel), protocol))
    error, audit = _restore(root)
    assert isinstance(error, CorruptCheckpoint), error
    assert_named_error(error, "step_000000002/metadata.json")
    assert not sentinel.exists() and audit.unpickled() == []


def test_dcp_pickle_files_planted_in_a_checkpoint_are_never_read(run, tmp_path: Path) -> None:
    root, refs = run
    sentinel = tmp_path / "pwned"
    for name in (".metadata", "__0_0.distcp", "rng.pkl"):
        (Path(root) / "step_000000002" / name).write_bytes(pickle.dumps(Gadget(sentinel)))
    with Audit() as audit:
        info, state = restore_into_fresh(root, None, "last")
    assert info.step == 2
    assert_bit_identical(state, load_file(str(refs / "step_2.safetensors")), "step 2")
    assert not sentinel.exists() and audit.unpickled() == []
    opened = {Path(p).name for e, p in audit.paths() if e == "open"}
    assert not opened & {".metadata", "__0_0.distcp", "rng.pkl"}


@pytest.mark.parametrize("victim", ["manifest.json", "step_000000002/COMMITTED", "LOCK"])
def test_pickle_gadget_in_run_files(run, tmp_path: Path, victim: str) -> None:
    """The manifest and the lock are rebuilt/taken over; a COMMITTED marker is refused by name.
    Nothing is ever unpickled."""
    root, refs = run
    sentinel = tmp_path / "pwned"
    (Path(root) / victim).write_bytes(pickle.dumps(Gadget(sentinel)))
    with Audit() as audit:
        try:
            mgr = CheckpointManager(root, best={"loss": "min"})  # a writer's start reads all of them
        except CheckpointError as e:
            assert victim.endswith("COMMITTED"), e
            assert isinstance(e, CorruptCheckpoint)
            assert_named_error(e, victim)
        else:
            assert not victim.endswith("COMMITTED")
            model, opt = build(seed=3)
            info = mgr.restore(mgr.track(model=model, optimizer=opt))
            mgr.close()
            assert info.step == 2
    assert not sentinel.exists() and audit.unpickled() == []
