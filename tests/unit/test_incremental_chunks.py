"""zstd incremental saves reuse the unchanged chunks of a changed entry: one row of a 3-chunk
embedding changes per save and about one chunk is stored per save; retention never loses a
referenced chunk; a damaged referenced chunk fails by that file's name."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from incremental_common import CountingReads, assert_bit_identical, stored_bytes
from manager_common import manager, steps_on_disk

import dist_ckpt
from dist_ckpt import known_commits
from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.export import export_checkpoint
from dist_ckpt.format.shard import ShardReader
from dist_ckpt.run_store import RunStore
from dist_ckpt.verify import verify, verify_run
from storage_backends import open_backend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

ROWS, WIDTH = 3072, 1024  # float32: 12 MiB, three 4 MiB zstd chunks of 1024 rows
CHUNK_ROWS = 1024


def _embedding(seed: int = 0) -> torch.nn.Embedding:
    torch.manual_seed(seed)
    return torch.nn.Embedding(ROWS, WIDTH)


def _committed(root, step: int) -> dict:
    return json.loads((root / f"step_{step:09d}" / "COMMITTED").read_text())


def _verify_clean(root, *, notes: bool = False) -> None:
    report = verify_run(open_backend(str(root)))
    problems = [p.message for c in report.checkpoints for p in c.problems] + [p.message for p in report.problems]
    assert report.ok, problems
    # a folder kept for its referenced file once the last checkpoint referring to it is gone is
    # a leftover for `gc` (as for whole-entry references); retained referenced files are not
    assert notes or not report.notes, report.notes


@pytest.mark.parametrize("remembered", [True, False], ids=["same-process", "read-back"])
def test_one_changed_row_stores_about_one_chunk_per_save_keep_last_two(tmp_path, remembered):
    """``read-back``: every save reads its base's metadata.json and rank index (and the sweep
    every kept step's), as a new process would; ``same-process``: what this process wrote."""
    emb, snaps = _embedding(), {}
    with manager(tmp_path, keep_last=2, incremental=True, compression="zstd") as mgr:
        state = mgr.track(model=emb)
        for step in range(1, 8):
            if not remembered:
                known_commits.forget_all()
            if step > 1:
                with torch.no_grad():  # one row, in chunk (step % 3): every chunk changes in turn
                    emb.weight[(step % 3) * CHUNK_ROWS + step] += 1.0
            assert mgr.save(step, state)
            snaps[step] = {k: v.clone() for k, v in emb.state_dict().items()}
            _verify_clean(tmp_path, notes=True)  # every kept step after each save: no referenced chunk lost
            if step == 1:
                first = _committed(tmp_path, 1)["bytes"]
                continue
            own = _committed(tmp_path, step)["bytes"]
            # about one chunk (a third of the tensor), not the whole tensor again
            assert own < 0.45 * first, (step, own, first)
            assert _committed(tmp_path, step)["logical_bytes"] > 0.9 * first
    assert steps_on_disk(tmp_path) == [6, 7]
    RunStore(open_backend(str(tmp_path))).collect_garbage()
    _verify_clean(tmp_path)  # gc removed only what no kept step reads
    # what the run occupies: step 1's file (kept whole: its small entries are still read) and
    # about a chunk per later step still read, not two more whole tensors (3x)
    assert stored_bytes(tmp_path) < 2.5 * first, (stored_bytes(tmp_path), first)
    for step in (6, 7):  # the newest and the older kept step
        fresh = _embedding(99)
        with manager(tmp_path, read_only=True) as mgr:
            mgr.restore(mgr.track(model=fresh), which=step)
        assert_bit_identical(snaps[step], fresh.state_dict())
    out = tmp_path / "export"
    export_checkpoint(CheckpointView(open_backend(str(tmp_path)), "step_000000007"), open_backend(str(out)))
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(out / "model.safetensors"))["weight"], snaps[7]["weight"])


def _two_saves(tmp_path) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    a = torch.randn(ROWS, WIDTH)
    dist_ckpt.save({"emb": a}, str(tmp_path / "a"), incremental=True, compression="zstd")
    b = a.clone()
    b[2 * CHUNK_ROWS + 5] += 1.0  # only the last chunk changes
    dist_ckpt.save({"emb": b}, str(tmp_path / "b"), base=str(tmp_path / "a"), compression="zstd")
    return a, b


def test_reused_chunks_are_listed_and_read_by_range(tmp_path):
    a, b = _two_saves(tmp_path)
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert "a/rank_00000.safetensors" in meta["files"]  # listed with size and checksum
    backend = open_backend(str(tmp_path))
    info = ShardReader(backend, "b/rank_00000.safetensors", None).entry("emb")
    assert [r[0] if r else None for r in info.refs] == ["a/rank_00000.safetensors"] * 2 + [None]
    # the wire format older readers refuse by name: a format-2 rank index with per-chunk rows
    index = ShardReader(backend, "b/index_00000.safetensors", None)
    doc = json.loads(bytes(index.read("index")))
    assert doc["format"] == "dist_ckpt.rank_index/2" and len(doc["entries"]["emb"][4]) == 3
    # a partial read of the first rows reads only that chunk of a's file
    part = {"emb": torch.zeros(ROWS, WIDTH)}
    dist_ckpt.load(part, str(tmp_path / "b"))
    assert torch.equal(part["emb"], b)
    whole_a = {"emb": torch.zeros(ROWS, WIDTH)}
    dist_ckpt.load(whole_a, str(tmp_path / "a"))
    assert torch.equal(whole_a["emb"], a)
    # resharding on load: a box straddling a reused and an own chunk
    reader = ShardReader(backend, "b/rank_00000.safetensors", None)
    row = WIDTH * 4
    got = reader.read("emb", (2 * CHUNK_ROWS - 3) * row, (2 * CHUNK_ROWS + 7) * row)
    want = b[2 * CHUNK_ROWS - 3 : 2 * CHUNK_ROWS + 7].contiguous().view(torch.uint8).numpy().tobytes()
    assert bytes(got) == want


def test_a_damaged_referenced_chunk_fails_naming_its_file(tmp_path):
    _two_saves(tmp_path)
    backend = open_backend(str(tmp_path))
    info = ShardReader(backend, "b/rank_00000.safetensors", None).entry("emb")
    file, offset = info.refs[0]
    base = ShardReader(backend, file, None).header.header_len
    path = tmp_path / file
    data = bytearray(path.read_bytes())
    data[base + offset + info.chunks[0][1] // 2] ^= 0xFF  # inside chunk 0, which b reads from a's file
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="a/rank_00000.safetensors"):
        dist_ckpt.load({"emb": torch.zeros(ROWS, WIDTH)}, str(tmp_path / "b"))
    report = verify(str(tmp_path / "b"))  # b's file table lists a's file: its checksum catches it
    assert not report.ok and "a/rank_00000.safetensors" in " ".join(p.message for p in report.problems)


@pytest.mark.parametrize(
    "where, mode",
    [
        ("local", "thread"),
        pytest.param("local", "process", marks=pytest.mark.slow),
        pytest.param("s3", "thread", marks=pytest.mark.slow),
    ],
)
def test_async_saves_reuse_chunks_local_and_s3(tmp_path, where, mode, request):
    """Async saves (thread, writer process) hash chunks in the background writer; on the real SeaweedFS S3
    server too (shard names carry the attempt id there). Restores of the kept steps are
    bit-identical and retention keeps every file a kept step's chunks are in."""
    root = request.getfixturevalue("s3_uri") if where == "s3" else str(tmp_path)
    options = {"backend_options": {}} if where == "s3" else {}  # no fsync option on S3
    emb, snaps = _embedding(), {}
    async_options = {"async_save": True, "async_mode": mode}
    with manager(root, keep_last=2, incremental=True, compression="zstd", **async_options, **options) as mgr:
        state = mgr.track(model=emb)
        for step in range(1, 6):
            with torch.no_grad():
                emb.weight[((step + 1) % 3) * CHUNK_ROWS + step] -= 0.5
            mgr.save(step, state)
            snaps[step] = {k: v.clone() for k, v in emb.state_dict().items()}
        mgr.wait()
        infos = mgr.checkpoints()
    assert [i.step for i in infos] == [4, 5]
    for info in infos:
        assert info.size < 0.45 * info.logical_size, info  # about one chunk of three stored
    report = verify_run(open_backend(root))
    assert report.ok, [p.message for c in report.checkpoints for p in c.problems]
    for step in (4, 5):
        fresh = _embedding(99)
        with manager(root, read_only=True, **options) as mgr:
            mgr.restore(mgr.track(model=fresh), which=step)
        assert_bit_identical(snaps[step], fresh.state_dict())


def test_restore_reads_just_the_reused_chunks_of_the_earlier_file(tmp_path):
    from dist_ckpt.api import load_from

    a, b = _two_saves(tmp_path)
    info = ShardReader(open_backend(str(tmp_path)), "b/rank_00000.safetensors", None).entry("emb")
    backend = CountingReads(open_backend(str(tmp_path)))
    out = {"emb": torch.zeros(ROWS, WIDTH)}
    load_from(backend, "b", out)
    assert torch.equal(out["emb"], b)
    # chunks 0 and 1 (one ranged read) and the 8-byte header length of a's file: not chunk 2
    assert backend.read_bytes["a/rank_00000.safetensors"] == info.chunks[0][1] + info.chunks[1][1] + 8


@pytest.mark.parametrize("bad", ["c/rank_00000.safetensors", "../rank_00000.safetensors", "/a/rank_00000.safetensor"])
def test_a_chunk_file_not_listed_or_outside_the_run_root_is_refused(tmp_path, bad):
    from dist_ckpt.cli.copy_chunks import _renamed_header
    from dist_ckpt.format.safetensors_header import header_length

    _two_saves(tmp_path)
    path = tmp_path / "b" / "rank_00000.safetensors"
    data = path.read_bytes()
    hlen = header_length(data[:8], str(path), len(data))
    renamed = _renamed_header(data[:hlen], {"a/rank_00000.safetensors": bad}, str(path))
    assert renamed is not None
    body = renamed[8:] + b" " * (hlen - len(renamed))  # padded like the original: same file size
    header = struct.pack("<Q", len(body)) + body
    path.write_bytes(header + data[hlen:])
    with pytest.raises(CorruptCheckpoint, match="rank_00000.safetensors"):
        dist_ckpt.load({"emb": torch.zeros(ROWS, WIDTH)}, str(tmp_path / "b"))
