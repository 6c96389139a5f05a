"""Shared pieces of the security tests: a live pickle payload, the checkpoint under attack (the
``ckpt`` fixture), and editors of its shard and metadata.json."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from support.ckpt_edit import restamp_index

import dist_ckpt
from dist_ckpt import CorruptCheckpoint

SHARD = "rank_00000.safetensors"
FORMAT1_FIXTURE = Path(__file__).parent.parent / "fixtures" / "format1_checkpoint" / "step_000000003"
NOTE = "n" * 400  # a JSON value long enough to hold a pickle in its bytes


class _Evil:
    """Unpickling this creates ``path`` (stands in for arbitrary code execution)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(path: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(_Evil(path), protocol=protocol)


# --- helpers ---------------------------------------------------------------------------------


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(16, 8, generator=g),
        "b": torch.randn(8, generator=g).bfloat16(),
        "meta": {"note": NOTE, "step": 3},
    }


def target() -> dict:
    return {"w": torch.zeros(16, 8), "b": torch.zeros(8, dtype=torch.bfloat16), "meta": {"note": None, "step": None}}


def make_ckpt(tmp_path: Path) -> Path:
    """The checkpoint under attack (each test module's ``ckpt`` fixture)."""
    uri = tmp_path / "run" / "step_000000003"
    dist_ckpt.save(state(), str(uri))
    return uri


def load(uri: Path) -> dict:
    t = target()
    dist_ckpt.load(t, str(uri))
    return t


def read_meta(uri: Path) -> dict:
    return json.loads((uri / "metadata.json").read_text())


def write_meta(uri: Path, doc: dict) -> None:
    (uri / "metadata.json").write_text(json.dumps(doc))


def split_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_shard(uri: Path, header: dict, data: bytes, *, raw_header: bytes | None = None) -> None:
    """Write a shard from ``header`` + ``data`` and make metadata.json agree with it (size,
    per-entry checksums): the file is *consistent*, only its content is hostile."""
    body = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    blob = struct.pack("<Q", len(body)) + body + data
    (uri / SHARD).write_bytes(blob)
    doc = read_meta(uri)
    doc["files"][SHARD]["size"] = len(blob)
    hlen = 8 + len(body)
    if raw_header is None:
        sums, stored = {}, {}
        for name, spec in header.items():
            if isinstance(spec, dict) and isinstance(spec.get("data_offsets"), list):
                b, e = spec["data_offsets"]
                sums[name], stored[name] = xxhash.xxh3_64_hexdigest(blob[hlen + b : hlen + e]), e - b
        for refs in doc["values"].values():
            if refs["entry"] in sums:
                refs["checksum"] = sums[refs["entry"]]
        write_meta(uri, doc)
        restamp_index(uri, SHARD, sums, stored)  # format 2: tensor checksums live in the rank index
        return
    write_meta(uri, doc)


def entry_span(uri: Path, entry: str) -> tuple[int, int]:
    """Absolute [begin, end) of an entry's bytes in the shard."""
    raw = (uri / SHARD).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    b, e = json.loads(raw[8 : 8 + n])[entry]["data_offsets"]
    return 8 + n + b, 8 + n + e


def expect_corrupt(uri: Path, *patterns: str) -> CorruptCheckpoint:
    t = target()
    with pytest.raises(CorruptCheckpoint) as info:
        dist_ckpt.load(t, str(uri))
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    return info.value
