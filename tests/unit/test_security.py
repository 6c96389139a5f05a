"""Opening a checkpoint from a stranger is safe: nothing is unpickled, nothing outside the
checkpoint is read, and every damaged or hostile file fails as CorruptCheckpoint naming it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from support.ckpt_edit import restamp_index

import dist_ckpt
from dist_ckpt import CorruptCheckpoint
from dist_ckpt.format.safetensors_header import MAX_HEADER_BYTES
from storage_backends.local import LocalBackend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

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


def test_the_payload_is_live(tmp_path):
    """Control: unpickling the payload really does create the sentinel."""
    control = tmp_path / "control"
    pickle.loads(evil_pickle(control))
    assert control.exists()


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


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
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


# --- pickles are never unpickled -------------------------------------------------------------


def test_sanity_the_fixture_loads(ckpt):
    out = load(ckpt)
    assert out["meta"] == {"note": NOTE, "step": 3}
    assert torch.equal(out["w"], state()["w"])


def test_pickle_in_a_value_entry_is_refused_by_the_checksum(ckpt, tmp_path):
    sentinel = tmp_path / "pwned"
    begin, end = entry_span(ckpt, "meta.note")
    payload = evil_pickle(sentinel)
    assert len(payload) < end - begin
    raw = bytearray((ckpt / SHARD).read_bytes())
    raw[begin:end] = payload.ljust(end - begin, b" ")  # pickle ignores trailing bytes
    (ckpt / SHARD).write_bytes(bytes(raw))
    expect_corrupt(ckpt, SHARD, "meta.note", "checksum mismatch")
    assert not sentinel.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_in_a_value_entry_with_matching_checksum_is_never_unpickled(ckpt, tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    begin, end = entry_span(ckpt, "meta.note")
    raw = bytearray((ckpt / SHARD).read_bytes())
    raw[begin:end] = evil_pickle(sentinel, protocol).ljust(end - begin, b" ")
    (ckpt / SHARD).write_bytes(bytes(raw))
    doc = read_meta(ckpt)
    doc["values"]["meta.note"]["checksum"] = xxhash.xxh3_64_hexdigest(bytes(raw[begin:end]))
    write_meta(ckpt, doc)
    expect_corrupt(ckpt, "meta.note")
    assert not sentinel.exists()


def test_value_entry_replaced_by_a_pickle_in_a_consistent_shard(ckpt, tmp_path):
    """The whole shard rebuilt around a pickle entry of another size: header offsets, file size
    and checksums all agree — it must still be refused, and never unpickled."""
    sentinel = tmp_path / "pwned"
    header, data = split_shard(ckpt / SHARD)
    payload = evil_pickle(sentinel, pickle.HIGHEST_PROTOCOL)
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
    )
    new_data, offset = b"", 0
    for name, spec in entries:
        b, e = spec["data_offsets"]
        chunk = payload if name == "meta.note" else data[b:e]
        spec["data_offsets"] = [offset, offset + len(chunk)]
        if name == "meta.note":
            spec["shape"] = [len(chunk)]
        new_data += chunk
        offset += len(chunk)
    write_shard(ckpt, header, new_data)
    expect_corrupt(ckpt, "meta.note", "not valid dist_ckpt JSON")
    assert not sentinel.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_metadata_json_replaced_by_a_pickle(ckpt, tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    (ckpt / "metadata.json").write_bytes(evil_pickle(sentinel, protocol))
    expect_corrupt(ckpt, "metadata.json", "never a pickle")
    assert not sentinel.exists()


def test_dcp_pickled_metadata_file_is_ignored(ckpt, tmp_path):
    """DCP's own `.metadata` (a pickle) planted in the folder is never read."""
    sentinel = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(evil_pickle(sentinel))
    (ckpt / "__0_0.distcp").write_bytes(evil_pickle(sentinel))
    assert load(ckpt)["meta"]["step"] == 3
    assert not sentinel.exists()


def test_load_never_calls_an_unpickler(ckpt, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling attempted during load")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    out = load(ckpt)
    assert out["meta"]["note"] == NOTE


# --- nothing outside the checkpoint is read --------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../x.safetensors", "../step_000000003/" + SHARD, "/ABS", "sub/" + SHARD, "..", ""]
)
def test_file_table_path_traversal(ckpt, tmp_path, monkeypatch, name):
    if name == "/ABS":
        name = str(tmp_path / "outside.safetensors")
    # A valid copy of the shard where the hostile name points, so a read would "succeed".
    outside = (ckpt / name) if not name.startswith("/") else Path(name)
    if name not in ("..", "") and not outside.exists():
        outside.parent.mkdir(parents=True, exist_ok=True)
        outside.write_bytes((ckpt / SHARD).read_bytes())
    doc = read_meta(ckpt)
    doc["files"] = {name: doc["files"][SHARD]}
    for t in doc["tensors"].values():
        for c in t.get("chunks", ()):  # format 2 lists no files per chunk (the rank's file is used)
            c["file"] = name
    for v in doc["values"].values():
        v["file"] = name
    write_meta(ckpt, doc)

    touched: list[str] = []
    real_path_of = LocalBackend.path_of

    def spy(self, key):
        path = real_path_of(self, key)
        touched.append(os.path.realpath(path))
        return path

    monkeypatch.setattr(LocalBackend, "path_of", spy)
    expect_corrupt(ckpt, "metadata.json")
    root = os.path.realpath(ckpt)
    assert touched and all(p == root or p.startswith(root + os.sep) for p in touched), touched


def test_chunk_naming_a_file_outside_the_table(tmp_path):
    """Format 1 (the committed fixture): a chunk record names its file."""
    ckpt = tmp_path / "step_000000003"
    shutil.copytree(FORMAT1_FIXTURE, ckpt)
    doc = read_meta(ckpt)
    doc["tensors"]["model.w"]["chunks"][0]["file"] = "../../etc/passwd"
    write_meta(ckpt, doc)
    with pytest.raises(CorruptCheckpoint, match="not in the file table"):
        dist_ckpt.load({"model": {"w": torch.zeros(7, 5)}}, str(ckpt))


@pytest.mark.parametrize(
    ("layout", "what"),
    [
        ({"on": 5}, "outside world size"),
        ({"split": [0, 0, 2, 8]}, "does not fit"),
        ({"split": [3, 0, 1, 8]}, "does not fit"),
        ({"chunks": [[[0, 0], [16, 8], 9]]}, "outside world size"),
        ({"on": 0, "split": [0, 0, 1, 16]}, "exactly one of"),
    ],
)
def test_layout_naming_a_rank_outside_the_world(ckpt, layout, what):
    """Format 2: a layout names ranks, whose files the file table gives; a rank that wrote no
    file (or a rule that does not fit the tensor) is refused, naming metadata.json."""
    doc = read_meta(ckpt)
    w = doc["tensors"]["w"]
    doc["tensors"]["w"] = {"dtype": w["dtype"], "size": w["size"], **layout}
    write_meta(ckpt, doc)
    expect_corrupt(ckpt, "metadata.json", what)


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
