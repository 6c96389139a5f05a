"""The one table of element types: every name a dtype has in dist_ckpt, and what follows from it.

A dtype is spelled three ways here: torch's name (``metadata.json`` records ``"bfloat16"``),
the safetensors name (shard headers record ``"BF16"``), and the ``zstd`` codec's byte
transform for it (see :mod:`dist_ckpt.format.byte_group`; chosen by measurement there). Every
other view (element sizes, name to name, ``torch.dtype`` to name) is derived from
:data:`DTYPES`, so a dtype is added in one place.

No torch and no numpy at import: the command line reads metadata without them. The views
keyed by ``torch.dtype`` import torch the first time they are asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dist_ckpt.errors import CorruptCheckpoint

if TYPE_CHECKING:
    import torch

# The zstd codec's byte transforms (byte_group.py implements them; zstd_chunk.py numbers them).
NONE, GROUP, ROT_GROUP, SPLIT = "none", "group", "rot_group", "split"


@dataclass(frozen=True)
class Dtype:
    """One element type. ``safetensors`` is None for a type safetensors cannot store (complex):
    ``metadata.json`` accepts it (DCP metadata may name it), no shard entry ever holds it."""

    torch_name: str  # as torch spells it, without "torch."
    safetensors: str | None
    itemsize: int  # bytes per element
    transform: str  # the zstd codec's byte transform


DTYPES: tuple[Dtype, ...] = (
    Dtype("float64", "F64", 8, GROUP),
    Dtype("float32", "F32", 4, SPLIT),
    Dtype("float16", "F16", 2, ROT_GROUP),
    Dtype("bfloat16", "BF16", 2, SPLIT),
    Dtype("float8_e4m3fn", "F8_E4M3", 1, NONE),
    Dtype("float8_e5m2", "F8_E5M2", 1, NONE),
    Dtype("int64", "I64", 8, GROUP),
    Dtype("int32", "I32", 4, GROUP),
    Dtype("int16", "I16", 2, GROUP),
    Dtype("int8", "I8", 1, NONE),
    Dtype("uint8", "U8", 1, NONE),
    Dtype("uint16", "U16", 2, GROUP),
    Dtype("uint32", "U32", 4, GROUP),
    Dtype("uint64", "U64", 8, GROUP),
    Dtype("bool", "BOOL", 1, NONE),
    Dtype("complex64", None, 8, NONE),
    Dtype("complex128", None, 16, NONE),
)

BY_SAFETENSORS: Mapping[str, Dtype] = MappingProxyType({d.safetensors: d for d in DTYPES if d.safetensors is not None})
BY_TORCH_NAME: Mapping[str, Dtype] = MappingProxyType({d.torch_name: d for d in DTYPES})


def safetensors_itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype; ValueError for a name not in the table."""
    d = BY_SAFETENSORS.get(name)
    if d is None:
        raise ValueError(f"unknown safetensors dtype {name!r}; expected one of {sorted(BY_SAFETENSORS)}")
    return d.itemsize


# --- torch names (metadata.json) --------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of ``dtype`` (``torch.bfloat16`` -> ``"bfloat16"``), as metadata.json records it."""
    return str(dtype).removeprefix("torch.")


def check_dtype_name(name: Any, where: str) -> str:
    """``name`` if the table knows it as a torch name; else CorruptCheckpoint naming ``where``."""
    if not isinstance(name, str) or name not in BY_TORCH_NAME:
        raise CorruptCheckpoint(f"{where}: unknown dtype {name!r}")
    return name


def dtype_from_name(name: str, where: str) -> torch.dtype:
    """The ``torch.dtype`` of a torch name read from a file (checked against the table)."""
    import torch

    dtype = getattr(torch, check_dtype_name(name, where), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpoint(f"{where}: dtype {name!r} is not supported by this torch ({torch.__version__})")
    return dtype


# --- torch.dtype <-> safetensors (shard entries) ----------------------------------------------


@cache
def torch_to_safetensors() -> Mapping[torch.dtype, str]:
    """``torch.dtype`` -> safetensors name, for every dtype a shard entry can hold."""
    import torch

    return MappingProxyType({getattr(torch, d.torch_name): d.safetensors for d in DTYPES if d.safetensors is not None})


@cache
def safetensors_to_torch() -> Mapping[str, torch.dtype]:
    """safetensors name -> ``torch.dtype``."""
    return MappingProxyType({st: dtype for dtype, st in torch_to_safetensors().items()})
