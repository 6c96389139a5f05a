"""Deleting checkpoints without losing shared bytes: mark-and-sweep over the run root.

An incremental checkpoint reads some entries from files in earlier checkpoints' folders
(:mod:`dist_ckpt.references`). So deleting a step (retention, ``dist-ckpt prune``) or removing
leftovers (``gc``) may remove only what no *committed* checkpoint needs:

- **Mark**: every committed checkpoint keeps its own folder whole, plus the referenced files its
  metadata.json lists. Only checkpoints whose ``COMMITTED`` marker names a ``base`` can hold
  references, so a run without incremental saves reads no metadata.json here; nor does this
  process for the checkpoints it committed itself while their marker names the same save
  attempt (:mod:`dist_ckpt.known_commits`).
- **Sweep**: deleting a step removes its ``COMMITTED`` first (the step is no longer a
  checkpoint, and no longer marks anything), then each of its files that no remaining
  committed checkpoint references; referenced files stay in the folder, which is then a
  leftover holding only marked files until the last checkpoint referencing them goes.

Crash-safe at every point: a kill after ``COMMITTED`` is gone leaves an uncommitted folder whose
unmarked files ``gc`` removes later; a file a committed checkpoint references is never deleted,
because the mark is taken from the committed checkpoints after the ``COMMITTED`` removal and
before any other delete. Callers hold the run lock (the manager's rank 0, ``dist-ckpt
prune|gc``), so no other job commits a checkpoint meanwhile; this job's own in-flight save
refers only to files its base (committed, the newest step: retention never drops it) marks.
If a committed checkpoint's metadata.json cannot be read, nothing is swept
(:class:`CorruptCheckpoint`): what it references is unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from dist_ckpt import known_commits
from dist_ckpt.checkpoint_files import COMMITTED, read_checkpoint_metadata
from dist_ckpt.commit_record import CommitRecord
from dist_ckpt.errors import CorruptCheckpoint
from dist_ckpt.layout import STEP_PREFIX
from dist_ckpt.references import is_reference, marked_keys
from storage_backends import Backend

log = logging.getLogger(__name__)


def committed_folders(backend: Backend) -> list[str]:
    """The run root's committed checkpoint folders (``step_*/COMMITTED``)."""
    return sorted(
        o.key.split("/", 1)[0]
        for o in backend.list(STEP_PREFIX)
        if o.key.count("/") == 1 and o.key.endswith("/" + COMMITTED) and ".tmp-" not in o.key
    )


def _marker(backend: Backend, folder: str) -> tuple[bytes, bool]:
    """A committed folder's ``COMMITTED`` bytes, and whether it names a base."""
    where = f"{backend.uri}/{folder}/{COMMITTED}"
    data = backend.read(f"{folder}/{COMMITTED}")
    try:
        return data, CommitRecord.from_json(data, where).base is not None
    except CorruptCheckpoint as e:
        raise CorruptCheckpoint(f"{e}; nothing is deleted while it is unknown which files this checkpoint needs") from e


def marks(backend: Backend) -> set[str]:
    """Keys (run-root relative) outside their own folder that committed checkpoints read."""
    marked: set[str] = set()
    for folder in committed_folders(backend):
        marker, has_base = _marker(backend, folder)
        if not has_base:
            continue
        # the file table of a checkpoint this process committed (its marker, read just now,
        # names the same save attempt) is known: no metadata.json read (dist_ckpt.known_commits)
        where = f"{backend.uri}/{folder}/{COMMITTED}"
        names = known_commits.known_references(where, marker)
        if names is None:
            try:
                names = frozenset(read_checkpoint_metadata(backend, folder).files)
            except CorruptCheckpoint as e:
                raise CorruptCheckpoint(f"{e}; nothing is deleted while it is unknown which files it references") from e
            known_commits.remember_references(where, marker, (n for n in names if is_reference(n)))
        marked |= marked_keys(folder, names)
    return marked


def sweep_folder(backend: Backend, folder: str, marked: set[str]) -> list[str]:
    """Delete every object of an uncommitted ``folder`` not in ``marked``; returns what was
    kept (the folder itself is removed once nothing in it is marked)."""
    objects = [o.key for o in backend.list(folder + "/")]
    kept = [k for k in objects if k in marked]
    if not kept:  # nothing in it is referenced (every non-incremental run): the folder goes whole
        backend.delete_prefix(folder + "/")
        return []
    for key in sorted(objects):  # one by one: a kill between any two deletes leaves a sweepable folder
        if key not in marked:
            backend.delete(key)
    return kept


def delete_checkpoint(backend: Backend, folder: str) -> None:
    """Delete the checkpoint ``folder``: ``COMMITTED`` first, then what no committed checkpoint
    references (see the module docstring)."""
    backend.delete(f"{folder}/{COMMITTED}")
    kept = sweep_folder(backend, folder, marks(backend))
    if kept:
        log.info("%s/%s: kept %d file(s) later checkpoints refer to", backend.uri, folder, len(kept))


def unmarked_folders(backend: Backend, folders: Iterable[str]) -> list[str]:
    """Of uncommitted ``folders``, those holding anything no committed checkpoint references."""
    folders = list(folders)
    if not folders:
        return []
    marked = marks(backend)
    return [f for f in folders if any(o.key not in marked for o in backend.list(f + "/"))]
