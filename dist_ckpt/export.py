"""Export a checkpoint as plain safetensors (read through :class:`CheckpointView`).

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dist_ckpt.checkpoint_files import wrap_backend_error
from dist_ckpt.checkpoint_view import CheckpointView
from dist_ckpt.errors import ConfigError, CorruptCheckpoint
from dist_ckpt.export_layout import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, parse_size
from dist_ckpt.format.dtypes import dtype_from_name, torch_to_safetensors
from dist_ckpt.progress import Progress
from storage_backends import Backend, BackendError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
assert tuple(DTYPES) == DTYPE_NAMES  # the command line offers DTYPE_NAMES without importing torch
__all__ = [
    "DTYPES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "ExportResult",
    "export_checkpoint",
    "parse_size",
    "select_tensors",
]


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
        out_dtype = _out_dtype(dtype_from_name(md.dtype, f"{view.uri}: tensor {key!r}"), dtype)
        st_dtype = torch_to_safetensors().get(out_dtype)
        if st_dtype is None:
            raise ConfigError(f"{view.uri}: tensor {key!r} has dtype {out_dtype}, which safetensors cannot hold")
        nbytes = math.prod(md.size) * torch.empty((), dtype=out_dtype).element_size()
        specs[key] = (name, st_dtype, list(md.size), nbytes)
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
        for key, (_name, _st, _shape, nbytes) in zip(keys, specs):
            tensor = view.tensor(key)
            tensor = tensor.to(_out_dtype(tensor.dtype, dtype)).contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
            if len(memoryview(data).cast("B")) != nbytes:
                raise CorruptCheckpoint(
                    f"{view.uri}: tensor {key!r} assembled to {tensor.nbytes} bytes, expected {nbytes}"
                )
            writer.write(memoryview(data).cast("B") if tensor.numel() else b"")
            if on_bytes is not None:
                on_bytes(nbytes)
            del tensor, data  # one tensor at a time
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def iter_tensor_blocks(
    a: torch.Tensor, b: torch.Tensor, block: int = 1 << 22
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching flat float64 blocks of two same-shaped tensors (bounded extra memory)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    for start in range(0, fa.numel(), block):
        yield fa[start : start + block].to(torch.float64), fb[start : start + block].to(torch.float64)
