"""The command line on an incremental run: list, verify, inspect, diff, export, prune and gc
follow references; copy is self-contained by default and keeps the dedup with
--keep-references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_support import as_json, cli_in
from incremental_common import AdapterRun, assert_bit_identical
from safetensors.torch import load_file

from dist_ckpt import CheckpointManager

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _run(root: Path) -> dict[int, dict]:
    run, snaps = AdapterRun(0), {}
    with CheckpointManager(str(root), keep_last=3, incremental=True, backend_options={"fsync": False}) as mgr:
        state = mgr.track(**run.objects())
        for step in range(1, 5):
            run.train_step()
            mgr.save(step, state)
            snaps[step] = run.snapshot()
    return snaps


def _restore(root: Path, step: int) -> dict:
    fresh = AdapterRun(7)
    with CheckpointManager(str(root), read_only=True) as mgr:
        mgr.restore(mgr.track(**fresh.objects()), which=step)
    return fresh.snapshot()


def test_cli_follows_references(tmp_path):
    root = tmp_path / "run"
    snaps = _run(root)
    assert sorted(p.name for p in (root / "step_000000001").iterdir()) == ["rank_00000.safetensors"]  # kept: referenced

    listed = as_json(cli_in("list", root, "--json"))
    for c in listed["checkpoints"]:
        assert c["logical_size"] > 5 * c["size"], c  # the base is read from step 1's file
    text = cli_in("list", root).stdout
    assert "OWN" in text and "LOGICAL" in text

    assert cli_in("verify", root).returncode == 0
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    (bad / "step_000000001" / "rank_00000.safetensors").unlink()  # the shared base file
    broken = cli_in("verify", bad, "--json")
    assert broken.returncode != 0
    missing = [p for c in as_json(broken)["checkpoints"] for p in c["problems"] if p["kind"] == "missing"]
    assert len(missing) == 3, missing  # every kept checkpoint reports it

    inspected = as_json(cli_in("inspect", root / "step_000000004", "--json"))
    names = [f["name"] for f in inspected["files"]]
    assert "step_000000001/rank_00000.safetensors" in names

    diff = cli_in("diff", root / "step_000000003", root / "step_000000004", "--values", "--json")
    assert diff.returncode in (0, 1), diff.stderr
    diffs = {t["key"]: t["max_abs_diff"] for t in as_json(diff)["tensors"]}
    assert diffs["model.base.weight"] == 0.0 and diffs["model.up.weight"] > 0  # base read through the reference

    out = tmp_path / "export"
    assert cli_in("export", root / "step_000000004", out).returncode == 0
    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(exported["base.weight"], snaps[4]["model"]["base.weight"])

    # copy, self-contained (default): readable after the source run is gone
    alone = tmp_path / "alone"
    assert cli_in("copy", root / "step_000000004", alone).returncode == 0
    meta = json.loads((alone / "step_000000004" / "metadata.json").read_text())
    assert not [n for n in meta["files"] if "/" in n], meta["files"]
    # --keep-references: the referenced file is copied to the same relative path
    kept = tmp_path / "kept"
    assert cli_in("copy", root / "step_000000004", kept, "--keep-references").returncode == 0
    assert (kept / "step_000000001" / "rank_00000.safetensors").exists()
    assert cli_in("verify", kept).returncode == 0
    assert cli_in("gc", kept).returncode == 0  # the referenced file is no leftover
    assert (kept / "step_000000001" / "rank_00000.safetensors").exists()
    own_alone = as_json(cli_in("list", alone, "--json"))["checkpoints"][0]
    own_kept = as_json(cli_in("list", kept, "--json"))["checkpoints"][0]
    assert own_kept["size"] * 5 < own_alone["size"] == own_alone["logical_size"]

    # prune and gc on the source keep what the kept checkpoints read
    assert cli_in("prune", root, "--keep-last", "1").returncode == 0
    assert cli_in("gc", root).returncode == 0
    assert cli_in("verify", root).returncode == 0
    assert_bit_identical(snaps[4], _restore(root, 4))

    shutil.rmtree(root)
    assert cli_in("verify", alone).returncode == 0
    assert_bit_identical(snaps[4], _restore(alone, 4))
    assert_bit_identical(snaps[4], _restore(kept, 4))
