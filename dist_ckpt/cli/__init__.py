"""The ``dist-ckpt`` command line: list, inspect, verify, export, prune, gc, copy, diff, import.

Every subcommand takes run roots and checkpoint folders as local paths or ``s3://`` URIs.
Errors the library raises on purpose (:class:`~dist_ckpt.errors.CheckpointError`) and storage
errors (:class:`~storage_backends.errors.BackendError`) are caught here, at the top only, and
become one line on stderr (``dist-ckpt: error: ...``) and an exit status; anything else is a bug
and keeps its traceback. Subcommands print their own output; the library only logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from dist_ckpt.errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    RunLocked,
    StepAlreadyExists,
    StorageError,
)
from storage_backends.errors import BackendError, ObjectNotFound

__all__ = [
    "main",
    "build_parser",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "EXIT_NOT_FOUND",
    "EXIT_STORAGE",
    "EXIT_CORRUPT",
    "EXIT_CONFLICT",
]

PROG = "dist-ckpt"
EXIT_OK = 0
EXIT_PROBLEMS = 1  # verify found bad files, diff found differences
EXIT_USAGE = 2  # bad arguments or input: unknown option, bad URI scheme, a run where a checkpoint is needed
EXIT_NOT_FOUND = 3  # no run or checkpoint there, or the step is not committed
EXIT_STORAGE = 4  # the storage backend failed (permissions, network, S3 errors)
EXIT_CORRUPT = 5  # a file failed a check while being read (inspect, export, copy, diff)
EXIT_CONFLICT = 6  # the destination step is already committed (copy), or a live job holds the run's lock
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Inspect, verify, export, import and maintain dist_ckpt checkpoints on local disk, NFS or S3.
RUN is a run root (the folder holding manifest.json and step_* folders); CKPT is one
checkpoint folder (RUN/step_000001000). Both may be local paths or s3://bucket/prefix URIs
(S3 credentials and endpoint come from the standard AWS configuration, e.g.
AWS_ENDPOINT_URL_S3 for an S3-compatible server).
"""

EPILOG = f"""\
exit status:
  {EXIT_OK}    success
  {EXIT_PROBLEMS}    verify found damaged or missing files; diff found differences
  {EXIT_USAGE}    usage error or invalid input (bad arguments, unsupported URI scheme, ...)
  {EXIT_NOT_FOUND}    no run or checkpoint at the given location, or the step is not committed
  {EXIT_STORAGE}    storage error (permissions, network, S3)
  {EXIT_CORRUPT}    a checkpoint file failed a check while being read
  {EXIT_CONFLICT}    conflict: the destination step is already committed (never overwritten), or
       another job holds the run's writer lock (prune, gc and copy take it; the error names
       the job and its last heartbeat; --break-lock overrides it, dangerously)
  {EXIT_INTERRUPTED}  interrupted

Progress bars go to stderr, only when it is a terminal; --quiet turns them off.

examples:
  dist-ckpt list /data/runs/exp1
  dist-ckpt verify s3://bucket/runs/exp1
  dist-ckpt export /data/runs/exp1/step_000001000 ./model --dtype bf16
  dist-ckpt <command> --help
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    from dist_ckpt.cli import copy, diff, export, import_cmd, inspect, listing, maintenance, verify
    from dist_ckpt.version import __version__

    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-q", "--quiet", dest="top_quiet", action="store_true", help="no progress bars or notes on stderr"
    )
    parser.add_argument(
        "-v", "--verbose", dest="top_verbose", action="count", default=0, help="log what is done (-vv: debug)"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    common.add_argument("-v", "--verbose", action="count", default=0, help="log what is done (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in (listing, inspect, verify, export, maintenance, copy, diff, import_cmd):
        module.register(sub, common)
    return parser


def _exit_code(e: BaseException) -> int:
    if isinstance(e, CheckpointNotFound | ObjectNotFound):
        return EXIT_NOT_FOUND
    if isinstance(e, StepAlreadyExists | RunLocked):
        return EXIT_CONFLICT
    if isinstance(e, CorruptCheckpoint):
        return EXIT_CORRUPT
    if isinstance(e, StorageError | BackendError):
        return EXIT_STORAGE
    return EXIT_USAGE


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (main() may run inside a test harness)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dist-ckpt`` console script; returns the exit status. Usage errors
    exit through ``SystemExit(2)`` (argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = args.quiet or args.top_quiet
    args.verbose += args.top_verbose
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("dist_ckpt", "storage_backends")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:  # the library's log records go to stderr; nothing global is configured
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False
    try:
        return int(args.func(args))
    except (CheckpointError, BackendError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return _exit_code(e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `dist-ckpt list RUN | head`
        sys.stderr.close()
        return EXIT_OK
    finally:
        for lg, (lvl, prop) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
            lg.propagate = prop
