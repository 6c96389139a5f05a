"""RunStore.apply_retention, the one retention of the manager, `dist-ckpt prune` and the tiers'
promotion: the manifest that no longer lists a step is durable before any step is deleted —
shown with a backend wrapper that fails the manifest write, and one that looks at the stored
manifest at the moment of each delete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt import CheckpointManager, TrainingState, save
from dist_ckpt import manifest as mf
from dist_ckpt.errors import StorageError
from dist_ckpt.layout import COMMITTED, MANIFEST, step_prefix
from dist_ckpt.run_store import RunStore
from storage_backends import open_backend

STEPS = (1, 2, 3, 4)


def _run(root: Path) -> None:
    for step in STEPS:
        save({"w": torch.full((4,), float(step))}, str(root / step_prefix(step)))
    RunStore(open_backend(str(root))).reconciled_manifest({})


def _committed(root: Path) -> list[int]:
    return [s for s in STEPS if (root / step_prefix(s) / COMMITTED).exists()]


def _rebuild(store: RunStore):
    return lambda current: mf.rebuild(store.committed_entries(), {})


def test_a_failing_manifest_write_deletes_nothing(tmp_path):
    _run(tmp_path)
    before = (tmp_path / MANIFEST).read_bytes()
    backend = FaultyBackend(open_backend(str(tmp_path)), [Rule("compare_and_swap", MANIFEST, "fail", error="EIO")])
    store = RunStore(backend)
    with pytest.raises(StorageError, match=MANIFEST):
        store.apply_retention(_rebuild(store), keep_last=1)
    assert backend.injected, "the manifest write was not attempted"
    assert _committed(tmp_path) == list(STEPS)
    assert all((tmp_path / step_prefix(s)).is_dir() for s in STEPS)
    assert backend.calls["delete"] == backend.calls["delete_prefix"] == 0
    assert (tmp_path / MANIFEST).read_bytes() == before


def test_each_delete_sees_a_durable_manifest_without_the_step(tmp_path):
    _run(tmp_path)
    inner = open_backend(str(tmp_path))
    seen: list[tuple[str, list[int]]] = []

    def look(op: str, key: str) -> None:
        seen.append((key, mf.loads(inner.read(MANIFEST)).steps()))

    backend = FaultyBackend(inner, [Rule("delete", "step_*/COMMITTED", "call", hook=look, count=None)])
    store = RunStore(backend)
    kept = store.apply_retention(_rebuild(store), keep_last=2)
    assert kept.drops == (1, 2) and kept.failed == ()
    assert kept.manifest.steps() == [3, 4]
    # the first thing deleted of each step is its marker, and the manifest already omits it then
    assert seen == [(f"{step_prefix(1)}/{COMMITTED}", [3, 4]), (f"{step_prefix(2)}/{COMMITTED}", [3, 4])]
    assert _committed(tmp_path) == [3, 4]
    assert not (tmp_path / step_prefix(1)).exists()


def test_deletes_later_deletes_nothing_until_asked(tmp_path):
    _run(tmp_path)
    store = RunStore(open_backend(str(tmp_path)))
    kept = store.apply_retention(_rebuild(store), keep_last=3, deletes_later=True)
    assert kept.drops == (1,)
    assert mf.loads((tmp_path / MANIFEST).read_bytes()).steps() == [2, 3, 4]
    assert _committed(tmp_path) == list(STEPS)
    assert store.delete_dropped(kept.drops) == []
    assert _committed(tmp_path) == [2, 3, 4]


def test_a_failing_delete_is_reported_and_the_others_still_go(tmp_path):
    _run(tmp_path)
    backend = FaultyBackend(
        open_backend(str(tmp_path)), [Rule("delete", f"{step_prefix(1)}/{COMMITTED}", "fail", error="EIO")]
    )
    store = RunStore(backend)
    failures: list[int] = []
    kept = store.apply_retention(_rebuild(store), keep_last=2, on_failure=lambda step, e: failures.append(step))
    assert kept.failed == (1,) and failures == [1]
    assert _committed(tmp_path) == [1, 3, 4]  # step 1 is left to gc; the manifest no longer lists it
    assert mf.loads((tmp_path / MANIFEST).read_bytes()).steps() == [3, 4]


def test_the_manager_deletes_nothing_when_its_manifest_write_fails(tmp_path):
    backend = FaultyBackend(open_backend(str(tmp_path)), armed=False)
    mgr = CheckpointManager(str(tmp_path), backend=backend, keep_last=1)
    state = TrainingState({"model": torch.nn.Linear(2, 2)})
    try:
        mgr.save(1, state)
        backend.add(Rule("compare_and_swap", MANIFEST, "fail", error="EIO"))
        backend.arm()
        with pytest.raises(StorageError):
            mgr.save(2, state)
    finally:
        backend.disarm()
        mgr.close()
    assert backend.injected
    assert [s for s in (1, 2) if (tmp_path / step_prefix(s) / COMMITTED).exists()] == [1, 2]
    assert mf.loads((tmp_path / MANIFEST).read_bytes()).steps() == [1]


def test_a_step_retired_while_the_run_is_listed_is_left_out_not_an_error(tmp_path):
    """A monitor (or the Lightning test's poll) lists the run while the job's retention deletes
    a step: the marker is listed, then gone when read. CI saw this as a NoSuchKey on S3."""
    _run(tmp_path)
    inner = open_backend(str(tmp_path))
    retire = RunStore(inner)
    # the job's retention (keep 2: steps 1 and 2 go) runs between the listing and the first read
    hook = Rule(
        "read",
        f"{step_prefix(1)}/{COMMITTED}",
        "call",
        hook=lambda op, key: retire.apply_retention(_rebuild(retire), keep_last=2),
    )
    backend = FaultyBackend(inner, [hook])
    entries = RunStore(backend).committed_entries()
    assert backend.injected, "the read of the retired marker was not reached"
    assert [e.step for e in entries] == [3, 4]
