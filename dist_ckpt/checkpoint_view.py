"""What a URI names (:func:`locate`: a run root or one committed checkpoint), and reading one
committed checkpoint offline (no process group, any world size and codec).

:class:`CheckpointView` gives back what is stored — keys, shapes, dtypes, stored values — and
*full* tensors, each assembled from its chunks across the rank files (``metadata.json`` records
every chunk's offsets and sizes). ``dist-ckpt inspect``, ``diff`` and ``export`` read through
it; every command finds its target with :func:`locate`. Only :meth:`CheckpointView.tensor`
needs torch (imported there), so listing and inspecting a checkpoint start without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from dist_ckpt.checkpoint_files import (
    COMMITTED,
    METADATA,
    read_checkpoint_metadata,
    split_checkpoint_uri,
    wrap_backend_error,
)
from dist_ckpt.commit_record import CommitRecord
from dist_ckpt.errors import CheckpointNotFound, ConfigError, CorruptCheckpoint
from dist_ckpt.format import json_values
from dist_ckpt.format.dtypes import dtype_from_name
from dist_ckpt.format.metadata_json import CheckpointMetadata, EntryRef, TensorRecord
from dist_ckpt.format.shard import ShardReader
from dist_ckpt.progress import KEY, Progress
from dist_ckpt.references import file_key
from dist_ckpt.run_store import MANIFEST
from storage_backends import Backend, BackendError, ObjectNotFound, join_key, open_backend

if TYPE_CHECKING:
    import torch


class CheckpointView:
    """One committed checkpoint, read without a process group."""

    def __init__(self, backend: Backend, prefix: str):
        self.backend, self.prefix = backend, prefix.strip("/")
        self.uri = f"{backend.uri}/{self.prefix}"
        self.meta: CheckpointMetadata = read_checkpoint_metadata(backend, self.prefix)
        self._readers: dict[str, ShardReader] = {}

    @classmethod
    def open(cls, uri: str) -> CheckpointView:
        """The committed checkpoint at ``uri`` (a path or ``s3://`` URI of its folder)."""
        root, name = split_checkpoint_uri(uri)
        try:
            backend = open_backend(root)
        except ValueError as e:
            raise ConfigError(f"{uri}: {e}") from e
        return cls(backend, name)

    # -- what is stored ---------------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorRecord]:
        return self.meta.tensors

    @property
    def values(self) -> list[str]:
        return list(self.meta.values)

    def refs(self, fqn: str) -> list[EntryRef]:
        """Where the chunks (or the value) of ``fqn`` are stored."""
        if fqn in self.meta.tensors:
            return [self.meta.resolve(c.ref) for c in self.meta.tensors[fqn].chunks]
        return [self.meta.values[fqn]]

    def committed_info(self) -> dict[str, Any]:
        """The ``COMMITTED`` marker's document, as written ({} when there is none)."""
        try:
            data = self.backend.read(join_key(self.prefix, COMMITTED))
        except ObjectNotFound:
            return {}
        except BackendError as e:
            raise wrap_backend_error(e, self.uri) from e
        return dict(CommitRecord.from_json(data, f"{self.uri}/{COMMITTED}").document)

    # -- reading ----------------------------------------------------------------------------
    def _reader(self, file: str) -> ShardReader:
        if file not in self._readers:
            try:
                self._readers[file] = ShardReader(self.backend, file_key(self.prefix, file), self.meta.files[file].size)
                self._readers[file].files = self.meta.files  # reused zstd chunks must be in listed files
            except BackendError as e:
                raise wrap_backend_error(e, f"{self.uri}/{file}") from e
        return self._readers[file]

    def _read_entry(self, ref: EntryRef) -> memoryview:
        try:
            ref = self.meta.resolve(ref)  # format 2: checksum from the file's rank index
            return self._reader(ref.file).read(ref.entry, checksum=ref.checksum)
        except BackendError as e:
            raise wrap_backend_error(e, f"{self.uri}/{ref.file}") from e

    def raw_value(self, fqn: str) -> bytes:
        """A stored non-tensor value's JSON bytes (checksum verified)."""
        return bytes(self._read_entry(self.meta.values[fqn]))

    def value(self, fqn: str) -> Any:
        """A stored non-tensor value, decoded from JSON (never unpickled)."""
        return json_values.decode(self.raw_value(fqn), f"{self.uri}/{self.meta.values[fqn].file}: value {fqn!r}")

    def progress(self) -> Progress | None:
        """The manager's progress record (step, metrics, config, tracked objects, run id), or
        None for a checkpoint written by the low-level ``dist_ckpt.save``."""
        if KEY not in self.meta.values:
            return None
        text = self.value(KEY)
        if not isinstance(text, str):
            raise CorruptCheckpoint(f"{self.uri}: value {KEY!r} is not the manager's progress record")
        return Progress.decode(text, f"{self.uri}/{self.meta.values[KEY].file}: {KEY}")

    def tensor(self, fqn: str) -> torch.Tensor:
        """The full tensor ``fqn``, assembled from its chunks (whatever rank wrote each)."""
        import torch

        md = self.meta.tensors[fqn]
        dtype = dtype_from_name(md.dtype, f"{self.uri}: tensor {fqn!r}")
        full = torch.empty(md.size, dtype=dtype)
        covered = 0
        for chunk in md.chunks:
            n = math.prod(chunk.sizes)
            if n == 0:
                continue
            ref = chunk.ref
            data = self._read_entry(ref)
            expected = n * full.element_size()
            if len(data) != expected:
                raise CorruptCheckpoint(
                    f"{self.uri}/{ref.file}, entry {ref.entry!r}: {len(data)} bytes, chunk {list(chunk.sizes)} "
                    f"of {dtype} needs {expected}"
                )
            piece = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(chunk.sizes)
            full[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = piece
            covered += n
        if covered != full.numel():
            raise CorruptCheckpoint(
                f"{self.uri}: tensor {fqn!r}: its chunks cover {covered} of {full.numel()} elements"
            )
        return full


def locate(uri: str) -> tuple[str, Backend, str]:
    """What ``uri`` names: ``("checkpoint", backend of its parent, folder name)`` for a
    committed checkpoint, ``("run", backend, "")`` for a run root. Raises
    :class:`CheckpointNotFound` for an uncommitted step or an empty/missing location, and
    :class:`ConfigError` for a URI no backend serves. Every command line command starts here."""
    try:
        here = open_backend(uri)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:
        if here.exists(COMMITTED):
            root, name = split_checkpoint_uri(uri)
            return "checkpoint", open_backend(root), name
        # the cheap checks first: a run root almost always has its manifest
        if here.exists(MANIFEST) or here.list("step_"):
            return "run", here, ""
        uncommitted = here.exists(METADATA)
        anything = not uncommitted and bool(here.list(""))
    except BackendError as e:
        raise wrap_backend_error(e, uri) from e
    if uncommitted:
        raise CheckpointNotFound(
            f"{here.uri}: this checkpoint was not committed (no {COMMITTED} marker): an interrupted save, "
            "never loaded; `dist-ckpt gc` on its run removes it"
        )
    if anything:
        raise CheckpointNotFound(
            f"{here.uri}: neither a run root (no {MANIFEST}, no step_* folders) nor a checkpoint (no {COMMITTED})"
        )
    raise CheckpointNotFound(f"{here.uri}: no run or checkpoint here (nothing stored at this location)")
