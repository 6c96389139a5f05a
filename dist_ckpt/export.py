"""Read a checkpoint offline (no process group) and export it as plain safetensors.

:class:`CheckpointView` opens one committed checkpoint of any world size and codec and gives
back stored values and *full* tensors, each assembled from its chunks across the rank files
(``metadata.json`` records every chunk's offsets and sizes). It is what ``dist-ckpt inspect``,
``diff`` and ``export`` read through.

:func:`export_checkpoint` consolidates a checkpoint into the Hugging Face layout for
inference: ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` files plus
``model.safetensors.index.json`` when split by ``max_shard_size``. It streams tensor by tensor
— each full tensor is assembled, written and dropped — so memory holds one tensor at a time,
never the model twice. Output goes to any backend (a local directory or ``s3://``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from dist_ckpt.errors import ConfigError, CorruptCheckpoint
from dist_ckpt.format import json_values
from dist_ckpt.format.metadata_json import CheckpointMetadata, EntryRef
from dist_ckpt.format.shard import ShardReader
from dist_ckpt.progress import KEY, Progress
from dist_ckpt.storage import COMMITTED, ST_DTYPE, read_checkpoint_metadata, wrap_backend_error
from storage_backends import Backend, BackendError, ObjectNotFound, join_key, open_backend

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
          "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """``"5GB"`` → 5·10⁹, ``"500MiB"``, ``"1048576"``, ``"2.5G"`` (as Hugging Face reads them)."""
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").upper() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. 5GB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return value


class CheckpointView:
    """One committed checkpoint, read without a process group."""

    def __init__(self, backend: Backend, prefix: str):
        self.backend, self.prefix = backend, prefix.strip("/")
        self.uri = f"{backend.uri}/{self.prefix}"
        self.meta: CheckpointMetadata = read_checkpoint_metadata(backend, self.prefix)
        self._readers: dict[str, ShardReader] = {}

    @classmethod
    def open(cls, uri: str) -> CheckpointView:
        from dist_ckpt.api import split_checkpoint_uri

        root, name = split_checkpoint_uri(uri)
        try:
            return cls(open_backend(root), name)
        except ValueError as e:
            if isinstance(e, CorruptCheckpoint | ConfigError):
                raise
            raise ConfigError(str(e)) from e

    # -- what is stored ---------------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.meta.dcp.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    @property
    def values(self) -> list[str]:
        return [k for k, v in self.meta.dcp.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]

    def refs(self, fqn: str) -> list[EntryRef]:
        """Where the chunks (or the value) of ``fqn`` are stored."""
        md = self.meta.dcp.state_dict_metadata[fqn]
        storage = self.meta.dcp.storage_data
        if isinstance(md, TensorStorageMetadata):
            return [storage[MetadataIndex(fqn, c.offsets)] for c in md.chunks]
        return [storage[MetadataIndex(fqn)]]

    def committed_info(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.backend.read(join_key(self.prefix, COMMITTED)).decode("utf-8"))
        except ObjectNotFound:
            return {}
        except BackendError as e:
            raise wrap_backend_error(e, self.uri) from e
        except (UnicodeDecodeError, ValueError) as e:
            raise CorruptCheckpoint(f"{self.uri}/{COMMITTED}: not valid JSON ({e})") from e
        return doc if isinstance(doc, dict) else {}

    # -- reading ----------------------------------------------------------------------------
    def _reader(self, file: str) -> ShardReader:
        if file not in self._readers:
            try:
                self._readers[file] = ShardReader(self.backend, join_key(self.prefix, file), self.meta.files[file].size)
            except BackendError as e:
                raise wrap_backend_error(e, f"{self.uri}/{file}") from e
        return self._readers[file]

    def _read_entry(self, ref: EntryRef) -> memoryview:
        try:
            return self._reader(ref.file).read(ref.entry, checksum=ref.checksum)
        except BackendError as e:
            raise wrap_backend_error(e, f"{self.uri}/{ref.file}") from e

    def raw_value(self, fqn: str) -> bytes:
        """A stored non-tensor value's JSON bytes (checksum verified)."""
        (ref,) = self.refs(fqn)
        return bytes(self._read_entry(ref))

    def value(self, fqn: str) -> Any:
        """A stored non-tensor value, decoded from JSON (never unpickled)."""
        return json_values.decode(self.raw_value(fqn), f"{self.uri}: value {fqn!r}")

    def progress(self) -> Progress | None:
        """The manager's progress record (step, metrics, config, tracked objects, run id), or
        None for a checkpoint written by the low-level ``dist_ckpt.save``."""
        if KEY not in self.meta.dcp.state_dict_metadata:
            return None
        text = self.value(KEY)
        if not isinstance(text, str):
            raise CorruptCheckpoint(f"{self.uri}: value {KEY!r} is not the manager's progress record")
        return Progress.decode(text, f"{self.uri}: {KEY}")

    def tensor(self, fqn: str) -> torch.Tensor:
        """The full tensor ``fqn``, assembled from its chunks (whatever rank wrote each)."""
        md = self.tensors[fqn]
        dtype = md.properties.dtype
        full = torch.empty(tuple(md.size), dtype=dtype)
        covered = 0
        for chunk in md.chunks:
            n = math.prod(chunk.sizes)
            if n == 0:
                continue
            ref = self.meta.dcp.storage_data[MetadataIndex(fqn, chunk.offsets)]
            data = self._read_entry(ref)
            expected = n * full.element_size()
            if len(data) != expected:
                raise CorruptCheckpoint(
                    f"{self.uri}/{ref.file}, entry {ref.entry!r}: {len(data)} bytes, chunk {list(chunk.sizes)} "
                    f"of {dtype} needs {expected}"
                )
            piece = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(tuple(chunk.sizes))
            full[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = piece
            covered += n
        if covered != full.numel():
            raise CorruptCheckpoint(f"{self.uri}: tensor {fqn!r}: its chunks cover {covered} of {full.numel()} elements")
        return full


# -- export ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    files: list[str]  # written, in order; the index file last when split
    tensors: int
    total_size: int  # bytes of tensor data (the index's metadata.total_size)
    weight_map: dict[str, str]


def select_tensors(view: CheckpointView, include_optimizer: bool = False) -> dict[str, str]:
    """``{checkpoint key: exported name}``: the tensors of tracked models (and optimizers with
    ``include_optimizer``). With exactly one model and no optimizer the ``<model>.`` prefix is
    dropped, so names match ``model.state_dict()``; otherwise full keys are kept."""
    progress = view.progress()
    keys = list(view.tensors)
    if progress is None or not progress.objects:
        log.warning("%s has no manager progress record; exporting every tensor but the RNG states", view.uri)
        return {k: k for k in keys if not k.startswith("rng.")}
    kinds = dict(progress.objects)
    wanted = {"model", "optimizer"} if include_optimizer else {"model"}
    names = {n for n, kind in kinds.items() if kind in wanted}
    chosen = [k for k in keys if k.split(".", 1)[0] in names]
    models = [n for n, kind in kinds.items() if kind == "model"]
    if len(models) == 1 and not include_optimizer:
        strip = models[0] + "."
        return {k: k[len(strip) :] for k in chosen}
    return {k: k for k in chosen}


def _plan_shards(sizes: list[tuple[str, int]], max_shard_size: int | None) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if max_shard_size is not None and shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def _header(specs: list[tuple[str, str, list[int], int]], metadata: dict[str, str]) -> bytes:
    doc: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in specs:
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return len(body).to_bytes(8, "little") + body


def _out_dtype(src: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and src.is_floating_point else src


def export_checkpoint(
    view: CheckpointView,
    out: Backend,
    *,
    include_optimizer: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    on_bytes: Callable[[int], None] | None = None,
    overwrite: bool = False,
    names: dict[str, str] | None = None,
) -> ExportResult:
    """Write ``view``'s model tensors as plain safetensors below ``out`` (see the module doc).
    ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype) casts floating-point tensors.
    ``names`` (``{key: exported name}``) overrides :func:`select_tensors`."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    names = select_tensors(view, include_optimizer) if names is None else names
    if not names:
        objects = dict((view.progress() or Progress()).objects)
        raise ConfigError(f"{view.uri}: no model tensors to export (tracked objects: {objects})")
    try:
        existing = [o.key for o in out.list("model") if o.key == INDEX_FILE or o.key.endswith(".safetensors")]
    except BackendError as e:
        raise wrap_backend_error(e, out.uri) from e
    if existing and not overwrite:
        raise ConfigError(
            f"{out.uri} already holds {', '.join(existing[:3])}; export into an empty directory (or pass --overwrite)"
        )
    tensors = view.tensors
    specs: dict[str, tuple[str, str, list[int], int]] = {}
    for key, name in names.items():
        md = tensors[key]
        out_dtype = _out_dtype(md.properties.dtype, dtype)
        if out_dtype not in ST_DTYPE:
            raise ConfigError(f"{view.uri}: tensor {key!r} has dtype {out_dtype}, which safetensors cannot hold")
        nbytes = math.prod(md.size) * torch.empty((), dtype=out_dtype).element_size()
        specs[key] = (name, ST_DTYPE[out_dtype], list(md.size), nbytes)
    shards = _plan_shards([(k, specs[k][3]) for k in names], limit)
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    meta = {"format": "pt", "source": view.uri}
    try:
        for file, keys in zip(files, shards):
            _write_file(view, out, file, [specs[k] for k in keys], keys, dtype, meta, on_bytes)
            weight_map.update({specs[k][0]: file for k in keys})
        total = sum(s[3] for s in specs.values())
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            out.write_bytes(INDEX_FILE, json.dumps(index, indent=2).encode("utf-8"))
            files.append(INDEX_FILE)
    except BackendError as e:
        raise wrap_backend_error(e, out.uri) from e
    log.info("exported %d tensors (%d bytes) of %s to %s", len(specs), total, view.uri, out.uri)
    return ExportResult(files, len(specs), total, weight_map)


def _write_file(
    view: CheckpointView,
    out: Backend,
    file: str,
    specs: list[tuple[str, str, list[int], int]],
    keys: Iterable[str],
    dtype: torch.dtype | None,
    meta: dict[str, str],
    on_bytes: Callable[[int], None] | None,
) -> None:
    writer = out.open_writer(file)
    try:
        writer.write(_header(specs, meta))
        for key, (name, _st, _shape, nbytes) in zip(keys, specs):
            tensor = view.tensor(key)
            tensor = tensor.to(_out_dtype(tensor.dtype, dtype)).contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
            if len(memoryview(data).cast("B")) != nbytes:
                raise CorruptCheckpoint(f"{view.uri}: tensor {key!r} assembled to {tensor.nbytes} bytes, expected {nbytes}")
            writer.write(memoryview(data).cast("B") if tensor.numel() else b"")
            if on_bytes is not None:
                on_bytes(nbytes)
            del tensor, data  # one tensor at a time
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def iter_tensor_blocks(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 22) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching flat float64 blocks of two same-shaped tensors (bounded extra memory)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    for start in range(0, fa.numel(), block):
        yield fa[start : start + block].to(torch.float64), fb[start : start + block].to(torch.float64)
