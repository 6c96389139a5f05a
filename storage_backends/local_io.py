"""File-level primitives of the local backend: ESTALE retries, directory fsync, the run root's
paths (:class:`LocalRoot`), the streaming temp-file writer, and the ``O_EXCL`` lock file used by
compare-and-swap. See :mod:`storage_backends.local` for the durability rules they implement.

The writer and the lock file are handed a :class:`LocalRoot`, not the backend: this module
never imports :mod:`storage_backends.local`."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from storage_backends.base import validate_key
from storage_backends.errors import BackendError, ObjectNotFound

log = logging.getLogger(__name__)

T = TypeVar("T")
PART_MARK = ".part-"
STAGING_MARK = ".tmp-"  # staging_prefix(): step_X.tmp-<attempt>
ESTALE_RETRIES = 5


def retry_estale(fn: Callable[[], T]) -> T:
    for attempt in range(ESTALE_RETRIES):
        try:
            return fn()
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == ESTALE_RETRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalRoot:
    """A run root's directory: key → path, staging-folder test, durable ``mkdir -p``, and
    ``OSError`` → :class:`BackendError` naming the file."""

    def __init__(self, root: str, *, fsync: bool):
        self.root = root
        self.fsync = fsync

    def path_of(self, key: str) -> str:
        validate_key(key)
        return os.path.join(self.root, *key.rstrip("/").split("/"))

    def in_staging(self, path: str) -> bool:
        """Whether ``path`` (a file or directory) lies in a staging folder (``*.tmp-<attempt>``).

        Nothing there is read before ``publish``, which syncs the staging folder's
        directories before renaming it into place; so writes inside it skip their own directory
        syncs (each file's data is still fsynced). A save then costs two directory syncs,
        not one per file."""
        rel = os.path.relpath(path, self.root)
        return not rel.startswith("..") and any(STAGING_MARK in part for part in rel.split(os.sep))

    def make_dirs(self, path: str) -> None:
        """Create ``path`` and missing parents, fsyncing each parent so the entries survive a crash."""
        missing: list[str] = []
        p = path
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            if self.fsync and not self.in_staging(d):
                fsync_dir(os.path.dirname(d))

    def wrap(self, e: OSError, key: str, op: str) -> BackendError:
        """``e`` as the :class:`BackendError` (ENOENT: :class:`ObjectNotFound`) to raise ``from e``."""
        if isinstance(e, BackendError):
            return e
        if e.errno == errno.ENOENT:
            return ObjectNotFound(f"{os.path.join(self.root, key)}: not found ({op})", key=key, code="ENOENT")
        code = errno.errorcode.get(e.errno or 0, str(e.errno))
        return BackendError(
            f"{op} of {os.path.join(self.root, key)} failed: {e.strerror or e} [{code}]", key=key, code=code
        )


class LocalWriter:
    """Streams one object into a temp file; ``commit`` patches the head, fsyncs and renames."""

    def __init__(self, root: LocalRoot, key: str, reserve_head: int):
        self._root = root
        self._key = key
        self._final = root.path_of(key)
        self._reserve = reserve_head
        root.make_dirs(os.path.dirname(self._final))
        name = os.path.basename(self._final)
        self._tmp = os.path.join(os.path.dirname(self._final), f".{name}{PART_MARK}{uuid.uuid4().hex[:12]}")
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._size = reserve_head
        if reserve_head:
            os.lseek(self._fd, reserve_head, os.SEEK_SET)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            raise BackendError(f"write to {self._key!r} after commit/abort", key=self._key)
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._size += written
        except OSError as e:
            self.abort()
            raise self._root.wrap(e, self._key, "write") from e

    def commit(self, head: bytes = b"") -> int:
        if self._fd is None:
            raise BackendError(f"commit of {self._key!r} after commit/abort", key=self._key)
        if len(head) != self._reserve:
            self.abort()
            raise BackendError(
                f"head of {self._key!r} is {len(head)} bytes, but {self._reserve} were reserved",
                key=self._key,
            )
        fd, self._fd = self._fd, None
        try:
            if head:
                os.pwrite(fd, head, 0)
            if self._root.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(self._tmp, self._final)
            if self._root.fsync and not self._root.in_staging(self._final):
                fsync_dir(os.path.dirname(self._final))
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            self._remove_tmp()
            raise self._root.wrap(e, self._key, "commit") from e
        return self._size

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                log.warning("closing the aborted temp file of %s failed", self._key, exc_info=True)
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class LockFile:
    """An exclusive lock file (``O_CREAT|O_EXCL``) holding ``{"owner", "time"}`` as JSON; one
    older than ``stale_after`` seconds is taken over (its holder is presumed dead)."""

    def __init__(self, root: LocalRoot, key: str, timeout: float, *, stale_after: float):
        self._root = root
        self._key = key
        self._path = root.path_of(key)
        self._timeout = timeout
        self._stale_after = stale_after
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> LockFile:
        deadline = time.monotonic() + self._timeout
        self._root.make_dirs(os.path.dirname(self._path))
        body = json.dumps({"owner": self._owner, "time": time.time()}).encode()
        while True:
            try:
                fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"lock {self._path} is held by another writer ({self._describe_holder()}); "
                        f"waited {self._timeout:.0f}s. If that job is dead, delete the file.",
                        key=self._key,
                        code="Locked",
                    ) from None
                time.sleep(0.01)
                continue
            try:
                # Not fsynced: the exclusion is the atomic O_EXCL create, and the file lives for
                # the milliseconds of one critical section. After a crash a lock file (with or
                # without its body) is stale and taken over by its mtime, as an fsynced one
                # would be; its body only names the holder in messages.
                os.write(fd, body)
            finally:
                os.close(fd)
            return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            log.warning("lock %s vanished while held (taken over as stale?)", self._path)

    def _describe_holder(self) -> str:
        try:
            with open(self._path) as f:
                return f.read(200)
        except OSError:
            return "unknown holder"

    def _take_over_if_stale(self) -> None:
        try:
            age = time.time() - os.stat(self._path).st_mtime
        except FileNotFoundError:
            return
        if age <= self._stale_after:
            return
        aside = f"{self._path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self._path, aside)
        except FileNotFoundError:
            return  # another process took it over first
        log.warning("took over stale lock %s (%.0fs old): %s", self._path, age, self._describe_holder())
        os.unlink(aside)
