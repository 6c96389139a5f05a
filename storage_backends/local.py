"""POSIX directories: local disks and NFS mounts.

Durability and atomicity rest on the few operations NFS implements faithfully:

- every object is written to a temp file beside its final name, fsynced, then ``rename``d over
  it, and the directory is fsynced — readers see the old object or the whole new one. Inside
  a staging folder (``step_X.tmp-<attempt>``) the directory syncs are left to ``publish``,
  which syncs the folder once before renaming it into place;
- ``create_if_absent`` writes a temp file and ``link``s it to the final name: ``link`` fails
  atomically when the name exists, on local file systems and NFS alike (``O_EXCL`` is only
  reliable on NFSv3+, ``link`` everywhere);
- ``compare_and_swap`` takes an exclusive lock file (``O_CREAT|O_EXCL``, holding owner and
  time as JSON), compares the content hash, renames the new content in, and drops the lock.
  A lock older than ``lock_stale_after`` seconds is taken over: its holder is presumed dead
  (the critical section lasts milliseconds). Takeover renames the stale lock away first, so of
  two processes judging it stale only one wins the rename.

No ``flock``/``fcntl`` locks (unreliable on NFS) and no ``mmap`` (a truncated file would
SIGBUS). ``ESTALE`` — an NFS file handle invalidated by another client's rename — is retried.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Iterator

import xxhash

from storage_backends.base import ObjectInfo, Versioned, validate_key
from storage_backends.errors import BackendError, ObjectExists, ObjectNotFound, PreconditionFailed
from storage_backends.local_io import PART_MARK, STAGING_MARK, LocalRoot, LocalWriter, LockFile, fsync_dir, retry_estale

log = logging.getLogger(__name__)


class LocalBackend:
    """A run root on a POSIX file system (local disk or NFS). See the module docstring."""

    def __init__(self, root: str, *, fsync: bool = True, lock_stale_after: float = 30.0):
        if root.startswith("file://"):
            root = root[len("file://") :]
        self.root = os.path.abspath(root)
        self.uri = self.root
        self.lock_stale_after = lock_stale_after
        self._dir = LocalRoot(self.root, fsync=fsync)

    # -- paths -----------------------------------------------------------------------------
    @property
    def fsync(self) -> bool:
        return self._dir.fsync

    def path_of(self, key: str) -> str:
        """The file of ``key`` (validated: never outside the root)."""
        return self._dir.path_of(key)

    def in_staging(self, path: str) -> bool:
        """Whether ``path`` lies in a staging folder (see :meth:`LocalRoot.in_staging`)."""
        return self._dir.in_staging(path)

    # -- objects ---------------------------------------------------------------------------
    def open_writer(self, key: str, *, reserve_head: int = 0) -> LocalWriter:
        try:
            return LocalWriter(self._dir, key, reserve_head)
        except OSError as e:
            raise self._dir.wrap(e, key, "open for writing") from e

    def write_bytes(self, key: str, data: bytes) -> None:
        writer = self.open_writer(key)
        writer.write(data)
        writer.commit()

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        path = self.path_of(key)

        def _read() -> bytes:
            with open(path, "rb", buffering=0) as f:
                if length is None:
                    f.seek(start)
                    return f.read()
                return os.pread(f.fileno(), length, start)

        try:
            return retry_estale(_read)
        except OSError as e:
            raise self._dir.wrap(e, key, "read") from e

    def read_into(self, key: str, start: int, out: memoryview) -> int:
        """Read ``len(out)`` bytes at ``start`` straight into ``out`` (no intermediate copy)."""
        path = self.path_of(key)

        def _read() -> int:
            # os.open + preadv: no Python file object, a few microseconds per call (readers
            # call this once per piece of an entry).
            fd = os.open(path, os.O_RDONLY)
            try:
                total, want = 0, len(out)
                while total < want:
                    n = os.preadv(fd, [out[total:] if total else out], start + total)
                    if not n:
                        break
                    total += n
                return total
            finally:
                os.close(fd)

        try:
            return retry_estale(_read)
        except OSError as e:
            raise self._dir.wrap(e, key, "read") from e

    def size(self, key: str) -> int:
        try:
            return retry_estale(lambda: os.stat(self.path_of(key)).st_size)
        except OSError as e:
            raise self._dir.wrap(e, key, "stat") from e

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path_of(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if prefix:
            validate_key(prefix)
        base_dir = self.root
        if "/" in prefix:
            base_dir = os.path.join(self.root, *prefix.rsplit("/", 1)[0].split("/"))
        found: list[ObjectInfo] = []
        for dirpath, _dirs, files in retry_estale(lambda: list(os.walk(base_dir))):
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in files:
                key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if not key.startswith(prefix) or PART_MARK in name:
                    continue
                try:
                    found.append(ObjectInfo(key, os.stat(os.path.join(dirpath, name)).st_size))
                except FileNotFoundError:
                    continue  # deleted while listing
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._dir.wrap(e, key, "delete") from e

    def delete_prefix(self, prefix: str) -> int:
        validate_key(prefix)
        if prefix.endswith("/"):
            return self._remove_tree(self.path_of(prefix))
        count = 0
        for obj in self.list(prefix):
            self.delete(obj.key)
            count += 1
        return count

    def _remove_tree(self, path: str) -> int:
        count = 0
        if not os.path.isdir(path):
            return 0
        for dirpath, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(dirpath, name))
                count += 1
            for name in dirs:
                os.rmdir(os.path.join(dirpath, name))
        os.rmdir(path)
        if self.fsync:
            fsync_dir(os.path.dirname(path))
        return count

    # -- small objects: create-if-absent and compare-and-swap -----------------------------
    def create_if_absent(self, key: str, data: bytes) -> None:
        final = self.path_of(key)
        self._dir.make_dirs(os.path.dirname(final))
        tmp = f"{final}{PART_MARK}{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            try:
                os.link(tmp, final)
            except FileExistsError as e:
                raise ObjectExists(f"{final} already exists", key=key, code="EEXIST") from e
            if self.fsync and not self._dir.in_staging(final):
                fsync_dir(os.path.dirname(final))
        except OSError as e:
            raise self._dir.wrap(e, key, "create") from e
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def read_versioned(self, key: str) -> Versioned | None:
        try:
            data = self.read(key)
        except ObjectNotFound:
            return None
        return Versioned(data, xxhash.xxh3_128_hexdigest(data))

    def compare_and_swap(self, key: str, data: bytes, expected_version: str | None) -> str:
        try:
            with self.lock(f"{key}.lock"):
                current = self.read_versioned(key)
                current_version = current.version if current else None
                if current_version != expected_version:
                    raise PreconditionFailed(
                        f"{self.path_of(key)} changed since it was read (expected version "
                        f"{expected_version}, found {current_version})",
                        key=key,
                        code="PreconditionFailed",
                    )
                self.write_bytes(key, data)
        except BackendError:
            raise
        except OSError as e:  # taking or dropping the lock file (read-only or full file system, ...)
            raise self._dir.wrap(e, f"{key}.lock", "compare-and-swap lock") from e
        return xxhash.xxh3_128_hexdigest(data)

    def lock(self, key: str, timeout: float = 30.0) -> LockFile:
        return LockFile(self._dir, key, timeout, stale_after=self.lock_stale_after)

    # -- staging and publishing a step -----------------------------------------------------
    def staging_prefix(self, final_prefix: str, attempt: str) -> str:
        return f"{final_prefix.rstrip('/')}{STAGING_MARK}{attempt}"

    def publish(self, staging_prefix: str, final_prefix: str) -> None:
        staged, final = self.path_of(staging_prefix), self.path_of(final_prefix)
        try:
            if self.fsync:
                # The one directory sync for everything written inside the staging folder.
                for dirpath, _dirs, _files in os.walk(staged):
                    fsync_dir(dirpath)
            if os.path.exists(final):
                raise ObjectExists(f"{final} already exists", key=final_prefix, code="EEXIST")
            os.rename(staged, final)
            if self.fsync:
                fsync_dir(os.path.dirname(final))
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ObjectExists(f"{final} already exists", key=final_prefix, code="EEXIST") from e
            raise self._dir.wrap(e, staging_prefix, "publish") from e

    def abandoned_uploads(self, prefix: str = "") -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in files:
                if PART_MARK in name:
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if key.startswith(prefix):
                        yield key

    def abort_uploads(self, prefix: str = "") -> int:
        keys = list(self.abandoned_uploads(prefix))
        for key in keys:
            self.delete(key)
        self._remove_empty_staging_dirs(prefix)
        return len(keys)

    def _remove_empty_staging_dirs(self, prefix: str) -> None:
        """Staging folders (``step_X.tmp-<attempt>``) left empty by a failed or killed save
        (its temp files aborted, or killed right after the ``mkdir``) hold no object, so no
        listing shows them; they are unfinished uploads too."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in names:
            top = os.path.join(self.root, name)
            if ".tmp-" not in name or not name.startswith(prefix.split("/", 1)[0]) or not os.path.isdir(top):
                continue
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                try:
                    os.rmdir(dirpath)  # only succeeds on an empty folder
                except OSError:
                    continue
