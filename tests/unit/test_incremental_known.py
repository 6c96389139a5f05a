"""Incremental saves without rereading what this process wrote, and without hashing what has
certainly changed (issue 16's full fine-tune cost) — never at the price of a wrong reuse:

- an entry whose sample changed is not hashed in full; when it stops changing, the base's
  stored bytes are hashed to decide, so a change the sample cannot see is still written;
- the base's entries and the references a sweep marks are remembered per save attempt and used
  only while the marker in storage names that attempt (dist_ckpt.known_commits)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from incremental_common import AdapterRun, assert_bit_identical
from manager_common import manager

import dist_ckpt
import dist_ckpt.incremental as incremental
import dist_ckpt.sweep as sweep
from dist_ckpt import known_commits
from dist_ckpt.format.shard import ShardReader
from storage_backends import open_backend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _files(folder) -> set[str]:
    return set(json.loads((folder / "metadata.json").read_text())["files"])


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_change_the_sample_cannot_see_is_written_not_reused(tmp_path, compression):
    """``w`` changes in a sampled region at save b (b records its sample only), then in a
    region no sample covers at save c: c's sample equals b's, so only hashing b's stored bytes
    can tell — c must write ``w`` and restore the changed value."""
    w = torch.zeros(1 << 20)  # 4 MiB: samples cover 3 x 16 KiB of it
    dist_ckpt.save({"w": w}, str(tmp_path / "a"), incremental=True, compression=compression)
    w_b = w.clone()
    w_b[0] = 1.0  # first bytes: sampled
    dist_ckpt.save({"w": w_b}, str(tmp_path / "b"), base=str(tmp_path / "a"), compression=compression)
    index_b = json.loads(
        ShardReader(open_backend(str(tmp_path)), "b/index_00000.safetensors", None).read("index").tobytes()
    )
    assert index_b["entries"]["w"][2].endswith(":"), "b should record w's sample only (it had changed)"
    w_c = w_b.clone()
    w_c[100_000] = 2.0  # byte 400000: between the start and middle samples
    assert incremental.sample_hash(_entry(w_c)) == incremental.sample_hash(_entry(w_b))
    dist_ckpt.save({"w": w_c}, str(tmp_path / "c"), base=str(tmp_path / "b"), compression=compression)
    assert _files(tmp_path / "c") == {"rank_00000.safetensors", "index_00000.safetensors"}  # written, no reference
    out = {"w": torch.empty(1 << 20)}
    dist_ckpt.load(out, str(tmp_path / "c"))
    assert torch.equal(out["w"], w_c)
    # and unchanged from c to d: reused (c hashed w in full while writing it)
    dist_ckpt.save({"w": w_c}, str(tmp_path / "d"), base=str(tmp_path / "c"), compression=compression)
    assert "c/rank_00000.safetensors" in _files(tmp_path / "d")
    # changed (sample-only record in e), then unchanged in f: e's stored bytes decide, f reuses them
    w_e = w_c + 1
    dist_ckpt.save({"w": w_e}, str(tmp_path / "e"), base=str(tmp_path / "d"), compression=compression)
    dist_ckpt.save({"w": w_e.clone()}, str(tmp_path / "f"), base=str(tmp_path / "e"), compression=compression)
    assert "e/rank_00000.safetensors" in _files(tmp_path / "f")
    dist_ckpt.load(out, str(tmp_path / "f"))
    assert torch.equal(out["w"], w_e)


def _entry(t: torch.Tensor):
    from dist_ckpt.format.shard import PendingEntry
    from dist_ckpt.storage import raw_bytes

    return PendingEntry("w", "F32", tuple(t.shape), raw_bytes(t))


def test_full_finetune_saves_hash_nothing_in_full_after_the_first(tmp_path, monkeypatch):
    """Every entry changes every step: after the first save no full content hash is computed
    and no metadata.json is read back (the base is this process's previous save)."""
    calls = {"hash": 0, "metadata": 0}
    real_hash, real_incremental_meta = incremental.content_hash, incremental.read_checkpoint_metadata
    real_sweep_meta = sweep.read_checkpoint_metadata

    def counting_hash(entry):
        calls["hash"] += 1
        return real_hash(entry)

    def counting(real):
        def read(*args, **kwargs):
            calls["metadata"] += 1
            return real(*args, **kwargs)

        return read

    monkeypatch.setattr(incremental, "content_hash", counting_hash)
    monkeypatch.setattr(incremental, "read_checkpoint_metadata", counting(real_incremental_meta))
    monkeypatch.setattr(sweep, "read_checkpoint_metadata", counting(real_sweep_meta))
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with manager(tmp_path, keep_last=2, incremental=True) as mgr:
        state = mgr.track(model=model, opt=opt)
        for step in range(1, 6):
            model(torch.randn(4, 64)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, state)
            if step == 1:
                assert calls["hash"] > 0  # no base: every tensor hashed in full while written
                calls["hash"] = 0
        snap = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    assert calls == {"hash": 0, "metadata": 0}
    fresh = torch.nn.Linear(64, 64)
    with manager(tmp_path, read_only=True) as mgr:
        mgr.restore(mgr.track(model=fresh, opt=torch.optim.AdamW(fresh.parameters(), lr=1e-2)))
    assert_bit_identical(snap["model"], fresh.state_dict())


def test_a_remembered_base_is_not_used_once_another_save_committed_that_step(tmp_path):
    """This process wrote step 1 (attempt A, remembered). Another job then deleted it and
    committed a different step 1 (attempt B). The next save must read the new step 1, not
    reuse A's entries: they would point at bytes that are no longer there."""
    x, y = torch.randn(256, 256), torch.randn(256, 256)
    root, other = tmp_path / "run", tmp_path / "other"
    dist_ckpt.save({"w": x}, str(root / "step_000000001"), incremental=True)  # remembered: w = x
    dist_ckpt.save({"w": y}, str(other / "step_000000001"), incremental=True)  # another run root
    shutil.rmtree(root / "step_000000001")  # "another job": step 1 deleted and committed again
    shutil.copytree(other / "step_000000001", root / "step_000000001")
    dist_ckpt.save({"w": x}, str(root / "step_000000002"), base=str(root / "step_000000001"))
    assert "step_000000001/rank_00000.safetensors" not in _files(root / "step_000000002")  # x is not in it
    out = {"w": torch.empty(256, 256)}
    dist_ckpt.load(out, str(root / "step_000000002"))
    assert torch.equal(out["w"], x)
    # and the same state over the new step 1 (y) is reused from it, read back from storage
    dist_ckpt.save({"w": y}, str(root / "step_000000003"), base=str(root / "step_000000001"))
    assert "step_000000001/rank_00000.safetensors" in _files(root / "step_000000003")
    dist_ckpt.load(out, str(root / "step_000000003"))
    assert torch.equal(out["w"], y)


def test_remembered_references_are_used_only_for_the_same_marker():
    marker = json.dumps({"step": 3, "base": "step_000000002", "attempt": "aaaa"}).encode()
    where = "file:///run/step_000000003/COMMITTED"
    known_commits.remember_references(where, marker, ["step_000000002/rank_00000.safetensors"])
    assert known_commits.known_references(where, marker) == {"step_000000002/rank_00000.safetensors"}
    again = json.dumps({"step": 3, "base": "step_000000001", "attempt": "bbbb"}).encode()  # step 3 saved again
    assert known_commits.known_references(where, again) is None
    unnamed = json.dumps({"step": 3, "base": "step_000000002"}).encode()  # no attempt: no identity
    known_commits.remember_references(where, unnamed, [])
    assert known_commits.known_references(where, unnamed) is None


def test_retention_reads_references_of_a_step_committed_again_by_another_job(tmp_path):
    """This process wrote step 3 referencing step 2's shard (remembered). Another job then
    committed a different step 3 that references step 1's shard. Deleting step 1 must keep
    that shard: the sweep reads the new step 3's file table instead of what it remembered."""
    from dist_ckpt.run_store import RunStore
    from storage_backends import open_backend

    a, a2 = torch.randn(128, 128), torch.randn(128, 128)
    root, other = tmp_path / "run", tmp_path / "other"

    def save(folder, b_seed, value, base=None):
        state = {"a": value, "b": torch.full((8,), float(b_seed))}
        dist_ckpt.save(state, str(folder), **({"base": str(base)} if base else {"incremental": True}))

    save(root / "step_000000001", 1, a)
    save(root / "step_000000002", 2, a2, root / "step_000000001")  # both changed: no references
    save(root / "step_000000003", 3, a2, root / "step_000000002")  # a from step 2
    assert "step_000000002/rank_00000.safetensors" in _files(root / "step_000000003")
    RunStore(open_backend(str(root))).delete_step(2)  # remembered step 3: step 2's shard stays
    assert (root / "step_000000002" / "rank_00000.safetensors").exists()
    shutil.copytree(root / "step_000000001", other / "step_000000001")  # another job, over step 1
    save(other / "step_000000003", 4, a, other / "step_000000001")
    shutil.rmtree(root / "step_000000003")
    shutil.copytree(other / "step_000000003", root / "step_000000003")
    assert "step_000000001/rank_00000.safetensors" in _files(root / "step_000000003")
    RunStore(open_backend(str(root))).delete_step(1)
    assert (root / "step_000000001" / "rank_00000.safetensors").exists(), "a shard step 3 reads was deleted"
    out = {"a": torch.empty(128, 128), "b": torch.empty(8)}
    dist_ckpt.load(out, str(root / "step_000000003"))
    assert torch.equal(out["a"], a)


def test_a_remembered_base_that_was_deleted_is_never_referenced(tmp_path):
    """This process remembers step 2 (the last it wrote); step 2 is then deleted. Step 3's
    base is step 1 (the newest committed): nothing of step 2 may be referenced, and the
    frozen weights are reused from step 1's shard, read back from storage."""
    from dist_ckpt.run_store import RunStore
    from dist_ckpt.verify import verify_run

    run = AdapterRun(0)
    with manager(tmp_path, keep_last=None, incremental=True) as mgr:
        state = mgr.track(**run.objects())
        for step in (1, 2):
            run.train_step()
            mgr.save(step, state)
        RunStore(open_backend(str(tmp_path))).delete_step(2)
        assert not (tmp_path / "step_000000002").exists()
        run.train_step()
        mgr.save(3, state)
        snap = run.snapshot()
    files = _files(tmp_path / "step_000000003")
    assert not any(n.startswith("step_000000002/") for n in files), files
    assert "step_000000001/rank_00000.safetensors" in files  # the frozen base, from step 1
    fresh = AdapterRun(99)
    with manager(tmp_path, read_only=True) as mgr:
        mgr.restore(mgr.track(**fresh.objects()), which=3)
    assert_bit_identical(snap, fresh.snapshot())
    report = verify_run(open_backend(str(tmp_path)))  # (the manifest still lists step 2: deleted behind its back)
    assert [c.problems for c in report.checkpoints] == [[], []], report


def test_entries_remembered_from_a_deleted_step_are_never_reused(tmp_path):
    """Step 2 (the last this process wrote) adds ``z``, hashed in full; step 2 is deleted;
    step 3 over base step 1 holds the same ``z``: it must be written, not refer to the
    deleted step 2's shard."""
    from dist_ckpt.run_store import RunStore

    x, z = torch.randn(64, 64), torch.randn(64, 64)
    dist_ckpt.save({"w": x}, str(tmp_path / "step_000000001"), incremental=True)
    dist_ckpt.save({"w": x + 1, "z": z}, str(tmp_path / "step_000000002"), base=str(tmp_path / "step_000000001"))
    RunStore(open_backend(str(tmp_path))).delete_step(2)
    assert not (tmp_path / "step_000000002").exists()
    dist_ckpt.save({"w": x, "z": z}, str(tmp_path / "step_000000003"), base=str(tmp_path / "step_000000001"))
    files = _files(tmp_path / "step_000000003")
    assert files == {"rank_00000.safetensors", "index_00000.safetensors", "step_000000001/rank_00000.safetensors"}
    out = {"w": torch.empty(64, 64), "z": torch.empty(64, 64)}
    dist_ckpt.load(out, str(tmp_path / "step_000000003"))
    assert torch.equal(out["w"], x) and torch.equal(out["z"], z)
