"""`dist-ckpt export`: plain, zstd-compressed (split, with an index) and 2-rank FSDP2 checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_support import Run, as_json, cli_bg, cli_in
from safetensors import safe_open
from safetensors.torch import load_file

from dist_ckpt.format.shard import ShardReader
from storage_backends import open_backend


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for k, v in expected.items():
        assert found[k].dtype == v.dtype and found[k].shape == v.shape, k
        assert torch.equal(found[k], v), k


def test_export_plain_zstd_split_and_fsdp(run_dir: Run, zstd_run: Run, fsdp_ckpt: tuple[Path, Path], tmp_path: Path):
    fsdp_dir, fsdp_ref = fsdp_ckpt
    plain_out, split_out, fsdp_out = tmp_path / "plain", tmp_path / "split", tmp_path / "fsdp"
    pending = cli_bg("export", fsdp_dir, fsdp_out, "--dtype", "bf16", "--quiet")
    plain = cli_in("export", run_dir.ckpt(8), plain_out, "--json")
    split = cli_in("export", zstd_run.ckpt(2), split_out, "--max-shard-size", "20KB")
    fsdp = pending.result()
    # plain checkpoint, one file, names as in model.state_dict()
    assert plain.returncode == 0, plain.stderr
    assert as_json(plain)["files"] == ["model.safetensors"]
    assert sorted(p.name for p in plain_out.iterdir()) == ["model.safetensors"]
    _assert_equal(_read_all(plain_out / "model.safetensors"), run_dir.models[8])

    # zstd checkpoint (entries really stored compressed), split in two with an index
    meta = json.loads((zstd_run.ckpt(2) / "metadata.json").read_text())
    assert meta["codec"] == "zstd"
    shard = ShardReader(open_backend(str(zstd_run.ckpt(2))), "rank_00000.safetensors", None)
    assert shard.entry("model.0.weight").codec == "zstd"
    assert split.returncode == 0, split.stderr
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in split_out.iterdir()) == sorted(files + ["model.safetensors.index.json"])
    index = json.loads((split_out / "model.safetensors.index.json").read_text())
    expected = zstd_run.models[2]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    assert index["weight_map"] == {"0.weight": files[0], "0.bias": files[1], "2.weight": files[1], "2.bias": files[1]}
    found: dict[str, torch.Tensor] = {}
    for f in files:
        part = _read_all(split_out / f)
        assert sorted(part) == sorted(k for k, v in index["weight_map"].items() if v == f)
        found.update(part)
    _assert_equal(found, expected)

    # 2-rank FSDP2 checkpoint (zstd, uneven shards), consolidated and cast to bf16
    fmeta = json.loads((fsdp_dir / "metadata.json").read_text())
    assert fmeta["world_size"] == 2 and sorted(fmeta["files"]) == [
        "index_00000.safetensors",
        "index_00001.safetensors",
        "rank_00000.safetensors",
        "rank_00001.safetensors",
    ]
    assert any(
        t.get("split", [0, 0, 0])[2] == 2 for t in fmeta["tensors"].values()
    )  # really sharded (2 chunks by rule)
    assert fsdp.returncode == 0, fsdp.stderr
    assert fsdp.stderr == ""  # --quiet: no bar, no notes
    reference = {k: v.to(torch.bfloat16) for k, v in load_file(str(fsdp_ref)).items()}
    _assert_equal(_read_all(fsdp_out / "model.safetensors"), reference)
