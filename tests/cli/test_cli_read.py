"""`dist-ckpt list`, `inspect`, `diff`, `verify` and argument errors, as subprocesses on real runs."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest
import torch
from cli_support import CONFIG, Run, as_json, assert_one_line_error, cli_bg, cli_in, train_and_save
from torch import nn


def _row(stdout: str, step: int) -> str:
    rows = [line for line in stdout.splitlines() if re.match(rf"^\s*{step}\s", line)]
    assert len(rows) == 1, stdout
    return rows[0]


def test_list_table_and_json(run_dir: Run):
    pending = cli_bg("list", run_dir.root, "--json")
    table = cli_in("list", run_dir.root)
    js = pending.result()
    assert table.returncode == 0 and js.returncode == 0, (table.stderr, js.stderr)
    header = next(line for line in table.stdout.splitlines() if line.startswith("STEP"))
    assert header.split() == ["STEP", "EPOCH", "TIME", "SIZE", "WORLD", "CODEC", "METRICS", "POINTERS"]
    assert "best:acc" in _row(table.stdout, 2) and "acc=0.9" in _row(table.stdout, 2)
    assert "best:loss" in _row(table.stdout, 5) and "loss=2.5" in _row(table.stdout, 5)
    assert "last" in _row(table.stdout, 8) and "none" in _row(table.stdout, 8)
    assert not re.search(r"best|last", _row(table.stdout, 7))

    doc = as_json(js)
    assert [c["step"] for c in doc["checkpoints"]] == [2, 5, 7, 8]
    assert doc["pointers"] == {"last": 8, "best:loss": 5, "best:acc": 2}
    assert doc["tracker_run_id"] == "wandb-123"
    by_step = {c["step"]: c for c in doc["checkpoints"]}
    assert by_step[5]["metrics"] == {"loss": 2.5, "acc": 0.4} and by_step[5]["pointers"] == ["best:loss"]
    assert by_step[8]["epoch"] == 2 and by_step[8]["world_size"] == 1 and by_step[8]["codec"] == "none"
    on_disk = sum(f.stat().st_size for f in run_dir.ckpt(8).glob("*.safetensors"))  # shards and their rank indexes
    assert by_step[8]["size"] == on_disk and by_step[8]["uri"] == str(run_dir.ckpt(8))


def test_inspect_json_and_key_filter(run_dir: Run):
    pending = cli_bg("inspect", run_dir.ckpt(8), "--json")
    text = cli_in("inspect", run_dir.ckpt(8), "--keys", "model.*")
    js = pending.result()
    assert js.returncode == 0 and text.returncode == 0, (js.stderr, text.stderr)
    doc = as_json(js)
    assert (doc["step"], doc["epoch"], doc["world_size"], doc["codec"]) == (8, 2, 1, "none")
    assert doc["metrics"] == {"loss": 9.0, "acc": 0.7} and doc["best"] == {"loss": 2.5, "acc": 0.9}
    assert doc["tracker_run_id"] == "wandb-123" and doc["config"] == CONFIG
    assert doc["objects"] == {"model": "model", "optimizer": "optimizer", "counters": "values"}
    assert doc["versions"]["torch"] == torch.__version__ and "dist_ckpt" in doc["versions"]
    rank_file, index_file = run_dir.ckpt(8) / "rank_00000.safetensors", run_dir.ckpt(8) / "index_00000.safetensors"
    assert [(f["name"], f["rank"], f["size"]) for f in doc["files"]] == [
        (index_file.name, 0, index_file.stat().st_size),
        (rank_file.name, 0, rank_file.stat().st_size),
    ]
    keys = {k["key"]: k for k in doc["keys"]}
    w = keys["model.0.weight"]
    assert (w["kind"], w["dtype"], w["shape"], w["raw_bytes"], w["stored_bytes"]) == (
        "tensor",
        "float32",
        [16, 8],
        512,
        512,
    )
    assert keys["optimizer.state.0.weight.exp_avg"]["shape"] == [16, 8] and keys["_dist_ckpt"]["kind"] == "value"

    assert "model.0.weight" in text.stdout and "model.2.bias" in text.stdout
    assert "optimizer.state" not in text.stdout and re.search(r"keys \(4 of \d+\)", text.stdout)
    assert "wandb-123" in text.stdout and "lr: 0.01" in text.stdout and "model.hidden: 16" in text.stdout
    assert "rank_00000.safetensors" in text.stdout and "torch " + torch.__version__ in text.stdout


def test_diff_structure_config_and_values(run_dir: Run, tmp_path: Path):
    wider = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4), nn.Linear(4, 2))
    other = train_and_save(
        tmp_path / "other", steps=[1], model=wider, config={**CONFIG, "lr": 0.02, "model": {"hidden": 32}}
    )
    pending = cli_bg("diff", run_dir.ckpt(7), other.ckpt(1))
    values = cli_in("diff", run_dir.ckpt(7), run_dir.ckpt(8), "--values", "--json")
    same = cli_in("diff", run_dir.ckpt(8), run_dir.ckpt(8), "--values")
    structural = pending.result()
    assert structural.returncode == 1, structural.stderr
    out = structural.stdout
    assert "+ model.3.weight  float32 [2, 4]" in out
    assert "~ model.0.weight  float32 [16, 8] -> float32 [32, 8]" in out
    assert "lr: 0.01 -> 0.02" in out and "model.hidden: 16 -> 32" in out
    assert "checkpoints differ" in out

    assert values.returncode == 1, values.stderr
    doc = as_json(values)
    assert doc["added"] == doc["removed"] == doc["changed"] == [] and doc["config_changes"] == []
    found = {t["key"]: t["max_abs_diff"] for t in doc["tensors"]}
    m7, m8 = run_dir.models[7], run_dir.models[8]
    for key in m7:
        assert found[f"model.{key}"] == pytest.approx(float((m7[key] - m8[key]).abs().max()), rel=1e-6), key
    assert doc["differ"] is True

    assert same.returncode == 0, same.stdout + same.stderr
    assert "no differences" in same.stdout and "0 differ" in same.stdout


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_verify_passes_good_and_names_each_bad_file(run_dir: Run, run_copy: Run):
    bad = run_copy
    missing = bad.ckpt(2) / "rank_00000.safetensors"
    truncated = bad.ckpt(5) / "rank_00000.safetensors"
    data_flip = bad.ckpt(7) / "rank_00000.safetensors"
    head_flip = bad.ckpt(8) / "rank_00000.safetensors"
    missing.unlink()
    os.truncate(truncated, truncated.stat().st_size - 100)
    (hlen,) = struct.unpack("<Q", data_flip.read_bytes()[:8])
    _flip(data_flip, 8 + hlen + 100)  # in the data region
    _flip(head_flip, 20)  # inside the JSON header

    pending = cli_bg("verify", bad.root)
    good = cli_in("verify", run_dir.root)
    quick_data = cli_in("verify", bad.ckpt(7), "--quick")
    quick_head = cli_in("verify", bad.ckpt(8), "--quick", "--json")
    whole = pending.result()
    assert good.returncode == 0, good.stdout + good.stderr
    assert "4 of 4 checkpoints OK" in good.stdout and "FAILED" not in good.stdout

    assert whole.returncode == 1, whole.stdout + whole.stderr
    bad_lines = [line for line in whole.stderr.splitlines() if line.startswith("dist-ckpt: bad file:")]
    assert sorted(bad_lines) == sorted(
        [
            f"dist-ckpt: bad file: {missing} (missing)",
            f"dist-ckpt: bad file: {truncated} (size)",
            f"dist-ckpt: bad file: {data_flip} (data-checksum)",
            f"dist-ckpt: bad file: {head_flip} (header-checksum)",
        ]
    )
    assert "0 of 4 checkpoints OK" in whole.stdout and "Traceback" not in whole.stderr

    assert quick_data.returncode == 0, quick_data.stdout  # --quick reads sizes and headers only
    assert quick_head.returncode == 1
    doc = as_json(quick_head)
    assert doc["ok"] is False and doc["kind"] == "checkpoint"
    assert [(p["file"], p["kind"]) for p in doc["problems"]] == [("rank_00000.safetensors", "header-checksum")]


def test_verify_run_reports_stale_manifest(run_copy: Run):
    """Library level (no subprocess): the manifest is checked against the COMMITTED markers."""
    from dist_ckpt.verify import verify
    from storage_backends import open_backend

    assert verify(str(run_copy.root)).ok
    (run_copy.root / "manifest.json").unlink()
    report = verify(str(run_copy.root), quick=True)
    assert not report.ok and [p.kind for p in report.problems] == ["manifest"]
    assert all(c.ok for c in report.checkpoints)
    open_backend(str(run_copy.root)).write_bytes("step_000000009/metadata.json", b"{}")
    report = verify(str(run_copy.root), quick=True)
    assert any("step_000000009" in n and "gc" in n for n in report.notes)


def test_bad_arguments_one_line_error(run_dir: Run, tmp_path: Path):
    not_ckpt = tmp_path / "plain"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("hello")
    pending = cli_bg("verify", "ftp://host/run")
    missing = cli_in("list", tmp_path / "no-such-run")
    not_a_ckpt = cli_in("inspect", not_ckpt)
    run_not_ckpt = cli_in("export", run_dir.root, tmp_path / "out")
    usage = cli_in("prune", run_dir.root)
    bad_size = cli_in("export", run_dir.ckpt(8), tmp_path / "out", "--max-shard-size", "5 parsecs")
    scheme = pending.result()
    assert "no run or checkpoint here" in assert_one_line_error(missing, 3)
    assert "neither a run root" in assert_one_line_error(not_a_ckpt, 3)
    assert "unsupported storage URI scheme 'ftp'" in assert_one_line_error(scheme, 2)
    assert "is a run root, not one checkpoint" in assert_one_line_error(run_not_ckpt, 2)
    assert "--keep-last" in assert_one_line_error(usage, 2)
    assert "5 parsecs" in assert_one_line_error(bad_size, 2)
    assert not (tmp_path / "out").exists()


def test_help_documents_exit_codes_and_examples():
    from dist_ckpt.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "exit status:" in top and all(f"  {code}    " in top for code in range(7))
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {"list", "inspect", "verify", "export", "prune", "gc", "copy", "diff", "import"}
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "examples:" in text and f"dist-ckpt {name} " in text, name
