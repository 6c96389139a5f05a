"""The ``Backend`` protocol: bytes in, bytes out. Nothing here knows about torch.

A backend is rooted at a URI (``/data/run1``, ``file:///data/run1``, ``s3://bucket/runs/run1``)
and addresses objects by *keys*: ``/``-separated relative paths such as
``step_000001000/rank_00000.safetensors``. Keys never start with ``/`` and never contain ``..``
segments; backends refuse such keys with :class:`UnsafeKey` so that nothing is read or written
outside the root.

Call order of a checkpoint commit (see DESIGN.md, "Commit protocol"):

1. The coordinator picks a *staging prefix* for the step with :meth:`Backend.staging_prefix`
   (local: ``step_X.tmp-<attempt>``; S3: ``step_X`` itself, since uploads are invisible until
   complete).
2. Every rank writes its shard files below that prefix with :meth:`Backend.open_writer`; each
   object becomes visible only when its writer's ``commit()`` returns, and is durable then.
3. The coordinator writes ``metadata.json`` and then ``COMMITTED`` with
   :meth:`Backend.create_if_absent`, and calls :meth:`Backend.publish` to move the staging
   prefix to its final name (local: fsync + rename + fsync parent; S3: nothing to do).
4. The coordinator updates ``manifest.json`` with :meth:`Backend.read_versioned` and
   :meth:`Backend.compare_and_swap`.

All methods may be called from several threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key relative to the backend root and its size in bytes."""

    key: str
    size: int


@dataclass(frozen=True)
class Versioned:
    """A small object's content with an opaque version token for :meth:`Backend.compare_and_swap`."""

    data: bytes
    version: str


@runtime_checkable
class ObjectWriter(Protocol):
    """A streaming upload of one object. Memory use stays bounded whatever the object's size.

    ``reserve_head`` bytes (given to :meth:`Backend.open_writer`) are left at the start of the
    object; their content is passed to :meth:`commit` once known (a file header whose values
    depend on the data written after it). Nothing is visible under the key before ``commit()``
    returns; after ``abort()`` nothing is left behind.
    """

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` after the reserved head and everything written so far."""
        ...

    def commit(self, head: bytes = b"") -> int:
        """Fill the reserved head (``len(head)`` must equal ``reserve_head``), make the object
        durable and visible, and return its total size in bytes."""
        ...

    def abort(self) -> None:
        """Discard everything written; safe to call after a failure or twice."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Storage for one run root. See the module docstring for the commit call order."""

    uri: str
    """The root URI this backend was opened on, normalised (no trailing ``/``)."""

    def open_writer(self, key: str, *, reserve_head: int = 0) -> ObjectWriter:
        """Start a streaming write of ``key``; an existing object is replaced on commit."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small object whole (durable when this returns)."""
        ...

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes from ``start`` (to the end when ``length`` is None).
        Raises :class:`ObjectNotFound`; a range past the end returns what exists."""
        ...

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Read several ``(start, length)`` ranges of one object, possibly in parallel,
        coalescing adjacent ones. Results come back in the order of ``ranges``."""
        ...

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes; raises :class:`ObjectNotFound`."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive), sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object below ``prefix`` (a ``/``-terminated folder); returns the count."""
        ...

    def create_if_absent(self, key: str, data: bytes) -> None:
        """Atomically create a small object; raises :class:`ObjectExists` if it is there."""
        ...

    def read_versioned(self, key: str) -> Versioned | None:
        """Content and version token of a small object, or None when it does not exist."""
        ...

    def compare_and_swap(self, key: str, data: bytes, expected_version: str | None) -> str:
        """Replace ``key`` with ``data`` only if its version is still ``expected_version``
        (``None``: only if it does not exist). Returns the new version; raises
        :class:`PreconditionFailed` when another writer got there first."""
        ...

    def staging_prefix(self, final_prefix: str, attempt: str) -> str:
        """Where the files of ``final_prefix`` are written before :meth:`publish`."""
        ...

    def publish(self, staging_prefix: str, final_prefix: str) -> None:
        """Make a staged folder visible under its final name, durably. Raises
        :class:`ObjectExists` when ``final_prefix`` already holds objects."""
        ...

    def abandoned_uploads(self, prefix: str = "") -> Iterator[str]:
        """Keys of unfinished uploads below ``prefix`` (S3 multipart; local temp files)."""
        ...

    def abort_uploads(self, prefix: str = "") -> int:
        """Remove every unfinished upload below ``prefix``; returns how many."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative key; raise :class:`UnsafeKey` if not."""
    from storage_backends.errors import UnsafeKey

    if not isinstance(key, str) or key == "":
        raise UnsafeKey(f"invalid object key {key!r}: expected a non-empty relative path", key=str(key))
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise UnsafeKey(
            f"refusing object key {key!r}: absolute paths, backslashes and NUL are not allowed; "
            "keys are relative to the run root",
            key=key,
        )
    parts = key.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeKey(
            f"refusing object key {key!r}: '.', '..' and empty segments could leave the run root",
            key=key,
        )
    return key


def join_key(*parts: str) -> str:
    """Join key segments with ``/``, ignoring empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
