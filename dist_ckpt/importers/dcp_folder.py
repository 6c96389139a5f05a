"""Import a DCP checkpoint folder (``.metadata`` + ``*.distcp``, torch's ``FileSystemWriter``).

``.metadata`` goes through :mod:`dist_ckpt.importers.dcp_metadata`'s restricted unpickler;
every payload (tensor chunks and ``torch.save``'d values) through
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses
anything else. The chunks each rank wrote (FSDP / DTensor shards) are assembled into full
tensors, checked against the metadata's shapes, dtypes and byte ranges.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from dist_ckpt.errors import ConfigError, CorruptCheckpoint
from dist_ckpt.importers.dcp_metadata import read_dcp_metadata
from dist_ckpt.importers.source import ImportedState, guess_objects, prefixed

METADATA_FILE = ".metadata"


def is_dcp_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA_FILE))


class _Payloads:
    """Byte ranges of the folder's data files, checked to stay inside the folder and the file."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, Any] = {}

    def read(self, relative: str, offset: int, length: int, key: str) -> bytes:
        if not isinstance(relative, str) or os.path.basename(relative) != relative or relative in ("", ".", ".."):
            raise CorruptCheckpoint(
                f"{self.folder}/{METADATA_FILE}: {key!r} names data file {relative!r}, "
                "not a plain file name in the folder; refused"
            )
        path = os.path.join(self.folder, relative)
        if relative not in self.files:
            try:
                self.files[relative] = open(path, "rb")  # noqa: SIM115 (closed in close())
            except OSError as e:
                raise CorruptCheckpoint(
                    f"{path}: cannot open the data file {key!r} is stored in ({e.strerror or e})"
                ) from e
        f = self.files[relative]
        size = os.fstat(f.fileno()).st_size
        if (
            not (isinstance(offset, int) and isinstance(length, int))
            or offset < 0
            or length < 0
            or offset + length > size
        ):
            raise CorruptCheckpoint(f"{path}: {key!r} is recorded at bytes {offset}+{length}, the file has {size}")
        f.seek(offset)
        return f.read(length)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _load_payload(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{where}: refused or unreadable by torch.load(weights_only=True): {e}") from e


def _check_plain(info: Any, where: str) -> None:
    if getattr(info, "transform_descriptors", None):
        raise ConfigError(
            f"{where} was written with DCP storage extensions {list(info.transform_descriptors)}; "
            "import reads plain FileSystemWriter checkpoints: re-save it without _extensions"
        )


def _tensor(md: TensorStorageMetadata, fqn: str, meta: Any, payloads: _Payloads, folder: str) -> torch.Tensor:
    dtype = md.properties.dtype
    full = torch.empty(tuple(md.size), dtype=dtype)
    covered = 0
    for chunk in md.chunks:
        index = MetadataIndex(fqn, chunk.offsets)
        info = meta.storage_data.get(index)
        where = f"{folder}: {fqn!r} chunk at {tuple(chunk.offsets)}"
        if info is None:
            raise CorruptCheckpoint(f"{where}: no storage entry in {METADATA_FILE}")
        _check_plain(info, where)
        part = _load_payload(
            payloads.read(info.relative_path, info.offset, info.length, fqn), f"{where} ({info.relative_path})"
        )
        if not isinstance(part, torch.Tensor) or part.dtype != dtype or tuple(part.shape) != tuple(chunk.sizes):
            shown = f"{part.dtype} {tuple(part.shape)}" if isinstance(part, torch.Tensor) else type(part).__name__
            raise CorruptCheckpoint(f"{where}: holds {shown}, {METADATA_FILE} records {dtype} {tuple(chunk.sizes)}")
        if len(chunk.offsets) != full.dim() or any(
            o < 0 or o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, full.shape)
        ):
            raise CorruptCheckpoint(
                f"{where}: chunk {tuple(chunk.sizes)} lies outside the tensor's shape {tuple(full.shape)}"
            )
        full[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))].copy_(part)
        covered += part.numel()
    if covered != full.numel():
        raise CorruptCheckpoint(f"{folder}: the chunks of {fqn!r} cover {covered} of its {full.numel()} elements")
    return full


def _select(meta: Any, key: str, where: str) -> None:
    """Keep only the keys under ``key.`` (``--key app``), in place; read nothing else."""
    head = key + "."
    tops = sorted({k.partition(".")[0] for k in meta.state_dict_metadata})
    meta.state_dict_metadata = {k: v for k, v in meta.state_dict_metadata.items() if k.startswith(head)}
    if not meta.state_dict_metadata:
        raise ConfigError(f"{where}: no key starts with {head!r} (--key {key}); its top-level names are {tops[:8]}")


def read_dcp_folder(path: str, name: str | None = None, key: str | None = None) -> ImportedState:
    """Every tensor (assembled whole) and value of the DCP checkpoint in folder ``path``; keys
    are DCP's flattened keys — only those under ``key.``, with that prefix stripped, when
    ``key`` is given — under ``name`` when given."""
    where = os.path.join(path, METADATA_FILE)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptCheckpoint(f"{where}: cannot read it ({e.strerror or e})") from e
    meta = read_dcp_metadata(data, where)
    if key is not None:
        _select(meta, key, where)
    payloads = _Payloads(path)
    entries: dict[str, Any] = {}
    try:
        for fqn, md in meta.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                entries[fqn] = _tensor(md, fqn, meta, payloads, path)
            elif isinstance(md, BytesStorageMetadata):
                info = meta.storage_data.get(MetadataIndex(fqn))
                if info is None:
                    raise CorruptCheckpoint(f"{path}: value {fqn!r} has no storage entry in {METADATA_FILE}")
                _check_plain(info, f"{path}: value {fqn!r}")
                raw = payloads.read(info.relative_path, info.offset, info.length, fqn)
                entries[fqn] = _load_payload(raw, f"{path}: value {fqn!r} ({info.relative_path})")
            else:
                raise CorruptCheckpoint(f"{where}: {fqn!r} has metadata of type {type(md).__name__}")
    finally:
        payloads.close()
    if not entries:
        raise CorruptCheckpoint(f"{where}: the checkpoint holds no tensors or values")
    if key is not None:
        entries = {k[len(key) + 1 :]: v for k, v in entries.items()}
    entries = prefixed(entries, name)
    keys = list(entries)
    return ImportedState(
        path, "dcp", entries, guess_objects(keys, {k: isinstance(entries[k], torch.Tensor) for k in keys})
    )
