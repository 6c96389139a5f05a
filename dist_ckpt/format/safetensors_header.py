"""The safetensors container: building a header, and parsing one without trusting it.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON, then
the data region. The JSON maps entry names to ``{"dtype", "shape", "data_offsets"}`` (offsets
relative to the data region) plus an optional ``"__metadata__"`` of string values. We keep our
own per-entry information (codec, real dtype, chunk table, value kind) as JSON under the
single metadata key ``"dist_ckpt"``.

Parsing is hardened: the header length is bounded and checked against the file size before
anything is allocated, every offset is checked against the data region, entries must not
overlap, and byte counts must match dtype and shape. Failures raise
:class:`CorruptCheckpoint` naming the file and the entry.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.format.dtypes import BY_SAFETENSORS

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CHUNK_RAW_BYTES = 1 << 30
META_KEY = "dist_ckpt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EntryInfo:
    """One entry as stored: where its bytes are and how to turn them back into the value.

    ``dtype``/``shape`` are the *real* element type and shape; ``codec`` is ``"none"`` (bytes
    stored as they are) or a chunked codec with ``chunks`` = ``((raw_len, stored_len), ...)``.
    ``kind`` is ``"tensor"`` or ``"json"`` (a non-tensor value, JSON bytes stored as U8).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the stored bytes
    end: int
    codec: str = "none"
    kind: str = "tensor"
    chunks: tuple[tuple[int, int], ...] = ()
    # per chunk: None (its stored bytes are here, in order) or (file, offset) — a chunk reused
    # from a shard of an earlier checkpoint (dist_ckpt.format.chunk_refs); empty: all here
    refs: tuple[tuple[str, int] | None, ...] = ()

    @property
    def raw_nbytes(self) -> int:
        return math.prod(self.shape) * BY_SAFETENSORS[self.dtype].itemsize


@dataclass(frozen=True)
class ShardHeader:
    file: str
    header_len: int  # 8 + n: where the data region starts
    file_size: int
    entries: dict[str, EntryInfo] = field(default_factory=dict)


def build_header(
    entries: list[dict[str, Any]], extra: dict[str, Any], size: int | None = None, align: int = 8
) -> bytes:
    """Serialise a header. ``entries`` hold name, stored dtype, stored shape and
    ``data_offsets``; ``extra`` is our per-entry info stored under ``__metadata__``.
    The result (length prefix included) is space-padded to a multiple of ``align`` (8, or a
    page so the data region starts page-aligned), or to exactly ``size`` bytes when given
    (the space reserved before the data was known)."""
    doc: dict[str, Any] = {"__metadata__": {META_KEY: json.dumps(extra, separators=(",", ":"))}}
    for e in entries:
        doc[e["name"]] = {"dtype": e["dtype"], "shape": list(e["shape"]), "data_offsets": list(e["data_offsets"])}
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    total = 8 + len(body)
    target = size if size is not None else total + (-total % align)
    if target < total:
        raise ValueError(f"header needs {total} bytes but only {target} were reserved")
    body += b" " * (target - total)
    return struct.pack("<Q", len(body)) + body


def _corrupt(file: str, what: str, entry: str | None = None) -> CorruptCheckpoint:
    where = f"{file}, entry {entry!r}" if entry else file
    return CorruptCheckpoint(
        f"{where}: {what}. The shard is damaged or not a dist_ckpt shard; restore it from a "
        "copy or load an earlier checkpoint (`dist-ckpt verify` checks a whole run)."
    )


def header_length(prefix: bytes, file: str, file_size: int) -> int:
    """Total header size (8 + n) from the first 8 bytes, checked before any allocation."""
    if file_size < 8 or len(prefix) < 8:
        raise _corrupt(file, f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise _corrupt(file, f"declared header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise _corrupt(file, f"declared header length {n} runs past the end of the {file_size}-byte file")
    return 8 + n


def parse_header(raw: bytes, file: str, file_size: int) -> ShardHeader:
    """Parse and check a header (``raw`` starts at byte 0 and holds at least the header)."""
    hlen = header_length(raw, file, file_size)
    if len(raw) < hlen:
        raise _corrupt(file, f"header truncated: {len(raw)} of {hlen} bytes")
    try:
        doc = json.loads(raw[8:hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _corrupt(file, f"header is not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise _corrupt(file, "header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    extra: dict[str, Any] = {}
    if isinstance(meta, dict) and META_KEY in meta:
        try:
            extra = json.loads(meta[META_KEY])
        except (TypeError, json.JSONDecodeError, RecursionError) as e:
            raise _corrupt(file, f"__metadata__[{META_KEY!r}] is not valid JSON ({e})") from e
        if not isinstance(extra, dict):
            raise _corrupt(file, f"__metadata__[{META_KEY!r}] is not a JSON object")
    data_len = file_size - hlen
    entries: dict[str, EntryInfo] = {}
    for name, spec in doc.items():
        entries[name] = _parse_entry(file, name, spec, extra.get("entries", {}).get(name), hlen, data_len)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _corrupt(file, f"data of entries {n0!r} and {n1!r} overlap", n1)
    return ShardHeader(file=file, header_len=hlen, file_size=file_size, entries=entries)


def _int_list(value: Any) -> list[int] | None:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        return None
    return value


def _parse_entry(file: str, name: str, spec: Any, extra: Any, hlen: int, data_len: int) -> EntryInfo:
    if not isinstance(spec, dict):
        raise _corrupt(file, "entry is not a JSON object", name)
    dtype, shape, offsets = spec.get("dtype"), _int_list(spec.get("shape")), _int_list(spec.get("data_offsets"))
    if dtype not in BY_SAFETENSORS:
        raise _corrupt(file, f"unknown dtype {dtype!r}", name)
    if shape is None or offsets is None or len(offsets) != 2:
        raise _corrupt(file, "shape or data_offsets is not a list of non-negative integers", name)
    begin, end = offsets
    if not begin <= end <= data_len:
        raise _corrupt(file, f"data_offsets {offsets} lie outside the {data_len}-byte data region", name)
    stored = end - begin
    if math.prod(shape) * BY_SAFETENSORS[dtype].itemsize != stored:
        raise _corrupt(file, f"{stored} stored bytes do not match dtype {dtype} and shape {shape}", name)
    if extra is None:
        return EntryInfo(name, dtype, tuple(shape), hlen + begin, hlen + end)
    if not isinstance(extra, dict):
        raise _corrupt(file, "per-entry metadata is not a JSON object", name)
    kind = extra.get("kind", "tensor")
    codec = extra.get("codec", "none")
    if kind not in ("tensor", "json") or not isinstance(codec, str):
        raise _corrupt(file, f"bad kind {kind!r} or codec {codec!r}", name)
    if codec == "none":
        return EntryInfo(name, dtype, tuple(shape), hlen + begin, hlen + end, kind=kind)
    real_dtype, real_shape = extra.get("dtype"), _int_list(extra.get("shape"))
    if real_dtype not in BY_SAFETENSORS or real_shape is None:
        raise _corrupt(file, f"codec {codec!r} entry lacks a valid real dtype/shape", name)
    chunks, refs = parse_chunk_table(extra.get("chunks"), lambda what: _corrupt(file, what, name))
    if any(r > MAX_CHUNK_RAW_BYTES for r, _ in chunks):
        raise _corrupt(file, f"a chunk declares more than {MAX_CHUNK_RAW_BYTES} raw bytes", name)
    own = sum(s for (_, s), ref in zip(chunks, refs or (None,) * len(chunks)) if ref is None)
    if own != stored:
        raise _corrupt(file, f"chunk table covers {own} bytes, entry holds {stored}", name)
    raw_total = math.prod(real_shape) * BY_SAFETENSORS[real_dtype].itemsize
    if sum(r for r, _ in chunks) != raw_total:
        raise _corrupt(
            file, f"chunk table holds {sum(r for r, _ in chunks)} raw bytes, dtype and shape need {raw_total}", name
        )
    return EntryInfo(
        name, real_dtype, tuple(real_shape), hlen + begin, hlen + end, codec=codec, kind=kind, chunks=chunks, refs=refs
    )


def parse_chunk_table(
    rows: Any, corrupt: Callable[[str], CorruptCheckpoint]
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[str, int] | None, ...]]:
    """``(chunks, refs)`` of a header's chunk table (``refs`` empty when every chunk is here)."""
    from dist_ckpt.references import check_reference

    if not isinstance(rows, list):
        raise corrupt("chunk table is not a list of [raw_len, stored_len] pairs")
    chunks: list[tuple[int, int]] = []
    refs: list[tuple[str, int] | None] = []
    for row in rows:
        ok = isinstance(row, list) and len(row) in (2, 4) and all(type(v) is int and v >= 0 for v in row[:2])
        if ok and len(row) == 4:
            ok = isinstance(row[2], str) and bool(row[2]) and type(row[3]) is int and row[3] >= 0
        if not ok:
            raise corrupt("chunk table is not a list of [raw_len, stored_len(, file, offset)] rows")
        chunks.append((row[0], row[1]))
        if len(row) == 4:
            if "/" in row[2]:
                try:
                    check_reference(row[2], "chunk table")
                except CorruptCheckpoint as e:
                    raise corrupt(str(e)) from e
            elif row[2] in (".", "..") or "\\" in row[2]:
                raise corrupt(f"chunk file {row[2]!r} refused")
            refs.append((row[2], row[3]))
        else:
            refs.append(None)
    return tuple(chunks), (tuple(refs) if any(r is not None for r in refs) else ())
