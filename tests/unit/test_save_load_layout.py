"""dist_ckpt.save in one process: the layout of a committed checkpoint (files, order, checksums)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from save_load_common import same_bits

import dist_ckpt

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# --- layout of a committed checkpoint --------------------------------------------------------


def test_layout_of_a_committed_checkpoint(tmp_path):
    run = tmp_path / "run"
    uri = run / "step_000000100"
    state = {"w": torch.randn(8, 8), "meta": {"step": 100}}
    dist_ckpt.save(state, str(uri))
    assert sorted(os.listdir(run)) == ["step_000000100"]  # no staging dir left
    shard, index = "rank_00000.safetensors", "index_00000.safetensors"  # the shard and its rank index
    assert sorted(os.listdir(uri)) == ["COMMITTED", index, "metadata.json", shard]
    committed = json.loads((uri / "COMMITTED").read_text())
    assert committed["world_size"] == 1 and committed["files"] == 2
    assert committed["bytes"] == (uri / shard).stat().st_size + (uri / index).stat().st_size
    meta = json.loads((uri / "metadata.json").read_text())
    assert meta["format"] == "dist_ckpt.checkpoint/2" and meta["world_size"] == 1
    assert meta["counts"] == {"ranks": 1, "files": 2, "tensors": 1, "values": 1, "listed_chunks": 0}
    assert meta["files"][shard]["index"] == index and meta["files"][index]["rank"] == 0
    assert meta["tensors"]["w"]["on"] == 0  # one whole chunk on rank 0: no per-chunk record
    assert meta["versions"]["torch"] == torch.__version__
    rec = meta["files"]["rank_00000.safetensors"]
    assert rec["size"] == (uri / "rank_00000.safetensors").stat().st_size and rec["rank"] == 0
    assert rec["checksum"].startswith("xxh3_128:")
    assert meta["tensors"]["w"]["dtype"] == "float32" and meta["tensors"]["w"]["size"] == [8, 8]
    assert "meta.step" in meta["values"]
    assert not (uri / ".metadata").exists()  # never DCP's pickled metadata
    # The data region starts on a page boundary (fast reads straight into aligned tensors).
    raw = (uri / "rank_00000.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 4096 == 0


def test_aligned_entries_come_first_in_the_file(tmp_path):
    uri = tmp_path / "step_1"
    state = {"odd": torch.zeros(3, dtype=torch.uint8), "v": "text", "big": torch.zeros(64, 16), "mid": torch.zeros(32)}
    dist_ckpt.save(state, str(uri))
    raw = (uri / "rank_00000.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    starts = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    assert starts["big"] % 64 == 0 and starts["mid"] % 64 == 0
    assert max(starts["big"], starts["mid"]) < min(starts["odd"], starts["v"])
    out = {"odd": torch.ones(3, dtype=torch.uint8), "v": None, "big": torch.ones(64, 16), "mid": torch.ones(32)}
    dist_ckpt.load(out, str(uri))
    assert out["v"] == "text" and not out["big"].any() and not out["odd"].any()


@pytest.mark.parametrize("big", [0, 10 << 20], ids=["small", "10MiB"])  # 10 MiB: hashed on a helper thread, in pieces
def test_file_checksums_are_those_of_the_bytes_written(tmp_path, big):
    import xxhash

    uri = tmp_path / "step_1"
    state = {"a": torch.randn(100), "b": torch.arange(7), "v": "x"}
    if big:
        state["c"] = torch.randint(0, 256, (big,), dtype=torch.uint8)
    dist_ckpt.save(state, str(uri))
    meta = json.loads((uri / "metadata.json").read_text())
    data = (uri / "rank_00000.safetensors").read_bytes()
    hlen = 8 + int.from_bytes(data[:8], "little")
    algo, head, body = meta["files"]["rank_00000.safetensors"]["checksum"].split(":")
    assert algo == "xxh3_128"
    assert head == xxhash.xxh3_128_hexdigest(data[:hlen])
    assert body == xxhash.xxh3_128_hexdigest(data[hlen:])
    # Per-entry checksums live in the rank's index file (format 2), not in metadata.json.
    with safe_open(str(uri / "index_00000.safetensors"), "pt") as f:
        index = json.loads(f.get_tensor("index").numpy().tobytes())["entries"]
    with safe_open(str(uri / "rank_00000.safetensors"), "pt") as f:
        for name in [k for k in state if k != "v"]:
            assert index[name][0] == xxhash.xxh3_64_hexdigest(f.get_tensor(name).numpy().tobytes())


def test_codec_none_shard_opens_with_safetensors(tmp_path):
    state = {
        "model": {"w": torch.randn(5, 3), "b16": torch.randn(4).bfloat16(), "h": torch.randn(2, 2).half()},
        "f8": torch.randn(6).to(torch.float8_e4m3fn),
        "ids": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "t": torch.randn(3, 4).t(),  # saved from a non-contiguous view
        "meta": {"step": 7, "name": "run"},
    }
    uri = tmp_path / "step_1"
    dist_ckpt.save(state, str(uri), compression="none")
    flat = {
        "model.w": state["model"]["w"],
        "model.b16": state["model"]["b16"],
        "model.h": state["model"]["h"],
        "f8": state["f8"],
        "ids": state["ids"],
        "mask": state["mask"],
        "scalar": state["scalar"],
        "t": state["t"],
    }
    with safe_open(str(uri / "rank_00000.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert set(flat) <= keys
        for k, v in flat.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype, k
            assert got.shape == v.shape, k
            assert same_bits(got, v), k
        # JSON values are stored as U8 entries holding their JSON text, flagged in __metadata__
        assert json.loads(bytes(f.get_tensor("meta.step").tolist())) == 7
        extra = json.loads(f.metadata()["dist_ckpt"])
        assert extra["entries"]["meta.step"] == {"kind": "json"}
        assert "model.w" not in extra["entries"]  # plain tensors need no extra info
