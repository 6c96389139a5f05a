"""The commit sequence of one checkpoint, the one place it is written down.

Once every shard file is in the staging prefix: ``metadata.json`` with create-if-absent (of two
jobs racing for a step only one proceeds), the run lock renewed through the fence (a job that
lost the lock makes nothing visible), ``COMMITTED`` with create-if-absent, then publish the
staging prefix under the step's name (local: a rename of ``step_X.tmp-<attempt>``; S3 stages in
place). Nothing of a step is visible to readers before ``COMMITTED``.

Used by the DCP writer's ``finish`` (:mod:`dist_ckpt.storage`), ``dist-ckpt copy``
(:mod:`dist_ckpt.cli.copy`) and the tiers' promotion (:mod:`dist_ckpt.tiers.promote`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dist_ckpt.errors import StepAlreadyExists
from dist_ckpt.layout import COMMITTED, METADATA
from storage_backends import Backend, ObjectExists, join_key

if TYPE_CHECKING:
    from dist_ckpt.lock_fence import Fence


def commit_checkpoint(
    backend: Backend,
    staging: str,
    final: str,
    metadata: bytes,
    committed: bytes,
    *,
    where: str,
    fence: Fence | None = None,
    idempotent: bool = False,
    on_written: Callable[[str], None] | None = None,
) -> None:
    """Commit the checkpoint staged at ``staging`` as ``final`` (see the module docstring).

    ``where``: the checkpoint's URI, for messages. ``fence``: the run lock, renewed right before
    ``COMMITTED`` (and when ``metadata.json`` exists already: a job that lost the lock is told
    so, not "step exists"). ``idempotent``: finding ``metadata.json``/``COMMITTED`` already
    there with the same bytes, or the step published with the same ``COMMITTED``, is an earlier
    run of this same commit (a restarted promotion, another node), not a conflict.
    ``on_written(name)`` is called after each of ``metadata.json`` and ``COMMITTED`` is durable
    (a caller that rolls back on failure must never remove a committed step's files).

    Raises :class:`StepAlreadyExists` when another job saved the step first (a staging prefix
    of our own is then removed); backend errors propagate unwrapped (callers name the step).
    """

    def create(name: str, data: bytes, conflict: str) -> None:
        key = join_key(staging, name)
        try:
            backend.create_if_absent(key, data)
        except ObjectExists as e:
            if idempotent and backend.read(key) == data:
                return
            if idempotent:
                raise StepAlreadyExists(f"{where}: another job committed a different checkpoint of this step") from e
            if fence is not None and name == METADATA:
                fence.check(backend, f"committing {where}")  # RunLocked rather than "step exists"
            raise StepAlreadyExists(conflict) from e
        if on_written is not None:
            on_written(name)

    create(
        METADATA,
        metadata,
        f"{where}: another job is saving or has saved this step (or an interrupted save left its files: "
        "`dist-ckpt gc` the run)",
    )
    if fence is not None:
        fence.check(backend, f"committing {where}")
    create(COMMITTED, committed, f"{where} was committed by another job first")
    try:
        backend.publish(staging, final)
    except ObjectExists as e:
        # Someone published this step first. Our staging prefix is ours alone unless the
        # backend stages in place (S3): then its files may be the winner's, and stay.
        same = idempotent and backend.read(join_key(final, COMMITTED)) == committed
        if staging != final and (same or not idempotent):
            backend.delete_prefix(staging + "/")
        if same:
            return
        raise StepAlreadyExists(f"{where} was committed by another job first") from e
