"""Every damaged or hostile shard or metadata.json fails as CorruptCheckpoint naming it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from security_common import (
    SHARD,
    entry_span,
    expect_corrupt,
    load,
    make_ckpt,
    read_meta,
    split_shard,
    target,
    write_meta,
    write_shard,
)

import dist_ckpt
from dist_ckpt import CorruptCheckpoint
from dist_ckpt.format.safetensors_header import MAX_HEADER_BYTES

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return make_ckpt(tmp_path)


# --- damaged shards --------------------------------------------------------------------------


def test_flipped_data_byte(ckpt):
    begin, end = entry_span(ckpt, "w")
    raw = bytearray((ckpt / SHARD).read_bytes())
    raw[(begin + end) // 2] ^= 0x01
    (ckpt / SHARD).write_bytes(bytes(raw))
    expect_corrupt(ckpt, SHARD, "'w'", "checksum mismatch")


def test_flipped_byte_in_a_bf16_entry(ckpt):
    begin, _ = entry_span(ckpt, "b")
    raw = bytearray((ckpt / SHARD).read_bytes())
    raw[begin] ^= 0x80
    (ckpt / SHARD).write_bytes(bytes(raw))
    expect_corrupt(ckpt, SHARD, "'b'", "checksum mismatch")


def test_flipped_header_byte(ckpt):
    raw = bytearray((ckpt / SHARD).read_bytes())
    assert raw[8:9] == b"{"
    raw[8] ^= 0x20  # "{" -> "["
    (ckpt / SHARD).write_bytes(bytes(raw))
    expect_corrupt(ckpt, SHARD)


@pytest.mark.parametrize("n", [2**64 - 1, 2**40, MAX_HEADER_BYTES + 1])
def test_oversized_header_length(ckpt, n):
    raw = bytearray((ckpt / SHARD).read_bytes())
    raw[:8] = struct.pack("<Q", n)
    (ckpt / SHARD).write_bytes(bytes(raw))
    expect_corrupt(ckpt, SHARD, "exceeds")


def test_header_length_past_eof(ckpt):
    raw = bytearray((ckpt / SHARD).read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    (ckpt / SHARD).write_bytes(bytes(raw))
    expect_corrupt(ckpt, SHARD, "runs past the end")


def test_offsets_past_eof(ckpt):
    header, data = split_shard(ckpt / SHARD)
    b, _ = header["w"]["data_offsets"]
    header["w"]["data_offsets"] = [b, len(data) + 4096]
    header["w"]["shape"] = [(len(data) + 4096 - b) // 4]
    write_shard(ckpt, header, data)
    expect_corrupt(ckpt, SHARD, "'w'", "outside")


def test_overlapping_entries(ckpt):
    header, data = split_shard(ckpt / SHARD)
    header["b"]["data_offsets"] = [0, 16]  # inside "w" (or whatever comes first)
    write_shard(ckpt, header, data)
    expect_corrupt(ckpt, SHARD, "overlap")


def test_byte_count_not_matching_dtype_and_shape(ckpt):
    header, data = split_shard(ckpt / SHARD)
    header["w"]["shape"] = [16, 9]
    write_shard(ckpt, header, data)
    expect_corrupt(ckpt, SHARD, "'w'", "do not match")


def test_entry_shape_not_matching_metadata(ckpt):
    """The shard says w is [8, 8] (consistent with its own offsets), metadata.json says [16, 8]:
    reading must not run into the bytes of the next entry."""
    header, data = split_shard(ckpt / SHARD)
    b, _ = header["w"]["data_offsets"]
    header["w"]["shape"] = [8, 8]
    header["w"]["data_offsets"] = [b, b + 8 * 8 * 4]
    write_shard(ckpt, header, data)
    expect_corrupt(ckpt, SHARD, "'w'")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.__setitem__("w", "not an object"),
        lambda h: h["w"].__setitem__("dtype", "F128"),
        lambda h: h["w"].__setitem__("data_offsets", [-1, 3]),
        lambda h: h["w"].__setitem__("shape", ["16", 8]),
        lambda h: h["__metadata__"].__setitem__("dist_ckpt", "{not json"),
        lambda h: h["__metadata__"].__setitem__("dist_ckpt", json.dumps({"entries": {"w": {"kind": "pickle"}}})),
        lambda h: h["__metadata__"].__setitem__("dist_ckpt", json.dumps({"entries": {"w": {"codec": "lz4"}}})),
    ],
    ids=[
        "entry-not-object",
        "bad-dtype",
        "negative-offset",
        "string-shape",
        "meta-not-json",
        "bad-kind",
        "codec-no-table",
    ],
)
def test_malformed_headers(ckpt, mutate):
    header, data = split_shard(ckpt / SHARD)
    header.setdefault("__metadata__", {"dist_ckpt": json.dumps({"format": 1, "entries": {}})})
    mutate(header)
    write_shard(ckpt, header, data)
    expect_corrupt(ckpt, SHARD)


def test_header_that_is_not_an_object(ckpt):
    _, data = split_shard(ckpt / SHARD)
    write_shard(ckpt, {}, data, raw_header=b"[1, 2, 3]")
    expect_corrupt(ckpt, SHARD, "not a JSON object")


def test_entry_missing_from_the_shard(ckpt):
    header, data = split_shard(ckpt / SHARD)
    header["renamed"] = header.pop("w")
    write_shard(ckpt, header, data)
    expect_corrupt(ckpt, SHARD, "'w'", "missing from the shard")


def test_truncated_shard(ckpt):
    raw = (ckpt / SHARD).read_bytes()
    (ckpt / SHARD).write_bytes(raw[:-10])
    t = target()
    with pytest.raises(
        CorruptCheckpoint, match=rf"{SHARD}: file is {len(raw) - 10} bytes but metadata.json records {len(raw)}"
    ):
        dist_ckpt.load(t, str(ckpt))
    assert torch.count_nonzero(t["w"]) == 0 and t["meta"]["note"] is None  # nothing was loaded


def test_truncated_shard_with_consistent_metadata(ckpt):
    """Truncated *and* metadata.json updated to the new size: the header check catches it."""
    raw = (ckpt / SHARD).read_bytes()
    (ckpt / SHARD).write_bytes(raw[:-10])
    doc = read_meta(ckpt)
    doc["files"][SHARD]["size"] = len(raw) - 10
    write_meta(ckpt, doc)
    expect_corrupt(ckpt, SHARD, "outside")


def test_zero_byte_shard(ckpt):
    (ckpt / SHARD).write_bytes(b"")
    expect_corrupt(ckpt, SHARD, "file is 0 bytes")
    doc = read_meta(ckpt)
    doc["files"][SHARD]["size"] = 0
    write_meta(ckpt, doc)
    expect_corrupt(ckpt, SHARD, "too short")


def test_missing_shard(ckpt):
    (ckpt / SHARD).unlink()
    with pytest.raises(dist_ckpt.CheckpointError, match=SHARD):
        load(ckpt)


# --- damaged metadata.json -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "what"),
    [
        (lambda d: d.__setitem__("format", "torch.dcp/1"), "expected format"),
        (lambda d: d["tensors"]["w"].__setitem__("dtype", "object"), "unknown dtype"),
        (lambda d: d["tensors"]["w"].__setitem__("size", [-16, 8]), "non-negative integers"),
        (lambda d: d["tensors"]["w"].__setitem__("on", "0"), "non-negative integers"),
        (lambda d: d["tensors"]["w"].pop("on"), "exactly one of"),
        (lambda d: d["counts"].__setitem__("tensors", 3), "declared counts"),
        (lambda d: d.pop("counts"), "must open with its declared counts"),
        (lambda d: d["files"][SHARD].__setitem__("size", "big"), "malformed"),
        (lambda d: d.pop("files"), "malformed"),
        (lambda d: d.__setitem__("values", []), "malformed"),
    ],
)
def test_malformed_metadata_json(ckpt, mutate, what):
    doc = read_meta(ckpt)
    mutate(doc)
    write_meta(ckpt, doc)
    expect_corrupt(ckpt, "metadata.json", what)


@pytest.mark.parametrize("data", [b"", b"\xff\xfe\x00", b"[]", b"null", b"[" * 100_000])
def test_metadata_json_not_an_object(ckpt, data):
    (ckpt / "metadata.json").write_bytes(data)
    expect_corrupt(ckpt, "metadata.json")


def test_entry_dtype_not_matching_metadata(ckpt):
    header, data = split_shard(ckpt / SHARD)
    header["w"]["dtype"] = "I32"  # same byte count, other type
    write_shard(ckpt, header, data)
    expect_corrupt(ckpt, SHARD, "'w'", "metadata.json says torch.float32")
