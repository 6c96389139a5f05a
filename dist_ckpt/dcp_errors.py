"""Turn DCP's failure report into one of our errors, raised once per rank.

DCP gathers every rank's exception (with its stack) into a ``CheckpointException`` whose text
repeats each rank's traceback and message; chained under our error, a 2-rank failure printed
the same message three times per rank inside a long traceback. :func:`raise_from_dcp` raises
our error (:class:`~dist_ckpt.errors.CheckpointError`, the first failing rank's) with a
:class:`RankFailures` as ``__cause__``: still a ``CheckpointException`` holding every rank's
exception and stack in ``failures``, but printed as one line that says where each rank failed.
"""

from __future__ import annotations

import os
from typing import NoReturn

from torch.distributed.checkpoint.api import CheckpointException

from dist_ckpt.errors import CheckpointError, StorageError


class RankFailures(CheckpointException):
    """DCP's per-rank failures (``failures``: rank → (exception, stack)), printed briefly."""

    def __str__(self) -> str:
        parts = []
        for rank, (exc, trace) in sorted(self.failures.items()):
            where = ""
            if trace:
                last = trace[-1]
                where = f" in {last.name} ({os.path.basename(last.filename or '?')}:{last.lineno})"
            parts.append(f"rank {rank}: {type(exc).__name__}{where}")
        return "DCP reported " + "; ".join(parts) + " — the message is below; every rank's stack is in .failures"


def unwrap(e: CheckpointException) -> CheckpointError:
    """Our error for DCP's report: the first rank's CheckpointError, else a StorageError
    naming the first failing rank and its exception."""
    for rank in sorted(e.failures):
        exc = e.failures[rank][0]
        if isinstance(exc, CheckpointError):
            return exc
    rank = min(e.failures)
    exc = e.failures[rank][0]
    err = StorageError(f"checkpoint failed on rank {rank}: {exc.__class__.__name__}: {exc}")
    err.__cause__ = exc
    return err


def raise_from_dcp(e: CheckpointException) -> NoReturn:
    """Raise :func:`unwrap`'s error at the API boundary. Its own cause (the backend's error a
    StorageError keeps) stays; otherwise DCP's report, as a brief :class:`RankFailures`."""
    err = unwrap(e)
    cause: BaseException = (
        err.__cause__ if err.__cause__ is not None else RankFailures(str(e.args[0]) if e.args else "", e.failures)
    )
    raise err.with_traceback(None) from cause
