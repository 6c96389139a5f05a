"""The command line follows zstd chunk references (an entry whose unchanged chunks are read
from earlier checkpoints' files): inspect, diff, export, verify; copy is self-contained by
default (the chunks copied in, headers renamed) and keeps the dedup with --keep-references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_support import as_json, cli_in
from safetensors.torch import load_file

from dist_ckpt import CheckpointManager
from dist_ckpt.format.shard import ShardReader
from storage_backends import open_backend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

ROWS, WIDTH = 3072, 1024  # float32: three 4 MiB zstd chunks


def _run(root: Path) -> dict[int, torch.Tensor]:
    torch.manual_seed(0)
    emb, snaps = torch.nn.Embedding(ROWS, WIDTH), {}
    options = {"keep_last": 3, "incremental": True, "compression": "zstd", "backend_options": {"fsync": False}}
    with CheckpointManager(str(root), **options) as mgr:
        state = mgr.track(model=emb)
        for step in range(1, 5):
            with torch.no_grad():
                emb.weight[(step % 3) * 1024 + step] += 1.0  # one row of one chunk
            mgr.save(step, state)
            snaps[step] = emb.weight.detach().clone()
    return snaps


def _restore(root: Path, step: int) -> torch.Tensor:
    fresh = torch.nn.Embedding(ROWS, WIDTH)
    with CheckpointManager(str(root), read_only=True) as mgr:
        mgr.restore(mgr.track(model=fresh), which=step)
    return fresh.weight.detach()


def _chunk_files(root: Path, step: int) -> list[str | None]:
    reader = ShardReader(open_backend(str(root)), f"step_{step:09d}/rank_00000.safetensors", None)
    return [r[0] if r else None for r in reader.entry("model.weight").refs]


def test_cli_follows_chunk_references(tmp_path):
    root = tmp_path / "run"
    snaps = _run(root)
    assert [f for f in _chunk_files(root, 4) if f]  # step 4 reads chunks from earlier files
    assert cli_in("verify", root).returncode == 0

    inspected = as_json(cli_in("inspect", root / "step_000000004", "--json"))
    assert any("/" in f["name"] for f in inspected["files"])  # the files its chunks are in
    diff = cli_in("diff", root / "step_000000003", root / "step_000000004", "--values", "--json")
    assert diff.returncode in (0, 1), diff.stderr
    diffs = {t["key"]: t["max_abs_diff"] for t in as_json(diff)["tensors"]}
    assert diffs["model.weight"] == pytest.approx(1.0, abs=1e-5)  # one row changed by 1
    out = tmp_path / "export"
    assert cli_in("export", root / "step_000000004", out).returncode == 0
    assert torch.equal(load_file(str(out / "model.safetensors"))["weight"], snaps[4])

    alone = tmp_path / "alone"
    assert cli_in("copy", root / "step_000000004", alone).returncode == 0
    meta = json.loads((alone / "step_000000004" / "metadata.json").read_text())
    assert not [n for n in meta["files"] if "/" in n], meta["files"]
    assert [f for f in _chunk_files(alone, 4) if f] and all("/" not in f for f in _chunk_files(alone, 4) if f)
    kept = tmp_path / "kept"
    assert cli_in("copy", root / "step_000000004", kept, "--keep-references").returncode == 0
    assert cli_in("verify", kept).returncode == 0
    assert cli_in("gc", kept).returncode == 0  # the files its chunks are in are no leftovers
    assert cli_in("verify", kept).returncode == 0

    assert cli_in("prune", root, "--keep-last", "1").returncode == 0
    assert cli_in("gc", root).returncode == 0
    assert cli_in("verify", root).returncode == 0
    assert torch.equal(_restore(root, 4), snaps[4])
    shutil.rmtree(root)
    assert cli_in("verify", alone).returncode == 0
    assert torch.equal(_restore(alone, 4), snaps[4])
    assert torch.equal(_restore(kept, 4), snaps[4])
