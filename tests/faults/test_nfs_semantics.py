"""NFS semantics: the local backend (fsync on, link-based create-if-absent, lock-file CAS) writes
through mount A of a directory while a reader looks through mount B of the same directory (bind
mounts; two backend instances on one directory where mounting is not permitted — said in the
output). The reader sees a step only once its COMMITTED marker is published on A: not while
shards, metadata.json or even COMMITTED sit in the staging folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_bit_identical, build, check_run, flatten
from safetensors.torch import load_file
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointNotFound
from storage_backends.local import LocalBackend

pytestmark = QUIET


def _two_mounts(tmp_path: Path, mounts, capsys) -> tuple[Path, Path]:
    export = tmp_path / "export"
    export.mkdir()
    a, b = tmp_path / "mnt_a", tmp_path / "mnt_b"
    why = mounts.bind(export, a) or mounts.bind(export, b)
    with capsys.disabled():
        if why is None:
            print(f"\n[nfs] writer on bind mount {a}, reader on bind mount {b} of {export}")
            return a, b
        print(f"\n[nfs] bind mounts not permitted ({why}): two LocalBackend instances on {export} instead")
    return export, export


def test_reader_on_mount_b_sees_a_step_only_after_its_commit_on_mount_a(tmp_path: Path, mounts, capsys) -> None:
    mnt_a, mnt_b = _two_mounts(tmp_path, mounts, capsys)
    root_a, root_b, refs = mnt_a / "run", mnt_b / "run", tmp_path / "refs"
    seen: dict[str, object] = {}

    def reader(which):
        model, opt = build(seed=21)
        with CheckpointManager(str(root_b), read_only=True, best={"loss": "min"}) as mgr:
            steps = [c.step for c in mgr.checkpoints()]
            try:
                info = mgr.restore(mgr.track(model=model, optimizer=opt), which)
                got = info.step if info else None
            except CheckpointNotFound as e:
                got = e
        return steps, got, flatten(model, opt)

    def look(moment: str):
        def hook(op: str, key: str) -> None:
            staged = sorted(p.name for p in root_b.glob("step_000000002.tmp-*/*"))
            steps, got, state = reader(2)
            seen[moment] = (staged, steps, got)
            if not isinstance(got, Exception):
                seen[moment + ":state"] = state

        return hook

    backend = FaultyBackend(LocalBackend(str(root_a), fsync=True), armed=False)
    job = LocalJob(str(root_a), refs, backend=backend)
    job.save(1)
    backend.add(Rule("create_if_absent", "step_000000002*/metadata.json", "call", hook=look("shards written")))
    backend.add(Rule("create_if_absent", "step_000000002*/COMMITTED", "call", hook=look("before COMMITTED")))
    backend.add(Rule("publish", "step_000000002*", "call", hook=look("COMMITTED staged, before publish")))
    backend.add(Rule("publish", "step_000000002*", "call", when="after", hook=look("published")))
    backend.arm()
    assert job.save(2)
    job.close()

    for moment in ("shards written", "before COMMITTED", "COMMITTED staged, before publish"):
        staged, steps, got = seen[moment]
        assert "rank_00000.safetensors" in staged, (moment, staged)  # B does see the files...
        assert steps == [1], (moment, steps)  # ...but not the step
        assert isinstance(got, CheckpointNotFound), (moment, got)
    assert "COMMITTED" in seen["COMMITTED staged, before publish"][0]
    staged, steps, got = seen["published"]
    assert got == 2 and staged == []
    assert_bit_identical(seen["published:state"], load_file(str(refs / "step_2.safetensors")), "step 2 read on B")
    check_run(str(root_b), refs, expect_last=2)


def test_reader_on_a_read_only_mount(tmp_path: Path, mounts, capsys) -> None:
    """An evaluation job reads the run through a read-only mount; the manifest is stale (the
    writer crashed before updating it): the reader rebuilds it in memory, writing nothing."""
    root, refs = tmp_path / "run", tmp_path / "refs"
    job = LocalJob(str(root), refs)
    job.save(1)
    job.save(2)
    job.close()
    (root / "manifest.json").unlink()
    ro = tmp_path / "ro"
    why = mounts.bind(root, ro)
    if why is None:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True, text=True)
        why = None if r.returncode == 0 else r.stderr
    if why is not None:
        pytest.skip(f"read-only bind mount not permitted: {why}")
    model, opt = build(seed=4)
    with CheckpointManager(str(ro), read_only=True, best={"loss": "min"}) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [1, 2]
        assert mgr.restore(mgr.track(model=model, optimizer=opt)).step == 2
    assert_bit_identical(flatten(model, opt), load_file(str(refs / "step_2.safetensors")), "step 2")
    assert not (root / "manifest.json").exists()
