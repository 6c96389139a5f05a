"""The files of one checkpoint folder that readers look at first: ``COMMITTED`` and
``metadata.json`` (their names are defined in :mod:`dist_ckpt.layout`, re-exported here). No
torch here: the command line lists, inspects, verifies and copies checkpoints without
importing it (see :mod:`dist_ckpt.storage` for the DCP writer)."""

from __future__ import annotations

from dataclasses import replace

from dist_ckpt.errors import CheckpointNotFound, ConfigError, CorruptCheckpoint, StorageError
from dist_ckpt.format import metadata_json
from dist_ckpt.format.metadata_json import CheckpointMetadata
from dist_ckpt.format.rank_index import RankIndexes
from dist_ckpt.layout import COMMITTED, METADATA
from storage_backends import Backend, BackendError, ObjectNotFound, join_key, split_uri


def split_checkpoint_uri(uri: str) -> tuple[str, str]:
    """``(root uri, checkpoint folder name)`` of a checkpoint URI."""
    try:
        scheme, rest = split_uri(str(uri))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    rest = rest.rstrip("/")
    if "/" not in rest.strip("/"):
        if scheme == "s3":
            raise ConfigError(f"{uri!r}: expected s3://bucket/path/to/checkpoint (a folder below the bucket)")
        rest = "./" + rest
    parent, name = rest.rsplit("/", 1)
    root = f"s3://{parent}" if scheme == "s3" else (parent or "/")
    return root, name


def wrap_backend_error(e: BaseException, uri: str) -> StorageError:
    return StorageError(f"storage failed at {uri}: {e}")


def read_checkpoint_metadata(backend: Backend, prefix: str) -> CheckpointMetadata:
    """metadata.json of a committed checkpoint; :class:`CheckpointNotFound` if not committed."""
    uri = f"{backend.uri}/{prefix}"
    try:
        if ".tmp-" in prefix.rstrip("/").rsplit("/", 1)[-1]:
            # A staging folder may hold COMMITTED already (crash before the rename): it is
            # still an unpublished attempt, invisible to readers.
            raise CheckpointNotFound(
                f"{uri}: this step was not committed: it is the staging folder of an interrupted "
                "save and is never loaded. Load an earlier checkpoint; `dist-ckpt gc` removes the "
                "leftovers."
            )
        if not backend.exists(join_key(prefix, COMMITTED)):
            if backend.exists(join_key(prefix, METADATA)) or backend.list(prefix + "/"):
                raise CheckpointNotFound(
                    f"{uri}: this step was not committed (no COMMITTED marker): it is an "
                    "interrupted save and is never loaded. Load an earlier checkpoint; "
                    "`dist-ckpt gc` removes the leftovers."
                )
            raise CheckpointNotFound(f"{uri}: no checkpoint here (expected {COMMITTED} and {METADATA})")
        try:
            # refuse an oversized metadata.json before reading (allocating) it: the limit
            # follows from the counts format 2 declares in its first bytes (format 1: fixed)
            size = backend.size(join_key(prefix, METADATA))
            limit = metadata_json.size_limit(backend.read(join_key(prefix, METADATA), 0, min(size, 4096)))
            if size > limit:
                raise CorruptCheckpoint(
                    f"{uri}/{METADATA}: {size} bytes exceeds the {limit}-byte metadata size limit "
                    "(sized from the tensor and rank counts it declares); the file is damaged or was replaced"
                )
            data = backend.read(join_key(prefix, METADATA))
        except ObjectNotFound as e:
            raise CorruptCheckpoint(f"{uri}/{METADATA} is missing although the step is committed") from e
    except BackendError as e:
        raise wrap_backend_error(e, uri) from e
    meta = metadata_json.loads(data, f"{uri}/{METADATA}")
    if meta.format_version == 1:
        return meta
    return replace(meta, indexes=RankIndexes(backend, prefix, meta.files, meta.max_entries()))
