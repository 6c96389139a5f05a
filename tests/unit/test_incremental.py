"""Incremental checkpoints in one process: frozen weights stored once, retention keeps shared
bytes, restores are bit-identical, references never leave the run root."""

from __future__ import annotations

import json

import pytest
import torch
from incremental_common import AdapterRun, CountingReads, assert_bit_identical, stored_bytes
from manager_common import manager, steps_on_disk

import dist_ckpt
from dist_ckpt import known_commits
from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.errors import ConfigError, CorruptCheckpoint
from dist_ckpt.export import export_checkpoint
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_frozen_base_adapter_eight_saves_keep_last_two(tmp_path, compression):
    run = AdapterRun(0)
    snaps = {}
    first = None
    with manager(tmp_path, keep_last=2, incremental=True, compression=compression) as mgr:
        state = mgr.track(**run.objects())
        for step in range(1, 9):
            run.train_step()
            assert mgr.save(step, state)
            snaps[step] = run.snapshot()
            if step == 1:
                first = stored_bytes(tmp_path)
        infos = mgr.checkpoints()
    after = stored_bytes(tmp_path)
    # without references this would be 2x the first save (two full checkpoints kept)
    assert after <= 1.3 * first, (after, first)
    assert steps_on_disk(tmp_path) == [7, 8]
    # own bytes are the adapter's; the logical size includes the base the checkpoint reads
    assert [i.step for i in infos] == [7, 8]
    for info in infos:
        assert info.size < 0.2 * first and info.logical_size > first * 0.9, info

    for step in (7, 8):  # the newest and the kept older step
        fresh = AdapterRun(99)
        with manager(tmp_path, keep_last=2, incremental=True, read_only=True) as mgr:
            mgr.restore(mgr.track(**fresh.objects()), which=step)
        assert_bit_identical(snaps[step], fresh.snapshot())

    report = verify_run(open_backend(str(tmp_path)))
    assert report.ok, [p.message for c in report.checkpoints for p in c.problems] + [p.message for p in report.problems]
    assert not report.notes, report.notes  # the retained base file of step 1 is no leftover

    out = tmp_path / "export"
    view = CheckpointView(open_backend(str(tmp_path)), "step_000000008")
    export_checkpoint(view, open_backend(str(out)))
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["base.weight"], snaps[8]["model"]["base.weight"])
    assert torch.equal(exported["up.weight"], snaps[8]["model"]["up.weight"])


def test_first_save_full_and_save_after_base_deleted_is_full(tmp_path):
    run = AdapterRun(0)
    with manager(tmp_path, keep_last=None, incremental=True) as mgr:
        state = mgr.track(**run.objects())
        mgr.save(1, state)
        run.train_step()
        mgr.save(2, state)
    c1 = json.loads((tmp_path / "step_000000001" / "COMMITTED").read_text())
    c2 = json.loads((tmp_path / "step_000000002" / "COMMITTED").read_text())
    assert "base" not in c1 and c1["bytes"] == c1["logical_bytes"]
    assert c2["base"] == "step_000000001" and c2["bytes"] < c2["logical_bytes"]
    # prune both: the next save has no base and is full
    from dist_ckpt.run_store import RunStore

    store = RunStore(open_backend(str(tmp_path)))
    store.delete_step(2)
    store.delete_step(1)
    assert not list(tmp_path.glob("step_*/*"))  # nothing referenced any more: all swept
    with manager(tmp_path, keep_last=None, incremental=True) as mgr:
        state = mgr.track(**run.objects())
        mgr.save(3, state)
    c3 = json.loads((tmp_path / "step_000000003" / "COMMITTED").read_text())
    assert "base" not in c3 and c3["bytes"] == c3["logical_bytes"]


def test_low_level_base_reuses_unchanged_tensors_and_restores(tmp_path):
    frozen, trained = torch.randn(256, 256), torch.randn(4, 256)
    dist_ckpt.save({"frozen": frozen, "trained": trained}, str(tmp_path / "a"), incremental=True)
    trained2 = trained * 2
    dist_ckpt.save({"frozen": frozen, "trained": trained2}, str(tmp_path / "b"), base=str(tmp_path / "a"))
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert "a/rank_00000.safetensors" in meta["files"]  # listed with size and checksum
    assert (
        meta["files"]["a/rank_00000.safetensors"]["size"] == (tmp_path / "a" / "rank_00000.safetensors").stat().st_size
    )
    assert (tmp_path / "b" / "rank_00000.safetensors").stat().st_size < 256 * 256 * 4 / 10
    out = {"frozen": torch.zeros(256, 256), "trained": torch.zeros(4, 256)}
    dist_ckpt.load(out, str(tmp_path / "b"))
    assert torch.equal(out["frozen"], frozen) and torch.equal(out["trained"], trained2)
    # content decides, not the name: a changed "frozen" tensor is written again
    dist_ckpt.save({"frozen": frozen + 1, "trained": trained2}, str(tmp_path / "c"), base=str(tmp_path / "b"))
    meta_c = json.loads((tmp_path / "c" / "metadata.json").read_text())
    assert set(meta_c["files"]) == {"rank_00000.safetensors", "index_00000.safetensors", "b/rank_00000.safetensors"}
    dist_ckpt.load(out, str(tmp_path / "c"))
    assert torch.equal(out["frozen"], frozen + 1) and torch.equal(out["trained"], trained2)


def test_base_outside_the_folder_is_refused(tmp_path):
    dist_ckpt.save({"x": torch.ones(4)}, str(tmp_path / "r1" / "a"), incremental=True)
    with pytest.raises(ConfigError, match="same folder"):
        dist_ckpt.save({"x": torch.ones(4)}, str(tmp_path / "r2" / "b"), base=str(tmp_path / "r1" / "a"))
    assert not (tmp_path / "r2" / "b").exists()


@pytest.mark.parametrize("bad", ["../a/rank_00000.safetensors", "/etc/passwd/x", "a/../../x", "a/b/c"])
def test_reference_leaving_the_run_root_is_refused(tmp_path, bad):
    frozen = torch.randn(64, 64)
    dist_ckpt.save({"f": frozen, "t": torch.ones(4)}, str(tmp_path / "a"), incremental=True)
    dist_ckpt.save({"f": frozen, "t": torch.zeros(4)}, str(tmp_path / "b"), base=str(tmp_path / "a"))
    path = tmp_path / "b" / "metadata.json"
    text = path.read_text().replace('"a/rank_00000.safetensors"', json.dumps(bad))
    path.write_text(text)
    with pytest.raises(CorruptCheckpoint, match="referenced file|refusing"):
        dist_ckpt.load({"f": torch.zeros(64, 64), "t": torch.zeros(4)}, str(tmp_path / "b"))


@pytest.mark.parametrize("mode", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_async_saves_hash_in_the_background_and_reuse(tmp_path, mode):
    """Async saves (thread, writer process): hashing runs in the background writer on the
    staged copy; the frozen base is still written once and restores bit-identical."""
    run = AdapterRun(0)
    snaps = {}
    with manager(tmp_path, keep_last=2, incremental=True, async_save=True, async_mode=mode) as mgr:
        state = mgr.track(**run.objects())
        for step in (1, 2, 3):
            run.train_step()
            mgr.save(step, state)
            snaps[step] = run.snapshot()
        mgr.wait()
    for step in (2, 3):
        info = json.loads((tmp_path / f"step_{step:09d}" / "COMMITTED").read_text())
        assert info["base"] == f"step_{step - 1:09d}" and info["bytes"] * 5 < info["logical_bytes"], info
    fresh = AdapterRun(5)
    with manager(tmp_path, read_only=True) as mgr:
        mgr.restore(mgr.track(**fresh.objects()))
    assert_bit_identical(snaps[3], fresh.snapshot())


def test_unreadable_metadata_of_a_committed_checkpoint_stops_the_sweep(tmp_path):
    """What a committed checkpoint references is unknown when its metadata.json is damaged:
    deleting another step then removes that step's COMMITTED only, never a file."""
    from dist_ckpt.run_store import RunStore

    run = AdapterRun(0)
    with manager(tmp_path, keep_last=None, incremental=True) as mgr:
        state = mgr.track(**run.objects())
        for step in (1, 2, 3):
            run.train_step()
            mgr.save(step, state)
        snap = run.snapshot()
    (tmp_path / "step_000000002" / "metadata.json").write_text("{ damaged")
    known_commits.forget_all()  # as in any other process: what step 2 references is not known here
    before = sorted(p.name for p in (tmp_path / "step_000000001").iterdir())
    with pytest.raises(CorruptCheckpoint, match="step_000000002.*nothing is deleted"):
        RunStore(open_backend(str(tmp_path))).delete_step(1)
    after = sorted(p.name for p in (tmp_path / "step_000000001").iterdir())
    assert after == [n for n in before if n != "COMMITTED"]  # step 1 is gone as a checkpoint, its files stay
    RunStore(open_backend(str(tmp_path))).collect_garbage()  # refuses to sweep them too (logged)
    assert sorted(p.name for p in (tmp_path / "step_000000001").iterdir()) == after
    fresh = AdapterRun(3)
    with manager(tmp_path, read_only=True) as mgr:
        mgr.restore(mgr.track(**fresh.objects()), which=3)
    assert_bit_identical(snap, fresh.snapshot())


def test_hashing_runs_after_save_returns(tmp_path, monkeypatch):
    """The content hash is computed by the background writer on the staged copy: a hash that
    takes 3 s does not lengthen the training stall of an async save, only its background time."""
    import time

    import dist_ckpt.incremental as incremental

    real = incremental.content_hash
    calls = []

    def slow_hash(entry):
        if not calls:
            time.sleep(3.0)
        calls.append(entry.name)
        return real(entry)

    monkeypatch.setattr(incremental, "content_hash", slow_hash)
    run = AdapterRun(0)
    with manager(tmp_path, incremental=True, async_save=True) as mgr:
        state = mgr.track(**run.objects())
        t0 = time.perf_counter()
        mgr.save(1, state)
        stall = time.perf_counter() - t0
        mgr.wait()
        total = time.perf_counter() - t0
    assert calls, "the content hash was never computed"
    assert total >= 3.0 and stall < 3.0, (stall, total)


def test_restore_reads_only_the_needed_bytes_of_a_referenced_file(tmp_path):
    from dist_ckpt.api import load_from

    frozen, changing = torch.randn(512, 512), torch.randn(512, 512)
    dist_ckpt.save({"frozen": frozen, "changing": changing}, str(tmp_path / "a"), incremental=True)
    dist_ckpt.save({"frozen": frozen, "changing": changing + 1}, str(tmp_path / "b"), base=str(tmp_path / "a"))
    backend = CountingReads(open_backend(str(tmp_path)))
    out = {"frozen": torch.zeros(512, 512), "changing": torch.zeros(512, 512)}
    load_from(backend, "b", out)
    assert torch.equal(out["frozen"], frozen) and torch.equal(out["changing"], changing + 1)
    from_a = backend.read_bytes["a/rank_00000.safetensors"]
    a_size = (tmp_path / "a" / "rank_00000.safetensors").stat().st_size
    # the frozen entry (1 MiB) and the header, not a's "changing" entry (another 1 MiB)
    assert frozen.numel() * 4 <= from_a <= frozen.numel() * 4 + 80 * 1024 < a_size, (from_a, a_size)
