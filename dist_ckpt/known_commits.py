"""What this process already knows about the incremental checkpoints it wrote, so that the
next save and retention need not read them back (issue 16: an incremental save of a full
fine-tune must cost about what a plain save costs).

Each incremental checkpoint's ``COMMITTED`` marker names the save attempt that wrote it
(``attempt``, a fresh random id per save: see ``DistCkptWriter.prepare_global_plan``). What is
remembered here is keyed by that attempt and used only when the marker found in storage *now*
names the same attempt: a marker naming attempt A exists only if attempt A's files are exactly
what was committed, so a remembered value can never describe a failed attempt, another job's
checkpoint of the same step, or a step deleted and saved again. Without a match (another
process wrote it, an older marker without ``attempt``, a restart) the callers read storage.

- :func:`remember_base` / :func:`known_base`: one rank's reusable entries of the checkpoint it
  just wrote (what :func:`dist_ckpt.incremental.load_base` would read back from metadata.json
  and the rank index at the next save). One per run root and rank.
- :func:`remember_references` / :func:`known_references`: the referenced-file names of a
  committed checkpoint's file table (what :func:`dist_ckpt.sweep.marks` would read from its
  metadata.json). A committed checkpoint's file table never changes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

_lock = threading.Lock()
_bases: dict[tuple[str, int], tuple[str, str, Any]] = {}  # (run root URI, rank) -> (folder, attempt, BaseEntries)
_references: dict[str, tuple[bytes, frozenset[str]]] = {}  # COMMITTED URI -> (its bytes, referenced names)
_MAX_REFERENCES = 256  # remembered checkpoints (a run keeps a few; bounded for long-lived processes)


def attempt_of(marker: bytes) -> str | None:
    """The ``attempt`` a ``COMMITTED`` marker names (None: none, or not a JSON object)."""
    try:
        doc = json.loads(marker)
    except ValueError:
        return None
    attempt = doc.get("attempt") if isinstance(doc, dict) else None
    return attempt if isinstance(attempt, str) and attempt else None


def remember_base(run_root: str, rank: int, folder: str, attempt: str, entries: Any) -> None:
    """``rank`` wrote ``entries`` (a ``BaseEntries``) into checkpoint ``folder`` as ``attempt``."""
    with _lock:
        _bases[run_root, rank] = (folder, attempt, entries)


def known_base(run_root: str, rank: int, folder: str, attempt: str | None) -> Any | None:
    """The remembered entries of ``folder`` for ``rank`` if its committed marker names
    ``attempt`` (the caller read it from storage for this save), else None."""
    if attempt is None:
        return None
    with _lock:
        found = _bases.get((run_root, rank))
    if found is None or found[0] != folder or found[1] != attempt:
        return None
    return found[2]


def remember_references(committed_uri: str, marker: bytes, names: Iterable[str]) -> None:
    """The checkpoint whose marker (at ``committed_uri``) is ``marker`` reads files ``names``."""
    if attempt_of(marker) is None:
        return  # no identity to check a later marker against
    with _lock:
        if len(_references) >= _MAX_REFERENCES:
            _references.pop(next(iter(_references)))
        _references[committed_uri] = (bytes(marker), frozenset(names))


def known_references(committed_uri: str, marker: bytes) -> frozenset[str] | None:
    """The remembered file-table names of the checkpoint whose marker now reads ``marker``."""
    if attempt_of(marker) is None:
        return None
    with _lock:
        found = _references.get(committed_uri)
    return found[1] if found is not None and found[0] == marker else None


def forget_all() -> None:
    """Forget everything remembered (what another process knows: nothing)."""
    with _lock:
        _bases.clear()
        _references.clear()
