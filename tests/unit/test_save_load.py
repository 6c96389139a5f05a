"""dist_ckpt.save / dist_ckpt.load in one process: round trips of tensors and values."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from save_load_common import ALL_DTYPES, roundtrip, same_bits, sample

import dist_ckpt
from dist_ckpt import UnsupportedValue

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


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


def test_no_warnings_besides_dcp_single_process_notice(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roundtrip(tmp_path, {"w": torch.ones(3), "v": (1, 2)})
    others = [w for w in caught if "torch.distributed is disabled" not in str(w.message)]
    assert others == [], [str(w.message) for w in others]
