"""Helpers of the CLI tests: running ``python -m dist_ckpt.cli`` as a subprocess, and making
real runs with CheckpointManager. Fixtures are in conftest.py.

Each subprocess imports torch (seconds), so independent invocations run concurrently through
:func:`cli_many`, and runs are made once per session and copied before a test changes them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dist_ckpt import CheckpointManager

# loss and acc per step 1..8: best:acc lands on step 2, best:loss on step 5, last is 8
LOSS = {1: 5.0, 2: 3.0, 3: 4.0, 4: 6.0, 5: 2.5, 6: 7.0, 7: 8.0, 8: 9.0}
ACC = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4, 6: 0.5, 7: 0.6, 8: 0.7}
CONFIG = {"lr": 0.01, "batch_size": 4, "model": {"hidden": 16}}


@dataclass
class Run:
    root: Path
    steps: list[int]  # committed
    models: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> model state

    def ckpt(self, step: int) -> Path:
        return self.root / f"step_{step:09d}"


def cli(*args: str, check_rc: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m dist_ckpt.cli ARGS`` with captured text output (env inherited: S3 settings)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dist_ckpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check_rc is not None:
        what = f"dist-ckpt {' '.join(map(str, args))}: rc={proc.returncode}"
        assert proc.returncode == check_rc, f"{what}\n{proc.stdout}\n{proc.stderr}"
    return proc


def cli_many(*calls: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent CLI subprocesses concurrently (results in order)."""
    with ThreadPoolExecutor(min(len(calls), 4)) as pool:
        return list(pool.map(lambda a: cli(*a), calls))


_BACKGROUND = ThreadPoolExecutor(4, thread_name_prefix="cli-test")


def cli_bg(*args: str) -> Future[subprocess.CompletedProcess[str]]:
    """Start a CLI subprocess in the background (so in-process checks overlap its torch import)."""
    return _BACKGROUND.submit(cli, *args)


def cli_in(*args: str) -> subprocess.CompletedProcess[str]:
    """The same invocation through ``dist_ckpt.cli.main`` in this process, with stdout/stderr
    captured: for the variants of a subcommand that is also run as a subprocess (a subprocess
    costs seconds of torch import)."""
    from dist_ckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def as_json(proc: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(proc.stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], rc: int) -> str:
    assert proc.returncode == rc, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("dist-ckpt: error: "), proc.stderr
    return lines[0]


def build_model(hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def train_and_save(
    root: Path,
    *,
    steps=range(1, 9),
    keep_last: int = 2,
    compression: str = "none",
    model: nn.Module | None = None,
    config: dict = CONFIG,
) -> Run:
    """A run with pointers spread out: keep_last=2 keeps 7, 8 (last) plus best:acc=2, best:loss=5."""
    torch.manual_seed(0)
    model = model or build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    run = Run(root, [])
    with CheckpointManager(
        str(root),
        keep_last=keep_last,
        best={"loss": "min", "acc": "max"},
        config=config,
        compression=compression,
        tracker_run_id="wandb-123",
    ) as mgr:
        state = mgr.track(model=model, optimizer=opt, counters={"seen": 0})
        for step in steps:
            x = torch.randn(4, model[0].in_features)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, state, metrics={"loss": LOSS.get(step, 1.0), "acc": ACC.get(step, 0.0)}, epoch=step // 4)
            run.models[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        run.steps = [c.step for c in mgr.checkpoints()]
    return run
