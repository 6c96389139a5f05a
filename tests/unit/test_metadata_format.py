"""metadata.json format 2 (issue 20): layout rules, per-rank indexes, size limits from declared
counts — and format 1 (a fixture written by the code before it) still read by every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_support import as_json, cli_in

import dist_ckpt
from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format import chunk_layout, metadata_json
from dist_ckpt.verify import verify_checkpoint
from storage_backends.local import LocalBackend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "format1_checkpoint" / "step_000000003"


def fixture_state() -> dict:
    """What tests/fixtures/make_format1_fixture.py saved (same seed, same calls)."""
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(7, 5), "b": torch.arange(7, dtype=torch.int64), "h": torch.randn(3, 4).bfloat16()},
        "step": 3,
        "note": "written by dist_ckpt format 1",
    }


@pytest.fixture
def old(tmp_path: Path) -> Path:
    ckpt = tmp_path / "run" / "step_000000003"
    shutil.copytree(FIXTURE, ckpt)
    return ckpt


# --- layout rules ----------------------------------------------------------------------------


def _shard(size: tuple[int, ...], world: int, dim: int = 0) -> tuple[list, list, list]:
    chunks = torch.arange(size[dim]).chunk(world)
    offsets, sizes, start = [], [], 0
    for r in range(world):
        rows = len(chunks[r]) if r < len(chunks) else 0
        offsets.append(tuple(min(start, size[dim]) if d == dim else 0 for d in range(len(size))))
        sizes.append(tuple(rows if d == dim else s for d, s in enumerate(size)))
        start += rows
    return offsets, sizes, list(range(world))


@pytest.mark.parametrize(
    ("size", "world", "dim", "expected"),
    [
        ((16, 8), 4, 0, {"split": [0, 0, 4, 4]}),
        ((7, 20), 4, 0, {"split": [0, 0, 4, 2]}),
        ((20, 12), 4, 1, {"split": [1, 0, 4, 3]}),
        ((10,), 16, 0, None),
        ((5, 3), 1, 0, {"on": 0}),
    ],
)
def test_regular_shardings_are_one_rule(size, world, dim, expected):
    """Even and near-even Shard(d) splits (torch.chunk sizes) are one rule whatever the world
    size; the rule gives back exactly the chunks it replaced."""
    offsets, sizes, ranks = _shard(size, world, dim)
    if size == (10,):  # torch.chunk makes 10 chunks of 1; ranks 10..15 hold empty chunks at offset 10
        offsets, sizes = [(min(r, 10),) for r in range(16)], [(1,) if r < 10 else (0,) for r in range(16)]
        expected = {"split": [0, 0, 16, 1]}
    doc = chunk_layout.layout_json(size, offsets, sizes, ranks)
    assert doc == expected
    layout = chunk_layout.parse_layout(doc, size, world, "t")
    assert [(c.offsets, c.sizes, c.rank) for c in layout] == list(zip(offsets, sizes, ranks))


def test_irregular_chunks_are_listed_only_where_they_occur():
    size = (10, 4)
    offsets, sizes, ranks = [(0, 0), (3, 0), (4, 0)], [(3, 4), (1, 4), (6, 4)], [0, 1, 2]
    doc = chunk_layout.layout_json(size, offsets, sizes, ranks)
    assert doc == {"chunks": [[[0, 0], [3, 4], 0], [[3, 0], [1, 4], 1], [[4, 0], [6, 4], 2]]}
    # a regular split starting at rank 2 (a contiguous range, not all ranks) is still a rule
    assert chunk_layout.layout_json((8,), [(0,), (4,)], [(4,), (4,)], [2, 3]) == {"split": [0, 2, 2, 4]}
    # ranks out of order are put in order first
    assert chunk_layout.layout_json((8,), [(4,), (0,)], [(4,), (4,)], [1, 0]) == {"split": [0, 0, 2, 4]}


def test_metadata_json_does_not_grow_with_ranks_for_regular_shardings(tmp_path):
    """The same regular state described at 4 and at 64 ranks: metadata.json grows only by the
    file table (two records per rank), not by a record per chunk."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    from dist_ckpt.format import metadata_v2
    from dist_ckpt.format.metadata_json import FileRecord

    def doc(world: int) -> bytes:
        sd, ranks = {}, {}
        for i in range(50):
            offsets, sizes, _ = _shard((1000, 64), world)
            chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in zip(offsets, sizes)]
            sd[f"layer{i}.w"] = TensorStorageMetadata(
                TensorProperties(dtype=torch.float32), torch.Size((1000, 64)), chunks
            )
            ranks.update({(f"layer{i}.w", torch.Size(o)): r for r, o in enumerate(offsets)})
        files = {f"rank_{r:05d}.safetensors": FileRecord(r, 1, "x", f"index_{r:05d}.safetensors") for r in range(world)}
        files.update({f"index_{r:05d}.safetensors": FileRecord(r, 1, "x") for r in range(world)})
        return metadata_v2.dumps(Metadata(sd, {}), ranks, {}, files, world, "none", {})

    small, big = doc(4), doc(64)
    per_rank = (len(big) - len(small)) / 60
    assert per_rank < 300, per_rank  # the file table only: ~2 records of ~120 bytes per rank
    parsed = metadata_json.loads(big, "metadata.json")
    # 1000 rows in chunks of 16: 63 chunks hold rows, rank 63's is empty (left out: no bytes)
    chunks = parsed.tensors["layer3.w"].chunks
    assert len(chunks) == 63 and chunks[62].ref.file == "rank_00062.safetensors" and chunks[62].sizes == (8, 64)


# --- size limits from the declared counts ----------------------------------------------------


def test_limit_follows_declared_counts_and_refuses_a_bigger_file_unread(tmp_path):
    ckpt = tmp_path / "step_000000001"
    dist_ckpt.save({"w": torch.randn(4, 4), "v": 1}, str(ckpt))
    raw = (ckpt / "metadata.json").read_bytes()
    limit = metadata_json.size_limit(raw[:4096])
    assert len(raw) < limit < 4 << 20  # a 1-tensor checkpoint may not be hundreds of MiB
    # padded past the limit its counts allow: refused from the size alone, before reading it
    (ckpt / "metadata.json").write_bytes(raw + b" " * (limit - len(raw) + 1))
    with pytest.raises(CorruptCheckpoint, match=r"metadata.json: \d+ bytes exceeds the \d+-byte metadata size limit"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(ckpt))
    # the same counts scaled up: a checkpoint with many tensors and ranks gets a bigger limit
    big = raw.replace(b'"tensors":1,', b'"tensors":100000,', 1).replace(b'"files":2,', b'"files":8192,', 1)
    assert metadata_json.size_limit(big[:4096]) > 256 << 20  # format 1's fixed limit, exceeded by real ones


def test_rank_index_bigger_than_its_limit_is_refused(tmp_path):
    ckpt = tmp_path / "step_000000001"
    dist_ckpt.save({"w": torch.randn(4, 4)}, str(ckpt))
    doc = json.loads((ckpt / "metadata.json").read_text())
    doc["files"]["index_00000.safetensors"]["size"] = 1 << 40
    (ckpt / "metadata.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpoint, match="index_00000.safetensors: metadata.json records 1099511627776 bytes"):
        dist_ckpt.load({"w": torch.zeros(4, 4)}, str(ckpt))


def test_damaged_rank_index_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "step_000000001"
    dist_ckpt.save({"w": torch.randn(4, 4)}, str(ckpt))
    raw = bytearray((ckpt / "index_00000.safetensors").read_bytes())
    raw[-5] ^= 0x01
    (ckpt / "index_00000.safetensors").write_bytes(bytes(raw))
    target = {"w": torch.zeros(4, 4)}
    with pytest.raises(CorruptCheckpoint, match="index_00000.safetensors: data checksum mismatch"):
        dist_ckpt.load(target, str(ckpt))
    assert not target["w"].any()  # nothing loaded
    report = verify_checkpoint(LocalBackend(str(tmp_path)), "step_000000001")
    assert [(p.file, p.kind) for p in report.problems] == [("index_00000.safetensors", "data-checksum")]


# --- format 1 stays readable -----------------------------------------------------------------


def test_format1_fixture_is_format1():
    doc = json.loads((FIXTURE / "metadata.json").read_text())
    assert doc["format"] == "dist_ckpt.checkpoint/1" and "chunks" in doc["tensors"]["model.w"]


def test_format1_checkpoint_restores_bit_identical(old):
    expected = fixture_state()
    target = {"model": {k: torch.zeros_like(v) for k, v in expected["model"].items()}, "step": None, "note": None}
    dist_ckpt.load(target, str(old))
    for k, v in expected["model"].items():
        assert torch.equal(target["model"][k].view(torch.uint8), v.view(torch.uint8)), k
    assert target["step"] == 3 and target["note"] == expected["note"]


def test_format1_verify_inspect_export_copy(old, tmp_path):
    """Each CLI command that reads a checkpoint (verify, inspect, export, copy) on format 1."""
    expected = fixture_state()["model"]
    assert verify_checkpoint(LocalBackend(str(old.parent)), old.name).ok
    verified = cli_in("verify", old)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    view = CheckpointView(LocalBackend(str(old.parent)), old.name)
    assert view.meta.format_version == 1 and torch.equal(view.tensor("model.w"), expected["w"])
    inspected = as_json(cli_in("inspect", old, "--json"))
    assert {k["key"] for k in inspected["keys"]} >= {"model.w", "model.b", "model.h", "step"}
    out = tmp_path / "exported"
    assert cli_in("export", old, out).returncode == 0
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["w"] if "w" in exported else exported["model.w"], expected["w"])
    copied = cli_in("copy", old, tmp_path / "dst", "--json")
    assert copied.returncode == 0, copied.stderr
    dst = tmp_path / "dst" / old.name
    assert json.loads((dst / "metadata.json").read_text())["format"] == "dist_ckpt.checkpoint/1"  # copied as is
    assert verify_checkpoint(LocalBackend(str(dst.parent)), dst.name).ok
    target = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}, "step": None, "note": None}
    dist_ckpt.load(target, str(dst))
    assert torch.equal(target["model"]["h"].view(torch.uint8), expected["h"].view(torch.uint8))


def test_format2_verify_inspect_export_copy(tmp_path):
    """The same commands on format 2, and diff across the two formats."""
    state = fixture_state()
    ckpt = tmp_path / "run" / "step_000000003"
    dist_ckpt.save(state, str(ckpt))
    assert json.loads((ckpt / "metadata.json").read_text())["format"] == "dist_ckpt.checkpoint/2"
    assert verify_checkpoint(LocalBackend(str(ckpt.parent)), ckpt.name).ok
    verified = cli_in("verify", ckpt)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    old = tmp_path / "old" / FIXTURE.name
    shutil.copytree(FIXTURE, old)
    # the same state in format 1 and format 2: diff finds no difference, values included
    same = cli_in("diff", old, ckpt, "--values")
    assert same.returncode == 0, same.stdout + same.stderr
    view = CheckpointView(LocalBackend(str(ckpt.parent)), ckpt.name)
    assert torch.equal(view.tensor("model.w"), state["model"]["w"]) and view.refs("model.w")[0].checksum
    inspected = as_json(cli_in("inspect", ckpt, "--json"))
    w = next(k for k in inspected["keys"] if k["key"] == "model.w")
    assert w["stored_bytes"] == 7 * 5 * 4
    out = tmp_path / "exported"
    assert cli_in("export", ckpt, out).returncode == 0
    copied = cli_in("copy", ckpt, tmp_path / "dst", "--json")
    assert copied.returncode == 0, copied.stderr
    dst = tmp_path / "dst" / ckpt.name
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": None, "note": None}
    dist_ckpt.load(target, str(dst))
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["step"] == 3


def test_dcp_view_finds_chunks_and_overlaps_by_rule():
    """DCP's view over a rule: lookups by offsets (empty trailing chunks included) and the
    saved chunks overlapping a box are computed, and agree with a scan of every chunk."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    from dist_ckpt.format import dcp_view
    from dist_ckpt.format.chunk_layout import Layout, SplitRule
    from dist_ckpt.format.metadata_json import CheckpointMetadata, TensorRecord
    from dist_ckpt.format.metadata_v2 import _Chunks

    size, world = (10, 3), 16  # 10 rows over 16 ranks: chunk 1, ranks 10..15 empty at offset 10
    layout = Layout(size, SplitRule(size, 0, 0, world, 1))
    files = {r: f"rank_{r:05d}.safetensors" for r in range(world)}
    record = TensorRecord("float32", size, _Chunks("t", layout, files, "metadata.json"))
    meta = CheckpointMetadata({"t": record}, {}, {}, {}, world, "none", {}, format_version=2)
    view = dcp_view.build(meta)
    chunks = view.state_dict_metadata["t"].chunks
    assert len(chunks) == world and [tuple(c.offsets) for c in chunks][9:12] == [(9, 0), (10, 0), (10, 0)]
    assert view.storage_data[MetadataIndex("t", torch.Size((4, 0)))].file == "rank_00004.safetensors"
    assert view.storage_data[MetadataIndex("t", torch.Size((4, 0)))].entry == "t@4,0"
    with pytest.raises(KeyError):
        view.storage_data[MetadataIndex("t", torch.Size((4, 1)))]
    for lo, n in [(0, 10), (3, 4), (9, 1), (0, 0)]:
        local = ChunkStorageMetadata(torch.Size((lo, 0)), torch.Size((n, 3)))
        found = [tuple(c.offsets) for c in chunks.overlapping(local)]
        scanned = [
            tuple(c.offsets) for c in chunks if c.sizes[0] and c.offsets[0] < lo + n and lo < c.offsets[0] + c.sizes[0]
        ]
        assert found == scanned, (lo, n)
