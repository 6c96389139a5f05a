"""dist_ckpt.format.json_values: non-tensor values as tagged JSON, never pickle."""

from __future__ import annotations

import enum
import json
import math
from collections import OrderedDict, namedtuple

import numpy as np
import pytest

from dist_ckpt.errors import CorruptCheckpoint, UnsupportedValue
from dist_ckpt.format import json_values as jv


def roundtrip(value):
    data = jv.encode(value, "v")
    assert isinstance(data, bytes)
    json.loads(data)  # always strict, standard JSON (no NaN/Infinity literals)
    return jv.decode(data)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**53,
        -(2**53),
        1.5,
        -0.0,
        1e308,
        "",
        "héllo ✓",
        "\x00",
        [],
        {},
        [1, [2, [3]]],
        {"a": {"b": [1, None, "x"]}},
    ],
)
def test_plain_json_values_roundtrip_unchanged(value):
    assert roundtrip(value) == value
    assert type(roundtrip(value)) is type(value)


def test_plain_values_encode_as_plain_json():
    assert json.loads(jv.encode({"lr": 0.1, "betas": [0.9, 0.99], "name": "adam", "n": 3})) == {
        "lr": 0.1,
        "betas": [0.9, 0.99],
        "name": "adam",
        "n": 3,
    }


def test_tuples_stay_tuples_at_every_depth():
    value = {"betas": (0.9, 0.999), "nested": [(1, (2, 3)), ()]}
    out = roundtrip(value)
    assert out == value
    assert type(out["betas"]) is tuple
    assert type(out["nested"][0]) is tuple and type(out["nested"][0][1]) is tuple
    assert out["nested"][1] == () and type(out["nested"][1]) is tuple
    assert type(out["nested"]) is list


def test_namedtuple_and_torch_size_come_back_as_plain_tuples():
    import torch

    Point = namedtuple("Point", "x y")
    assert roundtrip(Point(1, 2)) == (1, 2)
    assert roundtrip(torch.Size([3, 4])) == (3, 4)


def test_non_finite_floats():
    out = roundtrip([math.inf, -math.inf, math.nan, 0.5])
    assert out[0] == math.inf and out[1] == -math.inf and math.isnan(out[2]) and out[3] == 0.5
    assert all(type(v) is float for v in out)
    # NaN/Infinity literals are not standard JSON; they are tagged instead.
    raw = jv.encode(math.nan).decode()
    assert "NaN" not in raw and "nan" in raw


@pytest.mark.parametrize("n", [2**53 + 1, -(2**53) - 1, 2**64, -(2**100), 10**40 + 7, 18446744073709551615])
def test_big_ints_are_exact(n):
    out = roundtrip(n)
    assert out == n and type(out) is int
    assert json.loads(jv.encode(n)) == {"__t": "int", "v": str(n)}  # a string: any JSON reader keeps it exact


def test_bytes_and_bytearray():
    blob = bytes(range(256)) * 3
    assert roundtrip(blob) == blob
    assert roundtrip(bytearray(b"\x00\xff")) == b"\x00\xff"
    assert roundtrip(b"") == b""


def test_dicts_with_non_string_keys():
    value = {1: "a", 2: {3: "b"}, (4, 5): [6], None: 0, 2.5: "f"}
    out = roundtrip(value)
    assert out == value
    assert list(out) == list(value)  # order kept
    assert (4, 5) in out and type(next(k for k in out if isinstance(k, tuple))) is tuple
    # Adam-style state keyed by param index
    assert roundtrip({0: {"step": 3}, 1: {"step": 3}}) == {0: {"step": 3}, 1: {"step": 3}}


def test_dict_with_a_tag_key_is_not_mistaken_for_a_tagged_value():
    value = {"__t": "bytes", "b64": "AAAA"}
    out = roundtrip(value)
    assert out == value and isinstance(out["b64"], str)
    assert roundtrip({"__t": "nope"}) == {"__t": "nope"}


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([1, 2, 3], dtype=np.uint32),  # MT19937 key words
        np.zeros((0, 5), dtype=np.int64),
        np.array(7, dtype=np.int16),
        np.array([True, False]),
        np.arange(6, dtype=">i4"),  # big-endian kept
        np.arange(10, dtype=np.float64)[::2],  # non-contiguous
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    ],
)
def test_numpy_arrays(arr):
    out = roundtrip(arr)
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable  # a private copy, not a view of the JSON buffer


def test_numpy_rng_state_roundtrip():
    rng = np.random.RandomState(1234)
    rng.rand(10)
    state = rng.get_state()
    restored = np.random.RandomState()
    restored.set_state(roundtrip(state))
    assert np.array_equal(restored.rand(5), rng.rand(5))
    gen = np.random.default_rng(7)
    gen.random(3)
    bg_state = gen.bit_generator.state
    out = roundtrip(bg_state)
    assert out == bg_state


def test_numpy_scalars_keep_their_dtype():
    for v in (np.float32(1.5), np.int64(-3), np.uint8(255), np.bool_(True), np.float64(math.nan)):
        out = roundtrip(v)
        assert type(out) is type(v)
        if isinstance(v, np.floating) and np.isnan(v):
            assert np.isnan(out)
        else:
            assert out == v


# --- unsupported values: named by key path and type, at encode time -------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "path", "typename"),
    [
        ({"opt": {"param_groups": [{"lr": 0.1, "fn": lambda: 0}]}}, "opt.param_groups[0].fn", "function"),
        ({"a": [1, 2, (3, Opaque())]}, "a[2][1]", "Opaque"),
        ({"s": {1, 2}}, "s", "set"),
        ({"k": {1: Opaque()}}, "k[1]", "Opaque"),
        ({"o": OrderedDict(a=1)}, "o", "OrderedDict"),
        ({"c": 1 + 2j}, "c", "complex"),
        ({"obj": np.array([object()], dtype=object)}, "obj", "ndarray"),
    ],
)
def test_unsupported_value_names_the_key_path_and_type(value, path, typename):
    with pytest.raises(UnsupportedValue) as info:
        jv.encode(value)
    msg = str(info.value)
    assert f"cannot store {path}:" in msg
    assert typename in msg
    assert "pickle" in msg  # says why


def test_unsupported_value_path_is_prefixed_by_the_fqn():
    with pytest.raises(UnsupportedValue, match=r"cannot store optim\.param_groups\[0\]\.fn:"):
        jv.encode([{"fn": print}], "optim.param_groups")


def test_int_and_float_subclasses_are_refused_not_silently_degraded():
    class Color(enum.IntEnum):
        RED = 1

    class MyFloat(float):
        pass

    with pytest.raises(UnsupportedValue, match=r"cannot store c:.*Color"):
        jv.encode({"c": Color.RED})
    with pytest.raises(UnsupportedValue, match=r"MyFloat"):
        jv.encode({"f": MyFloat(1.0)})


def test_unsupported_dict_key_is_refused():
    with pytest.raises(UnsupportedValue, match=r"<key>"):
        jv.encode({"d": {Opaque(): 1}})


def test_tensor_is_not_a_json_value():
    import torch

    with pytest.raises(UnsupportedValue, match=r"cannot store t:.*Tensor"):
        jv.encode({"t": torch.zeros(1)})


# --- decoding refuses anything it did not write ----------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        {"__t": "pickle", "v": "gASVAAAA"},
        {"__t": "object", "cls": "os.system", "args": ["touch /tmp/x"]},
        {"__t": "torch", "v": "..."},
        [1, {"nested": {"__t": "eval", "v": "1+1"}}],
    ],
)
def test_decode_refuses_unknown_tags(doc):
    with pytest.raises(CorruptCheckpoint, match=r"unknown tag"):
        jv.decode(json.dumps(doc).encode(), where="value 'x'")


@pytest.mark.parametrize(
    ("doc", "what"),
    [
        ({"__t": "float", "v": "1e400"}, "float tag"),
        ({"__t": "bytes", "b64": "not base64!"}, "malformed"),
        ({"__t": "bytes"}, "malformed"),
        ({"__t": "int", "v": "0x10"}, "malformed"),
        ({"__t": "tuple"}, "malformed"),
        ({"__t": "ndarray", "dtype": "O", "shape": [1], "b64": ""}, "object dtype"),
        ({"__t": "ndarray", "dtype": "<f4", "shape": [3], "b64": "AAAA"}, "malformed"),
        ({"__t": "ndarray", "dtype": "bogus", "shape": [1], "b64": ""}, "malformed"),
        ({"__t": "npscalar", "dtype": "O", "v": 1}, "object dtype"),
        ({"__t": "dict", "items": [[[1, 2], 3], ["k"]]}, "malformed"),
    ],
)
def test_decode_refuses_malformed_tags(doc, what):
    with pytest.raises(CorruptCheckpoint, match=what):
        jv.decode(json.dumps(doc).encode(), where="value 'x'")


def test_decode_error_names_where():
    with pytest.raises(CorruptCheckpoint, match=r"value 'opt\.lr'"):
        jv.decode(b'{"__t": "nope"}', where="value 'opt.lr'")


@pytest.mark.parametrize("data", [b"\x80\x04\x95", b"{not json", b"\xff\xfe", b""])
def test_decode_refuses_non_json(data):
    with pytest.raises(CorruptCheckpoint, match=r"not UTF-8 JSON"):
        jv.decode(data)


def test_decode_of_a_pickle_never_unpickles(tmp_path):
    import pickle

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    with pytest.raises(CorruptCheckpoint):
        jv.decode(pickle.dumps(Evil()))
    assert not sentinel.exists()


def test_decode_of_deeply_nested_json_is_corrupt_not_a_crash():
    with pytest.raises(CorruptCheckpoint, match=r"nested too deeply"):
        jv.decode(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CorruptCheckpoint, match=r"nested too deeply"):
        jv.decode(b'{"a":' * 5_000 + b"1" + b"}" * 5_000)
