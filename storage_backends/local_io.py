"""File-level primitives of the local backend: ESTALE retries, directory fsync, the
streaming temp-file writer, and the ``O_EXCL`` lock file used by compare-and-swap.
See :mod:`storage_backends.local` for the durability rules they implement."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from storage_backends.errors import BackendError

if TYPE_CHECKING:
    from storage_backends.local import LocalBackend

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


class LocalWriter:
    """Streams one object into a temp file; ``commit`` patches the head, fsyncs and renames."""

    def __init__(self, backend: LocalBackend, key: str, reserve_head: int):
        self._backend = backend
        self._key = key
        self._final = backend.path_of(key)
        self._reserve = reserve_head
        backend.make_dirs(os.path.dirname(self._final))
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
            raise self._backend.wrap(e, self._key, "write") from e

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
            if self._backend.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(self._tmp, self._final)
            if self._backend.fsync and not self._backend.in_staging(self._final):
                fsync_dir(os.path.dirname(self._final))
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            self._remove_tmp()
            raise self._backend.wrap(e, self._key, "commit") from e
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
    """An exclusive lock file (``O_CREAT|O_EXCL``) holding ``{"owner", "time"}`` as JSON."""

    def __init__(self, backend: LocalBackend, key: str, timeout: float):
        self._backend = backend
        self._key = key
        self._path = backend.path_of(key)
        self._timeout = timeout
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> LockFile:
        deadline = time.monotonic() + self._timeout
        self._backend.make_dirs(os.path.dirname(self._path))
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
                os.write(fd, body)
                if self._backend.fsync:
                    os.fsync(fd)
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
        if age <= self._backend.lock_stale_after:
            return
        aside = f"{self._path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self._path, aside)
        except FileNotFoundError:
            return  # another process took it over first
        log.warning("took over stale lock %s (%.0fs old): %s", self._path, age, self._describe_holder())
        os.unlink(aside)
