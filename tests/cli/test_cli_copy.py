"""`dist-ckpt copy` between local run roots: a damaged source is never committed at the destination."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from cli_support import Run, assert_one_line_error, cli_in


def test_copy_refuses_a_damaged_source_and_leaves_no_partial_step(run_copy: Run, tmp_path: Path):
    shard = run_copy.ckpt(7) / "rank_00000.safetensors"
    (hlen,) = struct.unpack("<Q", shard.read_bytes()[:8])
    data = bytearray(shard.read_bytes())
    data[8 + hlen + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    dst = tmp_path / "dst"

    failed = cli_in("copy", run_copy.root, dst)
    line = assert_one_line_error(failed, 5)
    assert f"{shard}: checksum mismatch while copying" in line
    assert sorted(p.name for p in dst.iterdir()) == [
        "manifest.json",
        "step_000000002",
        "step_000000005",
    ]  # no tmp, no LOCK
    assert json.loads((dst / "manifest.json").read_text())["pointers"] == {"best:acc": 2, "best:loss": 5, "last": 5}

    ok = cli_in("copy", run_copy.ckpt(8), dst / "step_000000008")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((dst / "manifest.json").read_text())["pointers"] == {"best:acc": 2, "best:loss": 5, "last": 8}
    renamed = cli_in("copy", run_copy.ckpt(8), dst / "step_000000009")
    assert "a checkpoint keeps its step" in assert_one_line_error(renamed, 2)
