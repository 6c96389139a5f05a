"""Opening a checkpoint from a stranger is safe: nothing is unpickled and nothing outside the
checkpoint is read. Damaged files: test_security_damaged.py."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import xxhash
from security_common import (
    FORMAT1_FIXTURE,
    NOTE,
    SHARD,
    entry_span,
    evil_pickle,
    expect_corrupt,
    load,
    make_ckpt,
    read_meta,
    split_shard,
    state,
    write_meta,
    write_shard,
)

import dist_ckpt
from dist_ckpt import CorruptCheckpoint
from storage_backends.local import LocalBackend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return make_ckpt(tmp_path)


def test_the_payload_is_live(tmp_path):
    """Control: unpickling the payload really does create the sentinel."""
    control = tmp_path / "control"
    pickle.loads(evil_pickle(control))
    assert control.exists()


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
