"""Oversized headers and huge declared sizes are refused before anything is allocated for them.
Each case restores through the manager under ``tracemalloc`` and checks the peak of Python
allocations stays far below what the file declares (the model itself is ~90 KB); the error is
one of dist_ckpt.errors naming the file (and entry / key)."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_named_error, build, flatten

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointError, CorruptCheckpoint, IncompatibleCheckpoint

pytestmark = QUIET
SHARD = "rank_00000.safetensors"
PEAK_LIMIT = 16 * 1024 * 1024
GiB = 1 << 30


def _run(tmp_path: Path, compression: str = "none") -> Path:
    root = tmp_path / "run"
    job = LocalJob(str(root), tmp_path / "refs", compression=compression)
    job.save(1)
    job.close()
    return root / "step_000000001"


def _set_file_size(step: Path, name: str) -> None:
    """Make metadata.json's file table agree with the (tampered) file's size."""
    meta = json.loads((step / "metadata.json").read_text())
    meta["files"][name]["size"] = (step / name).stat().st_size
    (step / "metadata.json").write_text(json.dumps(meta))


def _restore_measured(root: Path) -> tuple[CheckpointError | None, int, list[str]]:
    model, opt = build(seed=8)
    before = flatten(model, opt)
    error = None
    with CheckpointManager(str(root), read_only=True) as mgr:
        state = mgr.track(model=model, optimizer=opt)
        tracemalloc.start()
        try:
            mgr.restore(state)
        except CheckpointError as e:
            error = e
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    after = flatten(model, opt)
    return error, peak, [k for k in before if not before[k].equal(after[k])]


def _header_len(path: Path, n: int, *, sparse_to: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", n))
        if sparse_to:
            f.truncate(sparse_to)  # a hole: costs no disk, reads as zeros


CASES = {
    # shard header length field
    "header-length-2^64-1": lambda step: _header_len(step / SHARD, 2**64 - 1),
    "header-length-past-eof": lambda step: _header_len(step / SHARD, 90 << 20),
    "header-length-over-limit-in-a-200MiB-file": lambda step: (
        _header_len(step / SHARD, 150 << 20, sparse_to=200 << 20),
        _set_file_size(step, SHARD),
    ),
    # metadata.json
    "metadata-json-300MiB": lambda step: os.truncate(step / "metadata.json", 300 << 20),
    "metadata-json-nested-1e6-deep": lambda step: (step / "metadata.json").write_bytes(b"[" * 1_000_000),
    "file-table-size-2^50": lambda step: _patch_meta(step, lambda m: m["files"][SHARD].update(size=2**50)),
    "tensor-size-2^40": lambda step: _patch_meta(step, _huge_tensor),
}


def _patch_meta(step: Path, fn) -> None:
    meta = json.loads((step / "metadata.json").read_text())
    fn(meta)
    (step / "metadata.json").write_text(json.dumps(meta))


def _huge_tensor(meta: dict) -> None:
    t = meta["tensors"]["model.2.weight"]
    t["size"] = [2**20, 2**20]  # format 2: the chunk follows from its layout rule
    if "chunks" in t:
        t["chunks"][0]["sizes"] = [2**20, 2**20]


NAMES = {
    "metadata-json-300MiB": "metadata.json",
    "metadata-json-nested-1e6-deep": "metadata.json",
    "tensor-size-2^40": "model.2.weight",
}


@pytest.mark.parametrize("case", list(CASES))
def test_huge_declared_size_is_refused_before_allocating(tmp_path: Path, case: str) -> None:
    step = _run(tmp_path)
    CASES[case](step)
    error, peak, touched = _restore_measured(step.parent)
    assert isinstance(error, (CorruptCheckpoint, IncompatibleCheckpoint)), error
    assert_named_error(error, NAMES.get(case, f"step_000000001/{SHARD}"))
    assert peak < PEAK_LIMIT, f"{peak / 2**20:.0f} MiB allocated before refusing"
    assert touched == []


def test_compressed_entry_declaring_a_huge_shape_and_chunks(tmp_path: Path) -> None:
    """A zstd entry whose header claims a 4 GiB tensor in 1 GiB chunks (consistent with its own
    chunk table and stored bytes) while metadata.json records a 64x64 chunk: refused before a
    1 GiB chunk buffer is allocated for the partial read such a box would need."""
    step = _run(tmp_path, "zstd")
    path = step / SHARD
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    extra = json.loads(header["__metadata__"]["dist_ckpt"])
    entry = extra["entries"]["model.2.weight"]
    assert entry["codec"] == "zstd"
    stored = sum(s for _, s in entry["chunks"])
    entry["shape"] = [2**22, 256]  # 4 GiB of float32
    entry["chunks"] = [[GiB, stored], [GiB, 0], [GiB, 0], [GiB, 0]]
    header["__metadata__"]["dist_ckpt"] = json.dumps(extra, separators=(",", ":"))
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    raw[8 : 8 + n] = body.ljust(n, b" ")
    path.write_bytes(bytes(raw))
    error, peak, touched = _restore_measured(step.parent)
    assert isinstance(error, CorruptCheckpoint), error
    assert_named_error(error, f"step_000000001/{SHARD}", "model.2.weight")
    assert peak < PEAK_LIMIT, f"{peak / 2**20:.0f} MiB allocated before refusing"
    assert touched == []
