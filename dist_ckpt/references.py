"""File references of incremental checkpoints (torch-free: the command line reads them).

An incremental checkpoint's file table (metadata.json) lists its own files by bare name
(``rank_00000.safetensors``) and the files of earlier checkpoints it reads entries from by
their path relative to the *run root*, the folder holding the checkpoint folders
(``step_000000003/rank_00000.safetensors``): exactly one folder and one file name, never
``..``, ``.`` or an absolute path, so nothing outside the run root is ever read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dist_ckpt.errors import CorruptCheckpoint
from storage_backends import join_key


def is_reference(name: str) -> bool:
    """Whether a file-table name is a referenced file of another checkpoint folder."""
    return "/" in name


def check_reference(name: str, where: str = "metadata.json") -> str:
    """``name`` if it is a well-formed run-root-relative reference; :class:`CorruptCheckpoint`
    naming ``where`` if not."""
    from storage_backends.base import validate_key
    from storage_backends.errors import UnsafeKey

    try:
        validate_key(name)
    except UnsafeKey as e:
        raise CorruptCheckpoint(f"{where}: referenced file {name!r} refused: {e}") from e
    parts = name.split("/")
    if len(parts) != 2:
        raise CorruptCheckpoint(
            f"{where}: referenced file {name!r} must be '<checkpoint folder>/<file>' relative to the run root"
        )
    return name


def run_parent(prefix: str) -> str:
    """The run root of the checkpoint folder ``prefix`` (a key prefix; "" is the backend root)."""
    prefix = prefix.strip("/")
    return prefix.rsplit("/", 1)[0] if "/" in prefix else ""


def folder_name(prefix: str) -> str:
    return prefix.strip("/").rsplit("/", 1)[-1]


def file_key(prefix: str, name: str) -> str:
    """The backend key of file ``name`` of the checkpoint at ``prefix`` (its own or referenced)."""
    if is_reference(name):
        return join_key(run_parent(prefix), name)
    return join_key(prefix, name)


def check_references(prefix: str, names: Iterable[str], where: str) -> None:
    """Every referenced name is well-formed and points into another checkpoint folder."""
    own = folder_name(prefix)
    for name in names:
        if is_reference(name):
            check_reference(name, where)
            if name.split("/", 1)[0].split(".tmp-", 1)[0] == own.split(".tmp-", 1)[0]:
                raise CorruptCheckpoint(f"{where}: referenced file {name!r} is in this checkpoint's own folder")


def own_and_logical_bytes(files: Mapping[str, Any]) -> tuple[int, int]:
    """Bytes of the checkpoint's own files, and of every file it reads (own + referenced)."""
    own = sum(r.size for n, r in files.items() if not is_reference(n))
    return own, sum(r.size for r in files.values())


def marked_keys(folder: str, files: Iterable[str]) -> set[str]:
    """Run-root keys a committed checkpoint in ``folder`` needs kept (its referenced files; its
    own folder is kept whole while it is committed)."""
    return {join_key(run_parent(folder), n) for n in files if is_reference(n)}
