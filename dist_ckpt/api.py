"""Low-level ``save`` / ``load`` of a DCP state dict to one checkpoint URI.

``uri`` names one checkpoint folder (``/data/run1/step_000000100``,
``s3://bucket/run1/step_000000100``). With no process group initialised these run in one
process; under ``torchrun`` every rank calls them together (collectives on ``process_group``,
the default group when None).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dist_ckpt import compact_plan
from dist_ckpt.checkpoint_files import split_checkpoint_uri  # noqa: F401 (re-exported: torch-free home)
from dist_ckpt.dcp_errors import raise_from_dcp, unwrap  # noqa: F401 (unwrap re-exported)
from dist_ckpt.errors import ConfigError
from dist_ckpt.format.shard import ChunkCodec
from dist_ckpt.lock_fence import Fence
from dist_ckpt.planner import JsonLoadPlanner, JsonSavePlanner
from dist_ckpt.storage import DistCkptWriter
from dist_ckpt.storage_reader import DistCkptReader
from storage_backends import Backend, open_backend


def resolve_codec(compression: str | ChunkCodec | None, level: int = 1) -> ChunkCodec | None:
    if compression in (None, "none"):
        return None
    if compression == "zstd":
        from dist_ckpt.format.zstd_codec import ZstdCodec

        return ZstdCodec(level=level)
    if isinstance(compression, str):
        raise ConfigError(f"compression={compression!r}: expected 'none' or 'zstd'")
    return compression


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes one process; that is
    exactly what we asked for with ``no_dist=True``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def run_dcp(dcp_call: Callable[..., Any], state_dict: dict[str, Any], *, no_dist: bool | None = None, **kw: Any) -> Any:
    """Run ``dcp.save`` or ``dcp.load`` the one way every caller does: single-process
    (``no_dist``) unless a process group is initialised (or as ``no_dist`` says), without
    DCP's single-process warning, and with DCP's per-rank failure report raised as our error
    (:func:`~dist_ckpt.dcp_errors.raise_from_dcp`)."""
    try:
        with _quiet_single_process():
            return dcp_call(state_dict, no_dist=not _distributed() if no_dist is None else no_dist, **kw)
    except CheckpointException as e:
        raise_from_dcp(e)


def release_codec_buffers() -> None:
    """Free the zstd codec's idle scratch buffers (several times a chunk per thread that encoded
    or decoded; kept between chunks, given back here: at the end of :func:`save` and
    :func:`load` and when a manager closes). A no-op where the codec never ran in this process
    (its module is not even imported for that)."""
    zstd_chunk = sys.modules.get("dist_ckpt.format.zstd_chunk")
    if zstd_chunk is not None:
        zstd_chunk.release_buffers()


def save_to(
    backend: Backend,
    prefix: str,
    state_dict: dict[str, Any],
    *,
    codec: ChunkCodec | None = None,
    commit_info: dict[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    fence: Fence | None = None,
    spread: frozenset[str] = frozenset(),
) -> None:
    writer = DistCkptWriter(backend, prefix, codec=codec, commit_info=commit_info, fence=fence)
    agree = compact_plan.agreement(process_group) if _distributed() else None
    run_dcp(
        dcp.save,
        state_dict,
        storage_writer=writer,
        planner=JsonSavePlanner(spread=spread, agree=agree),
        process_group=process_group,
    )


def load_from(
    backend: Backend,
    prefix: str,
    state_dict: dict[str, Any],
    *,
    allow_partial_load: bool = False,
    process_group: dist.ProcessGroup | None = None,
    incompatible_hint: str | None = None,
) -> None:
    """``incompatible_hint`` replaces the advice an :class:`IncompatibleCheckpoint` ends with."""
    reader = DistCkptReader(backend, prefix)
    # Read (and check) metadata.json up front: inside dcp.load a failing read_metadata is
    # logged, retried as "rank-local metadata" and replaced by a bare AssertionError, which
    # would hide CheckpointNotFound / CorruptCheckpoint. The reader caches the result.
    reader.read_metadata()
    run_dcp(
        dcp.load,
        state_dict,
        storage_reader=reader,
        planner=JsonLoadPlanner(allow_partial_load=allow_partial_load, hint=incompatible_hint),
        process_group=process_group,
    )


def save(
    state_dict: dict[str, Any],
    uri: str,
    *,
    compression: str | ChunkCodec | None = "none",
    process_group: dist.ProcessGroup | None = None,
    base: str | None = None,
    incremental: bool = False,
    **backend_options: Any,
) -> None:
    """Save ``state_dict`` (tensors, DTensors, JSON-able values) as a committed checkpoint at
    ``uri``. Raises :class:`StepAlreadyExists` if one is committed there already.

    ``base``: the URI of an earlier checkpoint in the same folder (run root): entries whose
    content it already stores are not written again, the new checkpoint refers to them (a
    base that is not committed gives a full save). ``incremental=True`` (implied by ``base``)
    records content hashes, so this checkpoint can be the base of a later one."""
    root, name = split_checkpoint_uri(uri)
    commit_info: dict[str, Any] = {}
    if base is not None or incremental:
        commit_info["incremental"] = "" if base is None else _base_folder(root, base)  # "": no base
    try:
        save_to(
            open_backend(root, **backend_options),
            name,
            state_dict,
            codec=resolve_codec(compression),
            commit_info=commit_info,
            process_group=process_group,
        )
    finally:
        release_codec_buffers()


def _base_folder(root: str, base: str) -> str:
    """The base's folder name; it must be in the same run root (references never leave it)."""
    base_root, base_name = split_checkpoint_uri(base)
    if base_root.rstrip("/") != root.rstrip("/"):
        raise ConfigError(
            f"base={base!r}: the base must be a checkpoint in the same folder as the new one ({root}); "
            "references never leave the run root"
        )
    return base_name


def load(
    state_dict: dict[str, Any],
    uri: str,
    *,
    allow_partial_load: bool = False,
    process_group: dist.ProcessGroup | None = None,
    **backend_options: Any,
) -> None:
    """Load the committed checkpoint at ``uri`` into ``state_dict`` in place (tensors are
    copied into, values replaced), resharding as needed."""
    root, name = split_checkpoint_uri(uri)
    try:
        load_from(
            open_backend(root, **backend_options),
            name,
            state_dict,
            allow_partial_load=allow_partial_load,
            process_group=process_group,
        )
    finally:
        release_codec_buffers()
