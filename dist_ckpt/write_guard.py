"""Refuse to write a run through a store that ignores conditional writes.

Every writer — a writing :class:`~dist_ckpt.CheckpointManager`, ``dist-ckpt copy``, ``prune``
and ``gc`` — calls :func:`require_conditional_writes` before it writes anything. Readers never
do: reading is safe on any store.
"""

from __future__ import annotations

import logging

from dist_ckpt.errors import StorageError
from storage_backends import Backend, BackendError, write_guarantees

log = logging.getLogger(__name__)

_WHY = (
    "The commit protocol (COMMITTED is created with If-None-Match), the manifest's compare-and-swap "
    "and the run lock rely on the server refusing these writes: without that, two jobs writing this "
    "run could both commit one step or overwrite each other's pointer updates, and nothing would say so"
)


def require_conditional_writes(backend: Backend, *, unsafe_single_writer: bool, opt_in: str) -> None:
    """Raise :class:`StorageError` unless ``backend`` enforces create-if-absent and
    compare-and-swap (probed once per S3 bucket; local backends are not probed). With
    ``unsafe_single_writer`` a store that lacks them is used anyway, with a warning each call.
    ``opt_in`` names how the user opts in (the manager option or the CLI flag)."""
    try:
        guarantees = write_guarantees(backend)
    except BackendError as e:
        raise StorageError(f"cannot write the run {backend.uri}: {e}") from e
    if guarantees.enforced:
        return
    missing = "; ".join(guarantees.missing)
    if unsafe_single_writer:
        log.warning(
            "%s does not enforce conditional writes (%s); writing %s anyway because of %s. Only one "
            "job may write this run at a time: the run lock cannot keep a second one out, and a second "
            "writer would go unnoticed",
            guarantees.where,
            missing,
            backend.uri,
            opt_in,
        )
        return
    raise StorageError(
        f"refusing to write {backend.uri}: {guarantees.where} does not enforce conditional writes — "
        f"missing: {missing}. {_WHY}. Use an S3 server that enforces If-None-Match and If-Match "
        f"(AWS S3, or see the README for tested servers), or, if you are sure only one job at a time "
        f"writes this run, opt in with {opt_in} (a warning is logged at every start). Reading the run "
        "(read_only=True, dist-ckpt list/verify/export) works as it is."
    )
