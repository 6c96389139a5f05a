"""Helpers shared by the subcommands: locating runs and checkpoints, tables, JSON, progress bars."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dist_ckpt.checkpoint_view import locate
from dist_ckpt.errors import ConfigError
from dist_ckpt.layout import step_prefix
from dist_ckpt.run_store import RunStore
from storage_backends import Backend

if TYPE_CHECKING:
    from dist_ckpt.run_lock import RunLock

BREAK_LOCK_HELP = (
    "DANGEROUS: take the run's writer lock even from a job that looks alive. Only when you are sure "
    "that job is gone (e.g. its host is down): a live job would lose its in-flight save and stop "
    "with RunLocked at its next commit"
)


def checkpoint_at(uri: str) -> tuple[Backend, str]:
    """Backend (of the parent) and folder name of the committed checkpoint ``uri`` names."""
    kind, backend, prefix = locate(uri)
    if kind == "run":
        entries = RunStore(backend).committed_entries()
        hint = f", e.g. {backend.uri}/{step_prefix(entries[-1].step)} (the latest)" if entries else ""
        raise ConfigError(
            f"{backend.uri} is a run root, not one checkpoint: name a checkpoint folder{hint}; "
            f"`dist-ckpt list {uri}` shows them"
        )
    return backend, prefix


def run_at(uri: str) -> Backend:
    """Backend of the run root ``uri`` names."""
    kind, backend, prefix = locate(uri)
    if kind == "checkpoint":
        raise ConfigError(
            f"{backend.uri}/{prefix} is one checkpoint, not a run root: pass its parent folder {backend.uri}"
        )
    return backend


@contextmanager
def run_locked(backend: Backend, break_lock: bool = False) -> Iterator[RunLock]:
    """Hold the run's writer lock (the one a training job's manager holds; heart-beating) while
    changing the run, so ``prune``/``gc``/``copy`` never race a live job: :class:`RunLocked`
    (exit 6) naming the owner and its last heartbeat if one holds it, unless ``break_lock``."""
    from dist_ckpt.run_lock import RunLock

    lock = RunLock(backend)
    lock.acquire(break_lock=break_lock)
    try:
        yield lock
    finally:
        lock.release()


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_time(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def fmt_number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings ("nan", "inf"): strict JSON for jq & co."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(jsonable(obj), indent=2, allow_nan=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns aligned; ``right`` lists the indexes of right-aligned (numeric) columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def progress_bar(args: argparse.Namespace, desc: str, total: int = 0) -> Any:
    """A byte-counting tqdm bar on stderr; silent with ``--quiet`` or when stderr is no TTY."""
    from tqdm import tqdm

    disable = bool(getattr(args, "quiet", False)) or not sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=disable,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


class BarSink:
    """Adapts a tqdm bar to :class:`dist_ckpt.verify.ProgressSink` (totals grow as found)."""

    def __init__(self, bar: Any):
        self.bar = bar

    def add_total(self, n: int) -> None:
        self.bar.total = (self.bar.total or 0) + n
        self.bar.refresh()

    def update(self, n: int) -> None:
        if n:
            self.bar.update(n)


def note(args: argparse.Namespace, message: str) -> None:
    """A remark for humans on stderr (suppressed by ``--quiet``)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)
