"""The backend protocols: bytes in, bytes out. Nothing here knows about torch.

:class:`Backend` is the union of four small seams, each a ``Protocol`` of at most eight
methods: :class:`ReadableStore` (read, read into a buffer, size, exists, list),
:class:`WritableStore` (streaming and whole writes, deletes), :class:`ConditionalWrites`
(create-if-absent, versioned read, compare-and-swap) and :class:`Staging` (staging prefix,
publish, unfinished uploads). :class:`ObjectWriter` is the streaming upload of one object.

A backend is rooted at a URI (``/data/run1``, ``file:///data/run1``, ``s3://bucket/runs/run1``)
and addresses objects by *keys*: ``/``-separated relative paths such as
``step_000001000/rank_00000.safetensors``. Keys never start with ``/`` and never contain ``..``
segments; backends refuse such keys with :class:`UnsafeKey` so that nothing is read or written
outside the root.

Call order of a checkpoint commit (see DESIGN.md, "Commit protocol"):

1. The coordinator picks a *staging prefix* for the step with :meth:`Staging.staging_prefix`
   (local: ``step_X.tmp-<attempt>``; S3: ``step_X`` itself, since uploads are invisible until
   complete).
2. Every rank writes its shard files below that prefix with :meth:`WritableStore.open_writer`; each
   object becomes visible only when its writer's ``commit()`` returns, and is durable then.
3. The coordinator writes ``metadata.json`` and then ``COMMITTED`` with
   :meth:`ConditionalWrites.create_if_absent`, and calls :meth:`Staging.publish` to move the staging
   prefix to its final name (local: fsync + rename + fsync parent; S3: nothing to do).
4. The coordinator updates ``manifest.json`` with :meth:`ConditionalWrites.read_versioned` and
   :meth:`ConditionalWrites.compare_and_swap`.

All methods may be called from several threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from storage_backends.errors import UnsafeKey


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key relative to the backend root and its size in bytes."""

    key: str
    size: int


@dataclass(frozen=True)
class Versioned:
    """A small object's content with an opaque version token for :meth:`ConditionalWrites.compare_and_swap`."""

    data: bytes
    version: str


@runtime_checkable
class ObjectWriter(Protocol):
    """A streaming upload of one object. Memory use stays bounded whatever the object's size.

    ``reserve_head`` bytes (given to :meth:`WritableStore.open_writer`) are left at the start of the
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
class ReadableStore(Protocol):
    """Reads of a run root's objects: what restoring, verifying and listing need.

    ``read_into`` is required (no probing for it): it reads straight into the caller's buffer,
    e.g. a tensor's memory, without an intermediate bytes object."""

    uri: str
    """The root URI this backend was opened on, normalised (no trailing ``/``)."""

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes from ``start`` (to the end when ``length`` is None).
        Raises :class:`ObjectNotFound`; a range past the end returns what exists."""
        ...

    def read_into(self, key: str, start: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes at ``start`` into ``out``; returns the count read (short at
        the end of the object, 0 at or past it). Raises :class:`ObjectNotFound`."""
        ...

    def size(self, key: str) -> int:
        """Size of ``key`` in bytes; raises :class:`ObjectNotFound`."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive), sorted by key."""
        ...


@runtime_checkable
class WritableStore(Protocol):
    """Plain writes and deletes of objects (no conditions: see :class:`ConditionalWrites`)."""

    def open_writer(self, key: str, *, reserve_head: int = 0) -> ObjectWriter:
        """Start a streaming write of ``key``; an existing object is replaced on commit."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small object whole (durable when this returns)."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object below ``prefix`` (a ``/``-terminated folder); returns the count."""
        ...


@runtime_checkable
class ConditionalWrites(Protocol):
    """The atomic operations of the commit protocol, the manifest and the run lock. Only as
    safe as the store's enforcement of them: see :mod:`storage_backends.guarantees`."""

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


@runtime_checkable
class Staging(Protocol):
    """Staging a folder and publishing it under its final name (the model is Orbax's
    ``TemporaryPath``: create, write into it, finalize), and cleaning up what a killed writer
    left unfinished."""

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


@runtime_checkable
class Backend(ReadableStore, WritableStore, ConditionalWrites, Staging, Protocol):
    """Storage for one run root: every seam above, nothing of its own. See the module
    docstring for the commit call order. Code that needs only one seam (a reader, say) should
    name that one."""


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative key; raise :class:`UnsafeKey` if not."""
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
