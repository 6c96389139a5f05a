"""Non-tensor values as JSON with a few tagged types — never pickle.

Plain JSON covers ``None``, ``bool``, ``str``, finite ``float``, safe ``int``, ``list`` and
``dict`` with ``str`` keys. Everything else that training state commonly holds is tagged as
``{"__t": TAG, ...}``:

=========  ==============================================================
tag        value
=========  ==============================================================
tuple      ``{"__t": "tuple", "v": [...]}``
bytes      ``{"__t": "bytes", "b64": "..."}``
float      non-finite floats: ``{"__t": "float", "v": "nan"|"inf"|"-inf"}``
int        ints beyond ±2**53 (lossy in most JSON readers): decimal string
dict       dicts with non-``str`` keys (or a ``"__t"`` key): list of pairs
ndarray    NumPy arrays: dtype, shape, base64 bytes (RNG states, sampler state)
npscalar   NumPy scalars: dtype and the value
=========  ==============================================================

Anything else raises :class:`UnsupportedValue` naming the key path and the type, at save time,
before a byte is written. Decoding accepts only these tags.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from typing import Any

from dist_ckpt.errors import CorruptCheckpoint, UnsupportedValue

_TAG = "__t"
_SAFE_INT = 2**53
_MAX_NDARRAY_BYTES = 1 << 30


def _unsupported(path: str, value: Any) -> UnsupportedValue:
    return UnsupportedValue(
        f"cannot store {path or '<root>'}: a value of type {type(value).__module__}."
        f"{type(value).__qualname__} is not a tensor and has no JSON form (dist_ckpt never "
        "pickles). Return tensors, numbers, strings, lists, tuples or dicts from state_dict(), "
        "or leave this object out of the tracked state."
    )


def to_json(value: Any, path: str = "") -> Any:
    """The JSON-compatible form of ``value``; raises :class:`UnsupportedValue` naming ``path``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    # numpy is imported only by a process that has numpy values (the command line never does:
    # it starts faster); a value cannot be a numpy object unless numpy is loaded.
    np = sys.modules.get("numpy")
    # Before the int/float checks: numpy.float64 subclasses float (and would be refused there).
    if np is not None and isinstance(value, np.generic) and not isinstance(value, np.object_):
        return {_TAG: "npscalar", "dtype": value.dtype.str, "v": to_json(value.item(), path)}
    if isinstance(value, int) and not isinstance(value, bool):
        if type(value) is not int:  # IntEnum and friends: refuse rather than lose the type
            raise _unsupported(path, value)
        return value if -_SAFE_INT <= value <= _SAFE_INT else {_TAG: "int", "v": str(value)}
    if isinstance(value, float):
        if type(value) is not float:
            raise _unsupported(path, value)
        if math.isfinite(value):
            return value
        return {_TAG: "float", "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if type(value) is list:
        return [to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):  # torch.Size and namedtuples come back as plain tuples
        return {_TAG: "tuple", "v": [to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "b64": base64.b64encode(bytes(value)).decode("ascii")}
    if type(value) is dict:
        if all(type(k) is str for k in value) and _TAG not in value:
            return {k: to_json(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        return {
            _TAG: "dict",
            "items": [[to_json(k, f"{path}<key>"), to_json(v, f"{path}[{k!r}]")] for k, v in value.items()],
        }
    if np is not None and isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _unsupported(path, value)
        return {
            _TAG: "ndarray",
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "b64": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii"),
        }
    raise _unsupported(path, value)


def encode(value: Any, path: str = "") -> bytes:
    """``value`` as UTF-8 JSON bytes (see :func:`to_json`)."""
    return json.dumps(to_json(value, path), separators=(",", ":"), allow_nan=False).encode("utf-8")


def _bad(where: str, what: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"{where}: {what}; the stored value is not valid dist_ckpt JSON")


def from_json(obj: Any, where: str = "value") -> Any:
    """Inverse of :func:`to_json`. Unknown tags raise :class:`CorruptCheckpoint`."""
    if isinstance(obj, list):
        return [from_json(v, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(_TAG)
    if tag is None:
        return {k: from_json(v, where) for k, v in obj.items()}
    try:
        if tag == "tuple":
            return tuple(from_json(v, where) for v in obj["v"])
        if tag == "bytes":
            return base64.b64decode(obj["b64"], validate=True)
        if tag == "float":
            if obj["v"] not in ("nan", "inf", "-inf"):
                raise _bad(where, f"float tag holds {obj['v']!r}")
            return float(obj["v"])
        if tag == "int":
            return int(str(obj["v"]), 10)
        if tag == "dict":
            return {_hashable(from_json(k, where)): from_json(v, where) for k, v in obj["items"]}
        if tag in ("ndarray", "npscalar"):
            import numpy as np
        if tag == "ndarray":
            dtype = np.dtype(str(obj["dtype"]))
            if dtype.hasobject:
                raise _bad(where, f"ndarray of object dtype {obj['dtype']!r}")
            raw = base64.b64decode(obj["b64"], validate=True)
            if len(raw) > _MAX_NDARRAY_BYTES:
                raise _bad(where, "ndarray larger than 1 GiB")
            return np.frombuffer(raw, dtype=dtype).reshape([int(s) for s in obj["shape"]]).copy()
        if tag == "npscalar":
            dtype = np.dtype(str(obj["dtype"]))
            if dtype.hasobject:
                raise _bad(where, "numpy scalar of object dtype")
            return dtype.type(from_json(obj["v"], where))
    except CorruptCheckpoint:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(where, f"malformed {tag!r} tag ({e})") from e
    raise _bad(where, f"unknown tag {tag!r}")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def decode(data: bytes, where: str = "value") -> Any:
    """Inverse of :func:`encode`; ``where`` names the value in error messages."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(where, f"not UTF-8 JSON ({e.__class__.__name__}: {e})") from e
    except RecursionError as e:
        raise _bad(where, "JSON nested too deeply") from e
    try:
        return from_json(obj, where)
    except RecursionError as e:
        raise _bad(where, "value nested too deeply") from e
