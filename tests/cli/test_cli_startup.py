"""`dist-ckpt` starts without importing torch (issue 13: ≈3 s of start-up for `list`).

Each command runs as a subprocess under ``python -X importtime``, which names every module the
process imports; ``list``, ``inspect``, ``verify``, ``prune``, ``gc``, ``copy``, ``diff``
(structure only) and every ``--help`` must not name torch. ``export`` and ``diff --values``,
which need tensors, do import it — the positive control that the check can see torch.
benchmarks/bench_cli_startup.py measures the time this saves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cli_support import Run

_TORCH = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(torch(\.\S+)?)\s*$", re.MULTILINE)
_NUMPY = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*numpy\s*$", re.MULTILINE)


def _importtime(*args: str | Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dist_ckpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "import time:" in proc.stderr, proc.stderr[-2000:]  # -X importtime really reported
    return proc, [m.group(1) for m in _TORCH.finditer(proc.stderr)]


def test_reading_and_maintenance_commands_do_not_import_torch(run_copy: Run, tmp_path: Path) -> None:
    ckpt_a, ckpt_b = run_copy.ckpt(7), run_copy.ckpt(8)
    commands = [
        ("--help",),
        ("list", run_copy.root),
        ("list", run_copy.root, "--json"),
        ("inspect", ckpt_b),
        ("inspect", ckpt_b, "--json", "--keys", "model.*"),
        ("verify", run_copy.root),
        ("verify", ckpt_b, "--quick"),
        ("diff", ckpt_a, ckpt_b),
        ("copy", run_copy.root, tmp_path / "copied"),
        ("gc", run_copy.root, "--dry-run"),
        ("prune", run_copy.root, "--keep-last", "3", "--dry-run"),
        *[
            (command, "--help")
            for command in ("list", "inspect", "verify", "export", "prune", "gc", "copy", "diff", "import")
        ],
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: _importtime(*c), commands))
    for command, (proc, torch_modules) in zip(commands, results):
        shown = " ".join(map(str, command))
        assert proc.returncode in (0, 1), f"dist-ckpt {shown}: rc={proc.returncode}\n{proc.stderr[-3000:]}"  # diff: 1
        assert torch_modules == [], f"dist-ckpt {shown} imported {torch_modules[:5]}"
    # the real maintenance commands (they take the run's lock, write, delete) too
    for command in (("prune", run_copy.root, "--keep-last", "1"), ("gc", run_copy.root)):
        proc, torch_modules = _importtime(*command)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert torch_modules == [], f"dist-ckpt {command[0]} imported {torch_modules[:5]}"
    assert sorted(p.name for p in run_copy.root.iterdir() if p.name.startswith("step_")) == [
        "step_000000002",
        "step_000000005",
        "step_000000008",
    ]  # pruned to last + the best pointers
    # list does not even need numpy
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dist_ckpt.cli", "list", str(run_copy.root)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and not _NUMPY.search(proc.stderr), proc.stderr[-2000:]


def test_commands_that_need_tensors_import_torch(run_dir: Run, tmp_path: Path) -> None:
    export, torch_export = _importtime("export", run_dir.ckpt(8), tmp_path / "out")
    values, torch_values = _importtime("diff", run_dir.ckpt(7), run_dir.ckpt(8), "--values")
    assert export.returncode == 0, export.stderr[-3000:]
    assert values.returncode == 1, values.stderr[-3000:]  # the weights differ
    assert "torch" in torch_export and "torch" in torch_values
