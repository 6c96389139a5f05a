"""dist_ckpt.save / dist_ckpt.load in one process: round trips, layout, commit, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import dist_ckpt
from dist_ckpt import CheckpointNotFound, IncompatibleCheckpoint, StepAlreadyExists, UnsupportedValue

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits of ``dtype`` (every byte pattern, NaNs included for floats)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN == NaN with the same payload; works for every dtype)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def zeros_like_state(state):
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like_state(v) for v in state]
    return None  # a value: replaced on load


def roundtrip(tmp_path: Path, state: dict, target: dict | None = None, **kw) -> dict:
    uri = str(tmp_path / "run" / "step_000000001")
    dist_ckpt.save(state, uri, **kw)
    target = zeros_like_state(state) if target is None else target
    dist_ckpt.load(target, uri)
    return target


# --- tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_roundtrips_bit_exact(tmp_path, dtype):
    state = {
        "t": sample(dtype, (17, 5)),
        "scalar": sample(dtype, (), seed=1),
        "empty": sample(dtype, (0, 4)),
        "empty1d": sample(dtype, (0,)),
        "big": sample(dtype, (3, 1000, 7), seed=2),
    }
    out = roundtrip(tmp_path, state)
    for k, v in state.items():
        assert same_bits(out[k], v), k
    assert out["scalar"].dim() == 0 and out["empty"].shape == (0, 4)


def test_all_dtypes_in_one_checkpoint(tmp_path):
    state = {str(d): sample(d, (4, 3), seed=i) for i, d in enumerate(ALL_DTYPES)}
    out = roundtrip(tmp_path, state)
    for k, v in state.items():
        assert same_bits(out[k], v), k


def test_non_contiguous_views_are_saved_as_their_values(tmp_path):
    base = torch.randn(6, 8)
    state = {
        "transposed": base.t(),
        "sliced": base[1:5, 2:7],
        "strided": base[::2, ::3],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "bf16_view": base.to(torch.bfloat16)[:, 1],
        "narrowed_1d": torch.arange(100)[10:90:7],
    }
    for v in state.values():
        assert not v.is_contiguous() or v is state["narrowed_1d"]
    out = roundtrip(tmp_path, state)
    for k, v in state.items():
        assert torch.equal(out[k], v), k


def test_load_writes_through_non_contiguous_targets(tmp_path):
    """Loading is in place: a target that is a view updates the tensor it views."""
    src = {"a": torch.randn(5, 4), "b": torch.randn(3, 6)}
    backing_a, backing_b = torch.zeros(4, 5), torch.zeros(3, 12)
    target = {"a": backing_a.t(), "b": backing_b[:, ::2]}
    out = roundtrip(tmp_path, src, target)
    assert out["a"] is target["a"]
    assert torch.equal(backing_a.t(), src["a"])
    assert torch.equal(backing_b[:, ::2], src["b"])
    assert torch.count_nonzero(backing_b[:, 1::2]) == 0  # the gaps are untouched


def test_load_is_in_place_for_contiguous_targets(tmp_path):
    src = {"w": torch.randn(64, 32)}
    target = {"w": torch.zeros(64, 32)}
    ptr = target["w"].data_ptr()
    roundtrip(tmp_path, src, target)
    assert target["w"].data_ptr() == ptr
    assert torch.equal(target["w"], src["w"])


def test_requires_grad_parameters(tmp_path):
    model = torch.nn.Linear(4, 3)
    out_model = torch.nn.Linear(4, 3)
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"model": model.state_dict()}, uri)
    target = {"model": out_model.state_dict()}
    dist_ckpt.load(target, uri)
    assert torch.equal(out_model.weight, model.weight) and torch.equal(out_model.bias, model.bias)


def test_nested_dicts_and_lists(tmp_path):
    state = {
        "model": {"enc": {"layer0": {"w": torch.randn(3, 3), "b": torch.randn(3)}}, "head": torch.randn(2)},
        "list": [torch.randn(2), {"x": torch.arange(4), "n": 7}, [torch.ones(1), "s"]],
        "counters": {"step": 1200, "epoch": 3, "best": {"val_loss": 0.25, "pck": 0.9}},
    }
    out = roundtrip(tmp_path, state)
    assert torch.equal(out["model"]["enc"]["layer0"]["w"], state["model"]["enc"]["layer0"]["w"])
    assert torch.equal(out["model"]["head"], state["model"]["head"])
    assert torch.equal(out["list"][0], state["list"][0])
    assert torch.equal(out["list"][1]["x"], state["list"][1]["x"]) and out["list"][1]["n"] == 7
    assert torch.equal(out["list"][2][0], state["list"][2][0]) and out["list"][2][1] == "s"
    assert out["counters"] == state["counters"]


def test_json_values_roundtrip(tmp_path):
    rng = np.random.RandomState(3)
    values = {
        "tuple": (0.9, 0.999),
        "nested_tuple": ((1, 2), [3, (4,)]),
        "inf": math.inf,
        "ninf": -math.inf,
        "nan": math.nan,
        "big": 2**64 + 1,
        "neg_big": -(2**80),
        "bytes": b"\x00\x01\xfe\xff",
        "int_keys": {1: "a", 2: {"deep": (1, 2)}, 10: [1.5], None: "none-key"},
        "ndarray": np.arange(12, dtype=np.float32).reshape(3, 4),
        "rng": rng.get_state(),
        "npfloat": np.float64(0.125),
        "none": None,
        "str": "héllo",
        "bool": True,
        "list_of_values": [1, "two", 3.0, None, [4]],
        "empty_list": [],
        "run_id": "wandb-3f9a",
    }
    target = {k: None for k in values}
    target["int_keys"] = {1: None, 2: {"deep": None}, 10: None, None: 0}  # dicts are flattened: same keys needed
    out = roundtrip(tmp_path, {"values": values}, {"values": target})["values"]
    assert set(out) == set(values)
    assert out["tuple"] == (0.9, 0.999) and type(out["tuple"]) is tuple
    assert out["nested_tuple"] == ((1, 2), [3, (4,)])
    assert out["inf"] == math.inf and out["ninf"] == -math.inf and math.isnan(out["nan"])
    assert out["big"] == 2**64 + 1 and out["neg_big"] == -(2**80)
    assert out["bytes"] == b"\x00\x01\xfe\xff"
    assert out["int_keys"] == {1: "a", 2: {"deep": (1, 2)}, 10: [1.5], None: "none-key"}
    assert not any(isinstance(k, str) for k in out["int_keys"])  # no "1" string keys added beside them
    np.testing.assert_array_equal(out["ndarray"], values["ndarray"])
    assert out["ndarray"].dtype == np.float32
    restored = np.random.RandomState()
    restored.set_state(out["rng"])
    assert np.array_equal(restored.rand(4), rng.rand(4))
    assert out["npfloat"] == 0.125 and type(out["npfloat"]) is np.float64
    assert out["none"] is None and out["str"] == "héllo" and out["bool"] is True
    assert out["list_of_values"] == [1, "two", 3.0, None, [4]]
    assert out["empty_list"] == [] and out["run_id"] == "wandb-3f9a"


def test_value_int_keyed_dict_beside_tensors(tmp_path):
    """Raw ``optimizer.state_dict()`` layout: int keys holding tensors and plain numbers."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    osd = opt.state_dict()
    osd["state"][0]["note"] = 5  # a plain number next to the tensors
    target_opt = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.5, momentum=0.1)
    torch.nn.Linear(3, 2)  # unrelated
    target = {
        "optim": {
            "state": {0: {"momentum_buffer": torch.zeros(2, 3), "note": None}, 1: {"momentum_buffer": torch.zeros(2)}},
            "param_groups": target_opt.state_dict()["param_groups"],
        }
    }
    out = roundtrip(tmp_path, {"optim": osd}, target)["optim"]
    assert sorted(out["state"]) == [0, 1]
    assert out["state"][0]["note"] == 5
    assert torch.equal(out["state"][0]["momentum_buffer"], osd["state"][0]["momentum_buffer"])
    assert out["param_groups"][0]["lr"] == 0.1 and out["param_groups"][0]["momentum"] == 0.9
    target_opt.load_state_dict(out)  # a valid optimizer state


def test_values_are_replaced_not_merged(tmp_path):
    state = {"cfg": {"layers": [1, 2, 3], "name": "a"}}
    target = {"cfg": {"layers": [9, 9, 9, 9, 9], "name": "zzz"}}
    out = roundtrip(tmp_path, state, target)
    assert out == {"cfg": {"layers": [1, 2, 3], "name": "a"}}


def test_unsupported_value_fails_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    state = {"w": torch.ones(2), "opt": {"param_groups": [{"lr": 0.1, "fn": lambda x: x}]}}
    with pytest.raises(UnsupportedValue, match=r"cannot store opt\.param_groups\[0\]\.fn: .*function"):
        dist_ckpt.save(state, str(run / "step_1"))
    assert not run.exists() or list(run.rglob("*")) == []


def test_key_collision_is_refused(tmp_path):
    with pytest.raises(UnsupportedValue, match=r"x\.1"):
        dist_ckpt.save({"x": {1: torch.ones(1), "1": torch.zeros(1)}}, str(tmp_path / "step_1"))


def test_dtype_conversion_on_load(tmp_path):
    """A target of another dtype receives the converted values (DCP semantics)."""
    src = {"w": torch.randn(4, 4, dtype=torch.float32)}
    target = {"w": torch.zeros(4, 4, dtype=torch.float64)}
    roundtrip(tmp_path, src, target)
    assert target["w"].dtype == torch.float64 and torch.equal(target["w"], src["w"].double())


def test_compression_none_string_and_none(tmp_path):
    for i, comp in enumerate(["none", None]):
        uri = str(tmp_path / f"step_{i}")
        dist_ckpt.save({"w": torch.arange(10.0)}, uri, compression=comp)
        assert json.loads(Path(uri, "metadata.json").read_text())["codec"] == "none"


# --- layout of a committed checkpoint --------------------------------------------------------


def test_layout_of_a_committed_checkpoint(tmp_path):
    run = tmp_path / "run"
    uri = run / "step_000000100"
    state = {"w": torch.randn(8, 8), "meta": {"step": 100}}
    dist_ckpt.save(state, str(uri))
    assert sorted(os.listdir(run)) == ["step_000000100"]  # no staging dir left
    shard, index = "rank_00000.safetensors", "index_00000.safetensors"  # the shard and its rank index
    assert sorted(os.listdir(uri)) == ["COMMITTED", index, "metadata.json", shard]
    committed = json.loads((uri / "COMMITTED").read_text())
    assert committed["world_size"] == 1 and committed["files"] == 2
    assert committed["bytes"] == (uri / shard).stat().st_size + (uri / index).stat().st_size
    meta = json.loads((uri / "metadata.json").read_text())
    assert meta["format"] == "dist_ckpt.checkpoint/2" and meta["world_size"] == 1
    assert meta["counts"] == {"ranks": 1, "files": 2, "tensors": 1, "values": 1, "listed_chunks": 0}
    assert meta["files"][shard]["index"] == index and meta["files"][index]["rank"] == 0
    assert meta["tensors"]["w"]["on"] == 0  # one whole chunk on rank 0: no per-chunk record
    assert meta["versions"]["torch"] == torch.__version__
    rec = meta["files"]["rank_00000.safetensors"]
    assert rec["size"] == (uri / "rank_00000.safetensors").stat().st_size and rec["rank"] == 0
    assert rec["checksum"].startswith("xxh3_128:")
    assert meta["tensors"]["w"]["dtype"] == "float32" and meta["tensors"]["w"]["size"] == [8, 8]
    assert "meta.step" in meta["values"]
    assert not (uri / ".metadata").exists()  # never DCP's pickled metadata
    # The data region starts on a page boundary (fast reads straight into aligned tensors).
    raw = (uri / "rank_00000.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 4096 == 0


def test_aligned_entries_come_first_in_the_file(tmp_path):
    uri = tmp_path / "step_1"
    state = {"odd": torch.zeros(3, dtype=torch.uint8), "v": "text", "big": torch.zeros(64, 16), "mid": torch.zeros(32)}
    dist_ckpt.save(state, str(uri))
    raw = (uri / "rank_00000.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    starts = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    assert starts["big"] % 64 == 0 and starts["mid"] % 64 == 0
    assert max(starts["big"], starts["mid"]) < min(starts["odd"], starts["v"])
    out = {"odd": torch.ones(3, dtype=torch.uint8), "v": None, "big": torch.ones(64, 16), "mid": torch.ones(32)}
    dist_ckpt.load(out, str(uri))
    assert out["v"] == "text" and not out["big"].any() and not out["odd"].any()


@pytest.mark.parametrize("big", [0, 10 << 20], ids=["small", "10MiB"])  # 10 MiB: hashed on a helper thread, in pieces
def test_file_checksums_are_those_of_the_bytes_written(tmp_path, big):
    import xxhash

    uri = tmp_path / "step_1"
    state = {"a": torch.randn(100), "b": torch.arange(7), "v": "x"}
    if big:
        state["c"] = torch.randint(0, 256, (big,), dtype=torch.uint8)
    dist_ckpt.save(state, str(uri))
    meta = json.loads((uri / "metadata.json").read_text())
    data = (uri / "rank_00000.safetensors").read_bytes()
    hlen = 8 + int.from_bytes(data[:8], "little")
    algo, head, body = meta["files"]["rank_00000.safetensors"]["checksum"].split(":")
    assert algo == "xxh3_128"
    assert head == xxhash.xxh3_128_hexdigest(data[:hlen])
    assert body == xxhash.xxh3_128_hexdigest(data[hlen:])
    # Per-entry checksums live in the rank's index file (format 2), not in metadata.json.
    with safe_open(str(uri / "index_00000.safetensors"), "pt") as f:
        index = json.loads(f.get_tensor("index").numpy().tobytes())["entries"]
    with safe_open(str(uri / "rank_00000.safetensors"), "pt") as f:
        for name in [k for k in state if k != "v"]:
            assert index[name][0] == xxhash.xxh3_64_hexdigest(f.get_tensor(name).numpy().tobytes())


def test_codec_none_shard_opens_with_safetensors(tmp_path):
    state = {
        "model": {"w": torch.randn(5, 3), "b16": torch.randn(4).bfloat16(), "h": torch.randn(2, 2).half()},
        "f8": torch.randn(6).to(torch.float8_e4m3fn),
        "ids": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "t": torch.randn(3, 4).t(),  # saved from a non-contiguous view
        "meta": {"step": 7, "name": "run"},
    }
    uri = tmp_path / "step_1"
    dist_ckpt.save(state, str(uri), compression="none")
    flat = {
        "model.w": state["model"]["w"],
        "model.b16": state["model"]["b16"],
        "model.h": state["model"]["h"],
        "f8": state["f8"],
        "ids": state["ids"],
        "mask": state["mask"],
        "scalar": state["scalar"],
        "t": state["t"],
    }
    with safe_open(str(uri / "rank_00000.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert set(flat) <= keys
        for k, v in flat.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype, k
            assert got.shape == v.shape, k
            assert same_bits(got, v), k
        # JSON values are stored as U8 entries holding their JSON text, flagged in __metadata__
        assert json.loads(bytes(f.get_tensor("meta.step").tolist())) == 7
        extra = json.loads(f.metadata()["dist_ckpt"])
        assert extra["entries"]["meta.step"] == {"kind": "json"}
        assert "model.w" not in extra["entries"]  # plain tensors need no extra info


# --- commit: only committed checkpoints are ever loaded --------------------------------------


def _committed(tmp_path: Path, name: str = "step_000000005") -> tuple[Path, dict]:
    uri = tmp_path / "run" / name
    state = {"w": torch.randn(4, 4), "v": 1}
    dist_ckpt.save(state, str(uri))
    return uri, state


def test_step_without_committed_is_never_loaded(tmp_path):
    uri, state = _committed(tmp_path)
    (uri / "COMMITTED").unlink()
    target = {"w": torch.zeros(4, 4), "v": None}
    with pytest.raises(CheckpointNotFound, match=r"step was not committed") as info:
        dist_ckpt.load(target, str(uri))
    assert str(uri) in str(info.value)
    assert torch.count_nonzero(target["w"]) == 0 and target["v"] is None


def test_staging_dir_is_never_loaded_even_with_committed(tmp_path):
    """A crash between writing COMMITTED and the rename leaves step_X.tmp-<id> holding a
    COMMITTED marker; it is still an unpublished attempt and must not load."""
    uri, _ = _committed(tmp_path)
    tmp_dir = uri.parent / f"{uri.name}.tmp-0123456789ab"
    shutil.copytree(uri, tmp_dir)
    assert (tmp_dir / "COMMITTED").exists()
    with pytest.raises(CheckpointNotFound, match=r"step was not committed"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(tmp_dir))
    (tmp_dir / "COMMITTED").unlink()
    with pytest.raises(CheckpointNotFound, match=r"step was not committed"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(tmp_dir))


def test_step_with_only_shards_is_not_committed(tmp_path):
    uri, _ = _committed(tmp_path)
    (uri / "COMMITTED").unlink()
    (uri / "metadata.json").unlink()
    with pytest.raises(CheckpointNotFound, match=r"step was not committed"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(uri))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFound, match=r"no checkpoint here"):
        dist_ckpt.load({"w": torch.zeros(1)}, str(tmp_path / "run" / "step_9"))


def test_committed_without_metadata_is_corrupt(tmp_path):
    uri, _ = _committed(tmp_path)
    (uri / "metadata.json").unlink()
    with pytest.raises(dist_ckpt.CorruptCheckpoint, match=r"metadata\.json is missing"):
        dist_ckpt.load({"w": torch.zeros(4, 4), "v": None}, str(uri))


def test_saving_a_step_twice_raises_and_keeps_the_first(tmp_path):
    uri, state = _committed(tmp_path)
    before = {p.name: p.read_bytes() for p in uri.iterdir()}
    with pytest.raises(StepAlreadyExists, match=r"already committed"):
        dist_ckpt.save({"w": torch.ones(4, 4), "v": 2}, str(uri))
    assert {p.name: p.read_bytes() for p in uri.iterdir()} == before
    assert sorted(os.listdir(uri.parent)) == [uri.name]  # no staging leftovers
    target = {"w": torch.zeros(4, 4), "v": None}
    dist_ckpt.load(target, str(uri))
    assert torch.equal(target["w"], state["w"]) and target["v"] == 1


def test_publish_race_loser_raises_step_already_exists(tmp_path, monkeypatch):
    """Two jobs save the same step; the second reaches publish after the first committed."""
    from storage_backends.local import LocalBackend

    uri = tmp_path / "run" / "step_1"
    real_publish = LocalBackend.publish

    def racing_publish(self, staging, final):
        # the other job commits first, between our COMMITTED and our rename
        monkeypatch.setattr(LocalBackend, "publish", real_publish)
        dist_ckpt.save({"w": torch.full((2,), 7.0)}, str(uri))
        return real_publish(self, staging, final)

    monkeypatch.setattr(LocalBackend, "publish", racing_publish)
    with pytest.raises(StepAlreadyExists, match=r"committed by another job"):
        dist_ckpt.save({"w": torch.full((2,), 1.0)}, str(uri))
    target = {"w": torch.zeros(2)}
    dist_ckpt.load(target, str(uri))
    assert torch.equal(target["w"], torch.full((2,), 7.0))
    assert sorted(os.listdir(uri.parent)) == ["step_1"]  # the loser's staging dir is removed


# --- incompatible state ----------------------------------------------------------------------


def test_wrong_keys_are_named(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"enc.w": torch.zeros(2, 2), "dec.w": torch.zeros(3)}, uri)
    with pytest.raises(IncompatibleCheckpoint) as info:
        dist_ckpt.load({"enc.w": torch.zeros(2, 2), "dec.w": torch.zeros(3), "head.w": torch.zeros(1), "extra": 1}, uri)
    msg = str(info.value)
    assert "keys missing from the checkpoint" in msg and "head.w" in msg and "extra" in msg
    assert "enc.w" not in msg


def test_partial_load_allows_missing_keys(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"a": torch.ones(2)}, uri)
    target = {"a": torch.zeros(2), "new": torch.zeros(3)}
    dist_ckpt.load(target, uri, allow_partial_load=True)
    assert torch.equal(target["a"], torch.ones(2)) and torch.equal(target["new"], torch.zeros(3))


def test_wrong_shapes_are_named(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"w": torch.zeros(3, 4), "b": torch.zeros(4), "v": 1}, uri)
    target = {"w": torch.ones(4, 3), "b": torch.ones(4), "v": None}
    with pytest.raises(IncompatibleCheckpoint) as info:
        dist_ckpt.load(target, uri)
    msg = str(info.value)
    assert "w: checkpoint shape [3, 4], state shape [4, 3]" in msg
    assert "b:" not in msg
    assert torch.equal(target["b"], torch.ones(4))  # nothing was loaded


def test_tensor_versus_value_mismatch_is_named(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"x": torch.zeros(2), "y": 5}, uri)
    with pytest.raises(IncompatibleCheckpoint) as info:
        dist_ckpt.load({"x": 3, "y": torch.zeros(1)}, uri)
    msg = str(info.value)
    assert "x: checkpoint has a tensor [2], state has a int" in msg
    assert "y: checkpoint has a non-tensor value, state has a tensor [1]" in msg


def test_many_missing_keys_are_summarised(tmp_path):
    uri = str(tmp_path / "step_1")
    dist_ckpt.save({"a": torch.zeros(1)}, uri)
    target = {"a": torch.zeros(1), **{f"k{i:02d}": torch.zeros(1) for i in range(30)}}
    with pytest.raises(IncompatibleCheckpoint, match=r"\(\+10 more\)"):
        dist_ckpt.load(target, uri)


def test_no_warnings_besides_dcp_single_process_notice(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roundtrip(tmp_path, {"w": torch.ones(3), "v": (1, 2)})
    others = [w for w in caught if "torch.distributed is disabled" not in str(w.message)]
    assert others == [], [str(w.message) for w in others]
