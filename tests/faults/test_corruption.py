"""Damaged files: a flipped byte in a shard (compressed and uncompressed) is a CorruptCheckpoint
naming the file and entry; a truncated or zero-byte shard or metadata.json is an error naming
the file raised before any tensor of the live model is touched. The earlier checkpoint still
loads bit-identical, and `verify` names the damaged file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_bit_identical, assert_named_error, build, flatten, restore_into_fresh
from safetensors.torch import load_file

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointError, CorruptCheckpoint
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

pytestmark = QUIET
SHARD = "rank_00000.safetensors"


def _two_steps(tmp_path: Path, compression: str = "none") -> tuple[str, Path]:
    root, refs = str(tmp_path / "run"), tmp_path / "refs"
    job = LocalJob(root, refs, compression=compression)
    job.save(1)
    job.save(2)
    job.close()
    return root, refs


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def _restore_live(root: str, which="last"):
    """Restore into a live model with known weights; return (error, whether the model was touched)."""
    model, opt = build(seed=99)
    before = flatten(model, opt)
    error = None
    with CheckpointManager(root, read_only=True) as mgr:
        try:
            mgr.restore(mgr.track(model=model, optimizer=opt), which)
        except CheckpointError as e:
            error = e
    after = flatten(model, opt)
    touched = [k for k in before if not before[k].equal(after[k])]
    return error, touched


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_flipped_byte_in_a_shard(tmp_path: Path, compression: str) -> None:
    root, refs = _two_steps(tmp_path, compression)
    shard = Path(root) / "step_000000002" / SHARD
    hlen, header = _header(shard)
    extra = json.loads(header.pop("__metadata__")["dist_ckpt"])["entries"]
    # the largest tensor entry (for zstd: a compressed one, so the flip lands in zstd frames)
    name, spec = max(
        (
            (n, s)
            for n, s in header.items()
            if extra.get(n, {}).get("kind", "tensor") == "tensor"
            and (compression == "none" or extra.get(n, {}).get("codec") == "zstd")
        ),
        key=lambda ns: ns[1]["data_offsets"][1] - ns[1]["data_offsets"][0],
    )
    begin, end = spec["data_offsets"]
    data = bytearray(shard.read_bytes())
    data[hlen + (begin + end) // 2] ^= 0x10
    shard.write_bytes(bytes(data))

    error, _ = _restore_live(root)
    assert isinstance(error, CorruptCheckpoint), error
    assert_named_error(error, f"step_000000002/{SHARD}", name)
    assert "checksum" in str(error)
    # the earlier checkpoint is untouched and loads bit-identical
    info, state = restore_into_fresh(root, None, 1)
    assert info.step == 1
    assert_bit_identical(state, load_file(str(refs / "step_1.safetensors")), "step 1")
    report = verify_run(open_backend(root))
    bad = [(c.step, p.file, p.kind) for c in report.checkpoints for p in c.problems]
    assert bad == [(2, SHARD, "data-checksum")]


def _truncate_shard(step_dir: Path) -> str:
    p = step_dir / SHARD
    p.write_bytes(p.read_bytes()[:-100])
    return SHARD


def _zero_shard(step_dir: Path) -> str:
    (step_dir / SHARD).write_bytes(b"")
    return SHARD


def _truncate_metadata(step_dir: Path) -> str:
    p = step_dir / "metadata.json"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return "metadata.json"


def _zero_metadata(step_dir: Path) -> str:
    (step_dir / "metadata.json").write_bytes(b"")
    return "metadata.json"


def _truncate_shard_and_fix_metadata(step_dir: Path) -> str:
    """Truncated shard whose size metadata.json agrees with: the header check catches it."""
    p = step_dir / SHARD
    p.write_bytes(p.read_bytes()[:-100])
    meta = json.loads((step_dir / "metadata.json").read_text())
    meta["files"][SHARD]["size"] = p.stat().st_size
    (step_dir / "metadata.json").write_text(json.dumps(meta))
    return SHARD


@pytest.mark.parametrize(
    "damage",
    [_truncate_shard, _zero_shard, _truncate_metadata, _zero_metadata, _truncate_shard_and_fix_metadata],
    ids=[
        "shard-truncated",
        "shard-zero-byte",
        "metadata-truncated",
        "metadata-zero-byte",
        "shard-truncated-consistent-metadata",
    ],
)
def test_truncated_or_empty_file_fails_before_any_tensor_is_copied(tmp_path: Path, damage) -> None:
    root, refs = _two_steps(tmp_path)
    name = damage(Path(root) / "step_000000002")
    error, touched = _restore_live(root)
    assert isinstance(error, CorruptCheckpoint), error
    assert_named_error(error, f"step_000000002/{name}")
    assert touched == [], f"the failed restore modified the live model: {touched}"
    info, state = restore_into_fresh(root, None, 1)
    assert_bit_identical(state, load_file(str(refs / "step_1.safetensors")), "step 1")
    report = verify_run(open_backend(root))
    assert [p.file for c in report.checkpoints for p in c.problems] == [name]
