"""``--unsafe-single-writer`` of the writing subcommands (copy, prune, gc) and the check they
run before writing: the destination store must enforce conditional writes (see
:mod:`dist_ckpt.write_guard`)."""

from __future__ import annotations

import argparse

from dist_ckpt.write_guard import require_conditional_writes
from storage_backends import Backend

FLAG = "--unsafe-single-writer"


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        FLAG,
        action="store_true",
        help="write even if the S3 server ignores conditional writes (If-None-Match/If-Match); only "
        "safe while no other job writes the run (logged as a warning)",
    )


def require_safe_writes(args: argparse.Namespace, backend: Backend) -> None:
    """Refuse (StorageError, exit 4) to write through a store that ignores conditional writes."""
    require_conditional_writes(backend, unsafe_single_writer=bool(args.unsafe_single_writer), opt_in=FLAG)
