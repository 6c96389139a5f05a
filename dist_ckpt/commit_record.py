"""The ``COMMITTED`` marker's content: a typed, validated :class:`CommitRecord`.

The marker is a JSON object: what the saver recorded (``step``, ``epoch``, ``metrics``,
``time``, ``codec`` — a manager's save; nothing for a bare :func:`dist_ckpt.save`; plus keys of
its own such as ``lightning`` or ``imported_from``), then what the DCP writer adds at commit
(``world_size``, ``files``, ``bytes``, ``logical_bytes`` and, for an incremental checkpoint,
``base``). Every reader goes through :meth:`CommitRecord.from_json`, which refuses a damaged
marker naming the file; the writer goes through :meth:`CommitRecord.new`. The document is kept
as written (key order and keys this library does not interpret), so the bytes of a marker are
the same as before this type existed and a record read and written again is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dist_ckpt import manifest as mf
from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.layout import COMMITTED


@dataclass(frozen=True)
class CommitRecord:
    """One checkpoint's ``COMMITTED`` marker (see the module docstring). Build it with
    :meth:`new` or :meth:`from_json`: the typed fields are derived from ``document``."""

    step: int | None
    epoch: int | None
    metrics: Mapping[str, float]
    time: float
    codec: str
    world_size: int
    files: int
    bytes: int
    logical_bytes: int  # own + referenced files (incremental checkpoints); 0: not recorded
    base: str | None  # the base checkpoint's folder (incremental), None for a full save
    document: Mapping[str, Any] = field(repr=False)  # the JSON object, as written

    @classmethod
    def new(
        cls,
        saver_info: Mapping[str, Any],
        *,
        world_size: int,
        files: int,
        bytes: int,
        logical_bytes: int,
        base: str | None = None,
        attempt: str | None = None,
        where: str = COMMITTED,
    ) -> CommitRecord:
        """The record the DCP writer commits: ``saver_info`` (what the saver recorded) first,
        then the writer's own keys — the order the marker has always had."""
        doc: dict[str, Any] = {
            **saver_info,
            "world_size": world_size,
            "files": files,
            "bytes": bytes,
            "logical_bytes": logical_bytes,
        }
        if base is not None:
            doc["base"] = base
        if attempt is not None:  # incremental: identifies the save (dist_ckpt.known_commits)
            doc["attempt"] = attempt
        return cls._from_document(doc, where)

    @classmethod
    def from_json(cls, data: bytes, where: str) -> CommitRecord:
        """Parse a marker's bytes; a damaged one raises :class:`CorruptCheckpoint` naming ``where``
        (the marker's URI)."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CorruptCheckpoint(f"{where}: COMMITTED marker is not valid JSON ({e})") from e
        return cls._from_document(doc, where)

    @classmethod
    def _from_document(cls, doc: dict[str, Any], where: str) -> CommitRecord:
        def field_of(key: str, convert: Any) -> Any:
            try:
                return convert(doc.get(key))
            except (ValueError, TypeError, AttributeError, OverflowError) as e:
                raise CorruptCheckpoint(
                    f"{where}: COMMITTED marker holds an invalid {key!r}: {doc.get(key)!r} ({e}); the marker is "
                    "damaged or was not written by dist_ckpt"
                ) from e

        # The same defaults the readers have always applied to a missing or empty key.
        return cls(
            step=field_of("step", lambda v: None if v is None else int(v)),
            epoch=field_of("epoch", lambda v: None if v is None else int(v)),
            metrics=MappingProxyType(field_of("metrics", lambda v: {str(k): float(x) for k, x in (v or {}).items()})),
            time=field_of("time", lambda v: float(v or 0.0)),
            codec=field_of("codec", lambda v: str(v or "none")),
            world_size=field_of("world_size", lambda v: int(v or 1)),
            files=field_of("files", lambda v: int(v or 0)),
            bytes=field_of("bytes", lambda v: int(v or 0)),
            logical_bytes=field_of("logical_bytes", lambda v: int(v or 0)),
            base=field_of("base", lambda v: str(v) if v else None),
            document=MappingProxyType(doc),
        )

    def to_json(self) -> bytes:
        """The marker's bytes (``json.dumps`` of the document, as always)."""
        return json.dumps(dict(self.document)).encode()

    def self_contained(self, size: int) -> CommitRecord:
        """This record for a copy that holds all its files itself (``dist-ckpt copy`` of an
        incremental checkpoint): no ``base``, own bytes = logical bytes = ``size``."""
        doc = dict(self.document)
        doc.pop("base", None)
        doc["bytes"] = doc["logical_bytes"] = size
        return self._from_document(doc, COMMITTED)

    def entry(self, step: int) -> mf.Entry:
        """The manifest entry of this checkpoint, committed as ``step`` (its folder's step)."""
        return mf.Entry(
            step=step,
            epoch=self.epoch,
            metrics=dict(self.metrics),
            time=self.time,
            size=self.bytes,
            world_size=self.world_size,
            codec=self.codec,
            logical_size=self.logical_bytes,
        )
