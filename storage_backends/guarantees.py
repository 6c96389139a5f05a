"""Whether a store enforces the conditional writes the commit protocol rests on.

The commit protocol (``COMMITTED`` with :meth:`ConditionalWrites.create_if_absent`), the manifest's
compare-and-swap and the run lock are only safe if the store *refuses* a conditional write
whose condition does not hold. On S3 these are ``If-None-Match: *`` and ``If-Match: <etag>``;
AWS S3 enforces both (since 2024), but some S3-compatible servers and gateways accept the
headers and silently ignore them — then two writers can both "win" a step or a pointer update
and nothing says so.

:func:`write_guarantees` tells which of the two a backend enforces. Backends whose conditional
writes are atomic by construction (local disk and NFS: ``O_EXCL`` creates and locked renames)
are not probed; a backend that offers a ``write_guarantees()`` method (:class:`S3Backend`) is
asked, and probes the real server once (see :func:`probe_conditional_writes`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from storage_backends.base import Backend, Versioned
from storage_backends.errors import BackendError, ObjectExists, PreconditionFailed

log = logging.getLogger(__name__)

PROBE_PREFIX = ".dist-ckpt-probe"
"""Reserved folder inside the run root for probe objects; each probe deletes its own."""

CREATE_IF_ABSENT = "If-None-Match: * (create-if-absent: a create over an existing object must be refused with 412)"
COMPARE_AND_SWAP = "If-Match: <etag> (compare-and-swap: a put with a stale ETag must be refused with 412)"


@dataclass(frozen=True)
class WriteGuarantees:
    """What a store enforces. ``where`` names it for humans (e.g. ``bucket 'b' at endpoint
    http://host:port``); ``probed`` is False where nothing had to be asked (local backends)."""

    where: str
    create_if_absent: bool
    compare_and_swap: bool
    probed: bool = True

    @property
    def missing(self) -> tuple[str, ...]:
        """The guarantees the store does not give, described (empty when all are enforced)."""
        return tuple(
            name
            for name, ok in ((CREATE_IF_ABSENT, self.create_if_absent), (COMPARE_AND_SWAP, self.compare_and_swap))
            if not ok
        )

    @property
    def enforced(self) -> bool:
        return self.create_if_absent and self.compare_and_swap


@runtime_checkable
class KnowsWriteGuarantees(Protocol):
    """A backend whose conditional writes depend on a server it must ask (S3)."""

    def write_guarantees(self) -> WriteGuarantees: ...


def write_guarantees(backend: Backend) -> WriteGuarantees:
    """The conditional-write guarantees of ``backend``: asked of backends that can tell (S3
    probes the server once per endpoint and bucket in a process); assumed for the others,
    whose ``create_if_absent``/``compare_and_swap`` are atomic by their own implementation.
    Raises :class:`BackendError` when the probe cannot run (a missing bucket, no permission)."""
    if isinstance(backend, KnowsWriteGuarantees):
        return backend.write_guarantees()
    return WriteGuarantees(where=backend.uri, create_if_absent=True, compare_and_swap=True, probed=False)


def _stale_version(current: str) -> str:
    """An ETag-shaped version token that is certainly not ``current``."""
    for digit in "f0":
        candidate = '"' + digit * 32 + '"'
        if candidate != current:
            return candidate
    raise AssertionError("unreachable")


def _current_version(backend: Backend, key: str, where: str) -> Versioned:
    current = backend.read_versioned(key)
    if current is None:
        raise BackendError(f"{backend.uri}/{key}: the probe object vanished while probing {where}", key=key)
    return current


def probe_conditional_writes(backend: Backend, where: str) -> WriteGuarantees:
    """Check with real writes, through the backend's own methods, that the store refuses
    (1) a create-if-absent of an existing object and (2) a compare-and-swap with a stale
    version — and still accepts one with the current version. Uses one object below
    :data:`PROBE_PREFIX` in the backend's root and deletes it; about seven small requests."""
    key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    backend.write_bytes(key, b"probe: first")
    try:
        try:
            backend.create_if_absent(key, b"probe: created over an existing object")
            create_refused = False
        except ObjectExists:
            create_refused = True
        current = _current_version(backend, key, where)
        try:
            backend.compare_and_swap(key, b"probe: swapped with a stale version", _stale_version(current.version))
            cas_refused = False
        except PreconditionFailed:
            cas_refused = True
        current = _current_version(backend, key, where)
        try:
            backend.compare_and_swap(key, b"probe: swapped with the current version", current.version)
        except PreconditionFailed as e:
            raise BackendError(
                f"{where} refused a compare-and-swap (If-Match) with the object's current version "
                f"{current.version}: the manifest and the run lock could never be updated there",
                key=key,
                code=e.code,
            ) from e
    finally:
        try:
            backend.delete(key)
        except BackendError:
            log.warning("could not delete the probe object %s/%s", backend.uri, key, exc_info=True)
    result = WriteGuarantees(where=where, create_if_absent=create_refused, compare_and_swap=cas_refused)
    log.debug("conditional writes of %s: %s", where, result)
    return result
