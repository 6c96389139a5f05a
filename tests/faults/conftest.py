"""Fixtures of the fault suite: tmpfs and bind mounts (root only; a test falls back and says so
when mounting is not permitted)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(args: list[str]) -> str | None:
    """Run ``mount``; None on success, else why not."""
    try:
        r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mount {' '.join(args)}: {e}"
    return None if r.returncode == 0 else f"mount {' '.join(args)}: {r.stderr.strip() or r.returncode}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


class Mounts:
    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def tmpfs(self, path: Path, size: str) -> str | None:
        path.mkdir(parents=True, exist_ok=True)
        why = _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
        if why is None:
            self.mounted.append(path)
        return why

    def bind(self, src: Path, dst: Path) -> str | None:
        dst.mkdir(parents=True, exist_ok=True)
        why = _mount(["--bind", str(src), str(dst)])
        if why is None:
            self.mounted.append(dst)
        return why


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        for path in reversed(m.mounted):
            _umount(path)
