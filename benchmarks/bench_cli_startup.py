"""Start-up time of the command line: ``dist-ckpt list RUN`` on a local run, against
``python -c "import torch"`` (the anchor: what every command cost while the CLI imported torch).

    python benchmarks/bench_cli_startup.py [--rounds 15] [--out FILE]

Each round runs, in a rotated order, four fresh processes and takes their wall time (start to
exit, output discarded):

- ``list``: ``python -m dist_ckpt.cli list RUN`` (ours);
- ``import_torch``: ``python -c "import torch"`` (the anchor);
- ``list_with_torch``: the same ``list`` in a process that imports torch first (the start-up
  ``list`` had before it stopped importing torch);
- ``bare_python``: ``python -c "pass"`` (the interpreter's own floor).

Prints JSON: per command the median and range, the per-round ratio ``list / import_torch``
(median and range) against the target ≤ 0.3, and the machine's load. The run (a small model,
10 checkpoints, a best pointer) is written once, before the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

TARGET = 0.3


def _make_run(root: Path) -> None:
    import torch

    from dist_ckpt import CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    with CheckpointManager(str(root), best={"val_loss": "min"}, keep_last=5, config={"lr": 1e-3}) as mgr:
        state = mgr.track(model=model, opt=opt)
        for step in range(10):
            model(torch.randn(4, 64)).pow(2).mean().backward()
            opt.step()
            mgr.save(step, state, metrics={"val_loss": 1.0 / (step + 1) + (step % 3)})


def _commands(run: Path) -> dict[str, list[str]]:
    py = sys.executable
    with_torch = f"import sys, torch; from dist_ckpt.cli import main; sys.exit(main(['list', {str(run)!r}]))"
    return {
        "list": [py, "-m", "dist_ckpt.cli", "list", str(run)],
        "import_torch": [py, "-c", "import torch"],
        "list_with_torch": [py, "-c", with_torch],
        "bare_python": [py, "-c", "pass"],
    }


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(values), 4),
        "min_s": round(min(values), 4),
        "max_s": round(max(values), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        run = Path(tmp) / "run"
        _make_run(run)
        commands = _commands(run)
        names = list(commands)
        for name in names:  # warm the page cache of every module once
            _wall(commands[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        ratios: list[float] = []
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no command always runs first
            this_round = {name: _wall(commands[name]) for name in order}
            for name, t in this_round.items():
                times[name].append(t)
            ratios.append(this_round["list"] / this_round["import_torch"])
    ratio = statistics.median(ratios)
    doc: dict[str, Any] = {
        "benchmark": "cli_startup",
        "date": time.strftime("%Y-%m-%d"),
        "what": "wall time of `dist-ckpt list RUN` (local run, 10 checkpoints) / `python -c 'import torch'`",
        "rounds": args.rounds,
        "commands": {name: " ".join(cmd) for name, cmd in commands.items()},
        "results": {name: _summary(values) for name, values in times.items()},
        "ratio_list_over_import_torch": {
            "median": round(ratio, 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        "ratio_list_with_torch_over_import_torch": round(
            statistics.median(times["list_with_torch"]) / statistics.median(times["import_torch"]), 3
        ),
        "target": f"<= {TARGET}",
        "met": ratio <= TARGET,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": metadata.version("torch"),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
