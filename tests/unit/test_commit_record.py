"""CommitRecord: the COMMITTED marker as a typed record — round trip, markers written by the
code before the record existed parse to the same bytes and values, damaged markers are refused
naming the file. And the layout's step folder names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_ckpt import save
from dist_ckpt.commit_record import CommitRecord
from dist_ckpt.errors import ConfigError, CorruptCheckpoint
from dist_ckpt.layout import COMMITTED, committed_key, parse_step_prefix, step_prefix
from dist_ckpt.run_store import RunStore, entry_from_committed
from storage_backends import open_backend

FIXTURE = Path(__file__).parent.parent / "fixtures" / "format1_checkpoint" / "step_000000003" / COMMITTED

# Markers as the DCP writer wrote them before CommitRecord existed (captured from that code):
# a manager's incremental save, a bare dist_ckpt.save() with a base, an import and a Lightning save.
OLD_MARKERS = [
    b'{"step": 20, "epoch": 1, "metrics": {"loss": 0.25}, "time": 1795726026.6793022, "codec": "none", '
    b'"world_size": 1, "files": 3, "bytes": 19302, "logical_bytes": 38906, "base": "step_000000010"}',
    b'{"world_size": 1, "files": 2, "bytes": 8389, "logical_bytes": 8389, "base": "step_000000001"}',
    b'{"step": 5, "epoch": null, "metrics": {}, "time": 17.5, "codec": "zstd", "imported_from": '
    b'{"format": "hf", "source": "/m"}, "world_size": 1, "files": 2, "bytes": 10, "logical_bytes": 10}',
    b'{"step": 7, "epoch": 0, "metrics": {"val": NaN}, "time": 1.0, "codec": "none", "lightning": '
    b'{"name": "epoch=0", "retires": []}, "world_size": 1, "files": 2, "bytes": 10, "logical_bytes": 10}',
]


@pytest.mark.parametrize("data", [FIXTURE.read_bytes(), *OLD_MARKERS])
def test_markers_of_the_old_writer_parse_and_write_back_byte_for_byte(data):
    record = CommitRecord.from_json(data, "x/COMMITTED")
    assert record.to_json() == data
    assert CommitRecord.from_json(record.to_json(), "x").to_json() == data


def test_round_trip_is_equal():
    record = CommitRecord.from_json(OLD_MARKERS[0], "x")
    assert CommitRecord.from_json(record.to_json(), "y") == record


def test_fields_of_a_manager_marker():
    r = CommitRecord.from_json(OLD_MARKERS[0], "x")
    assert (r.step, r.epoch, dict(r.metrics), r.codec) == (20, 1, {"loss": 0.25}, "none")
    assert (r.world_size, r.files, r.bytes, r.logical_bytes, r.base) == (1, 3, 19302, 38906, "step_000000010")
    assert r.document["step"] == 20


def test_format1_fixture_defaults_and_entry():
    r = CommitRecord.from_json(FIXTURE.read_bytes(), "x")
    assert (r.step, r.epoch, dict(r.metrics), r.time, r.codec, r.base) == (None, None, {}, 0.0, "none", None)
    entry = r.entry(3)
    assert (entry.step, entry.size, entry.world_size, entry.logical_size) == (3, 4348, 1, 0)
    assert entry_from_committed(3, FIXTURE.read_bytes(), "x") == entry


def test_extra_keys_are_kept_verbatim():
    r = CommitRecord.from_json(OLD_MARKERS[3], "x")
    assert r.document["lightning"] == {"name": "epoch=0", "retires": []}
    assert str(r.metrics["val"]) == "nan"


def test_new_keeps_the_writers_key_order():
    info = {"step": 4, "epoch": None, "metrics": {"a": 1.5}, "time": 2.0, "codec": "none", "custom": [1]}
    r = CommitRecord.new(info, world_size=2, files=4, bytes=100, logical_bytes=150, base="step_000000002")
    # exactly what the DCP writer wrote before the record existed
    old = {**info, "world_size": 2, "files": 4, "bytes": 100, "logical_bytes": 150, "base": "step_000000002"}
    assert r.to_json() == json.dumps(old).encode()
    assert list(CommitRecord.new({}, world_size=1, files=2, bytes=3, logical_bytes=3).document) == [
        "world_size",
        "files",
        "bytes",
        "logical_bytes",
    ]


def test_self_contained_drops_base_and_sets_bytes_in_place():
    r = CommitRecord.from_json(OLD_MARKERS[0], "x").self_contained(500)
    doc = json.loads(OLD_MARKERS[0])
    doc.pop("base")
    doc["bytes"] = doc["logical_bytes"] = 500
    assert r.to_json() == json.dumps(doc).encode()
    assert (r.base, r.bytes, r.logical_bytes) == (None, 500, 500)


@pytest.mark.parametrize(
    "data, what",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"metrics": [1, 2]}', "'metrics'"),
        (b'{"metrics": {"loss": "low"}}', "'metrics'"),
        (b'{"bytes": "many"}', "'bytes'"),
        (b'{"epoch": {"a": 1}}', "'epoch'"),
        (b'{"world_size": [2]}', "'world_size'"),
    ],
)
def test_a_damaged_marker_is_refused_naming_the_file(data, what):
    with pytest.raises(CorruptCheckpoint, match="/run/step_000000001/COMMITTED") as info:
        CommitRecord.from_json(data, "/run/step_000000001/COMMITTED")
    assert what in str(info.value)


def test_a_damaged_marker_on_disk_is_named_by_the_run_store(tmp_path):
    save({"w": torch.ones(3)}, str(tmp_path / "step_000000001"))
    (tmp_path / "step_000000001" / COMMITTED).write_bytes(b'{"bytes": "many"}')
    with pytest.raises(CorruptCheckpoint, match=r"step_000000001/COMMITTED.*'bytes'"):
        RunStore(open_backend(str(tmp_path))).committed_entries()


def test_what_the_writer_commits_is_a_valid_record(tmp_path):
    save({"w": torch.ones(3)}, str(tmp_path / "step_000000001"))
    data = (tmp_path / "step_000000001" / COMMITTED).read_bytes()
    r = CommitRecord.from_json(data, "x")
    assert (r.world_size, r.files, r.base) == (1, 2, None)
    assert (
        r.bytes
        == r.logical_bytes
        == sum(p.stat().st_size for p in (tmp_path / "step_000000001").iterdir() if p.name.endswith(".safetensors"))
    )


def test_step_folder_names():
    assert step_prefix(1000) == "step_000001000"
    assert step_prefix(10**10) == "step_10000000000"
    assert parse_step_prefix("step_000001000") == 1000
    assert parse_step_prefix(step_prefix(10**10)) == 10**10
    assert committed_key(3) == "step_000000003/COMMITTED"
    for bad in ("step_1", "step_000000001.tmp-abc", "x_000000001", "step_00000000a"):
        assert parse_step_prefix(bad) is None
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(ConfigError, match="non-negative int"):
            step_prefix(bad)
