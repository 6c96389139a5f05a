"""Reading a DCP checkpoint's ``.metadata`` without letting it run code.

``.metadata`` is a pickle (``torch.distributed.checkpoint`` writes its ``Metadata`` dataclass
with ``pickle.dump``), and unpickling an arbitrary pickle runs whatever its ``__reduce__``
names. :class:`MetadataUnpickler` resolves only the globals DCP's metadata is made of — its
metadata dataclasses, ``torch.Size``, dtypes, layouts and memory-format codes, paths, and a
handful of builtin container types — and refuses any other global *before* it is looked up,
naming it; nothing the file names is ever called unless it is on that list.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from dist_ckpt.errors import CorruptCheckpoint

# (module, name) -> the object it may resolve to. Everything here is a plain data type: calling
# it with any arguments builds a value and has no other effect.
_DCP_CLASSES = (
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "TensorProperties",
    "ChunkStorageMetadata",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
)
# not bytes/bytearray: bytes(10**12) would allocate whatever the file asks for
_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "complex")
_PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")


def _allowed() -> dict[tuple[str, str], Any]:
    import builtins
    import collections
    import pathlib

    from dist_ckpt.dcp_internals import filesystem_storage_info_class

    allowed: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n) for n in _DCP_CLASSES
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem_storage_info_class()
    allowed[("torch", "Size")] = torch.Size
    # torch.layout pickles as torch.serialization._get_layout("torch.strided"): a dictionary look-up
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            allowed[("torch", name)] = value
    allowed.update({("builtins", n): getattr(builtins, n) for n in _BUILTINS})
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed.update({("pathlib", n): getattr(pathlib, n) for n in _PATHS})
    return allowed


class MetadataUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that admits only DCP metadata classes and plain builtins."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where
        self.allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise CorruptCheckpoint(
                f"{self.where}: refused to load the global {module}.{name}: a DCP .metadata file holds only DCP's "
                "metadata classes, torch dtypes/sizes and builtins, so this file is not one DCP wrote (or was "
                "tampered with); nothing in it was run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptCheckpoint(f"{self.where}: unexpected persistent id in a DCP .metadata file; refused")


def read_dcp_metadata(data: bytes, where: str) -> dcp_metadata.Metadata:
    """The ``Metadata`` pickled in ``data`` (the bytes of ``where``), or :class:`CorruptCheckpoint`."""
    try:
        meta = MetadataUnpickler(data, where).load()
    except CorruptCheckpoint:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise CorruptCheckpoint(f"{where}: not a readable DCP .metadata file ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dcp_metadata.Metadata):
        raise CorruptCheckpoint(f"{where}: holds a {type(meta).__name__}, expected DCP's Metadata")
    if not isinstance(meta.state_dict_metadata, dict) or not isinstance(meta.storage_data, dict):
        raise CorruptCheckpoint(f"{where}: its Metadata has no state_dict_metadata/storage_data tables")
    return meta
