"""Watching what the test process opens and unpickles (``sys.addaudithook``): :class:`Audit`
records file-system and unpickling events while active, for the malicious-input and
path-traversal fault tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_AUDIT_SINKS: list[list[tuple[str, tuple[Any, ...]]]] = []
_AUDITED = {
    "open",
    "os.rename",
    "os.link",
    "os.mkdir",
    "os.remove",
    "os.rmdir",
    "os.truncate",
    "os.listdir",
    "os.scandir",
    "pickle.find_class",
    "marshal.loads",
}


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT_SINKS and event in _AUDITED:
        for sink in _AUDIT_SINKS:
            sink.append((event, args))


_hook_installed = False


class Audit:
    """Records file-system and unpickling events while active (a context manager)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def __enter__(self) -> Audit:
        global _hook_installed
        if not _hook_installed:
            sys.addaudithook(_audit_hook)
            _hook_installed = True
        _AUDIT_SINKS.append(self.events)
        return self

    def __exit__(self, *exc: object) -> None:
        _AUDIT_SINKS.remove(self.events)

    def unpickled(self) -> list[tuple[Any, ...]]:
        return [args for event, args in self.events if event == "pickle.find_class"]

    def paths(self) -> list[tuple[str, str]]:
        """(event, absolute path) of every path-like argument recorded."""
        out = []
        for event, args in self.events:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)):
                    p = os.fsdecode(a)
                    out.append((event, os.path.abspath(p)))
        return out

    def outside(self, inside: str | Path, within: str | Path) -> list[tuple[str, str]]:
        """Paths under ``within`` (e.g. the test's tmp dir) but not under ``inside`` (the run root)."""
        inside, within = os.path.abspath(inside), os.path.abspath(within)
        return [
            (e, p)
            for e, p in self.paths()
            if (p == within or p.startswith(within + os.sep)) and not (p == inside or p.startswith(inside + os.sep))
        ]
