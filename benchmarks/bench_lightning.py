"""Lightning ``Trainer.fit`` checkpointing: DistCkptIO(async_save=True) against Lightning's own
plugins, one process, CPU.

    python benchmarks/bench_lightning.py [--width 2048] [--rounds 3] [--saves 4] [--step-ms 100]

The same model (an MLP of ``--width``, Adam: weights + 2 moments per save), the same data and
the same ``ModelCheckpoint(every_n_train_steps=5, save_top_k=1)`` schedule, fitted once per
plugin in each round (interleaved, the order rotated every round) in this one process:

- ``distckpt``: ``DistCkptIO(async_save=True, compression="zstd")`` + ``DistCkptModelCheckpoint``
- ``distckpt_none``: the same with ``compression="none"`` (less background CPU, more bytes)
- ``torch``: Lightning's default ``TorchCheckpointIO`` (``torch.save``, synchronous)
- ``async``: Lightning's ``AsyncCheckpointIO`` (clones every tensor, then ``torch.save`` on a thread)

Each training step also sleeps ``--step-ms`` (accelerator compute, during which the host is
idle: what a GPU job's CPU sees); the checkpoints come every 5 steps. With ``--step-ms 0`` the
steps take milliseconds and an async plugin's next save mostly waits for the previous one.

Per plugin: the training stall per checkpoint — the wall time of ``Trainer.save_checkpoint``
as ModelCheckpoint calls it inside the loop (Lightning's state dump included, the same for
all) — first save and 2nd+ saves separately (the first allocates staging buffers); the bytes
one checkpoint occupies on disk; the fit's wall time including the wait for the last
background save at ``teardown``. Prints JSON with medians, min–max over all saves and the
ratios distckpt / torch and distckpt / async.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from dist_ckpt.integrations.lightning import DistCkptIO, DistCkptModelCheckpoint

PLUGINS = ("distckpt", "distckpt_none", "torch", "async")
EVERY = 5


class Wide(L.LightningModule):
    def __init__(self, width: int, step_ms: float = 0.0):
        super().__init__()
        self.step_s = step_ms / 1000
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, 1),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.step_s:
            time.sleep(self.step_s)
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class TimedTrainer(L.Trainer):
    """Records the wall time of every ``save_checkpoint`` (the stall the loop sees)."""

    stalls: list[float]

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        super().save_checkpoint(*args, **kwargs)
        self.stalls.append(time.perf_counter() - t0)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fit_once(plugin: str, width: int, saves: int, step_ms: float, root: Path) -> dict[str, Any]:
    dirpath = root / plugin
    shutil.rmtree(dirpath, ignore_errors=True)
    if plugin.startswith("distckpt"):
        io: Any = DistCkptIO(async_save=True, compression="zstd" if plugin == "distckpt" else "none")
        cb: ModelCheckpoint = DistCkptModelCheckpoint(dirpath=dirpath, every_n_train_steps=EVERY, save_top_k=1)
    else:
        io = TorchCheckpointIO() if plugin == "torch" else AsyncCheckpointIO(TorchCheckpointIO())
        cb = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=EVERY, save_top_k=1)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64 * 4, 64), torch.randn(64 * 4, 1))
    trainer = TimedTrainer(
        accelerator="cpu",
        devices=1,
        max_steps=EVERY * saves,
        plugins=[io],
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.stalls = []
    t0 = time.perf_counter()
    trainer.fit(Wide(width, step_ms), DataLoader(data, batch_size=4))
    wall = time.perf_counter() - t0
    return {"stalls": trainer.stalls, "fit_s": wall, "bytes": _bytes(dirpath)}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--step-ms", type=float, default=100.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    raw = {name: {"first": [], "later": [], "fit_s": [], "bytes": [], "round_later": []} for name in PLUGINS}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for r in range(args.rounds):
            order = PLUGINS[r % len(PLUGINS) :] + PLUGINS[: r % len(PLUGINS)]
            for name in order:
                out = fit_once(name, args.width, args.saves, args.step_ms, Path(tmp))
                raw[name]["first"].append(out["stalls"][0])
                raw[name]["later"] += out["stalls"][1:]
                raw[name]["round_later"].append(statistics.median(out["stalls"][1:]))
                raw[name]["fit_s"].append(out["fit_s"])
                raw[name]["bytes"].append(out["bytes"])
                print(
                    f"round {r} {name}: stalls {[f'{s:.3f}' for s in out['stalls']]} fit {out['fit_s']:.2f}s "
                    f"bytes {out['bytes']}",
                    file=sys.stderr,
                )
    model = Wide(args.width)
    params = sum(p.numel() for p in model.parameters())
    res: dict[str, Any] = {
        "benchmark": "lightning",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "setup": {
            "width": args.width,
            "params": params,
            "state_mb_fp32_with_adam": params * 4 * 3 / 1e6,
            "rounds": args.rounds,
            "saves_per_fit": args.saves,
            "every_n_train_steps": EVERY,
            "step_sleep_ms": args.step_ms,
        },
        "plugins": {
            name: {
                "stall_first_s": _summary(v["first"]),
                "stall_later_s": _summary(v["later"]),
                "fit_s": _summary(v["fit_s"]),
                "bytes_per_checkpoint": statistics.median(v["bytes"]),
            }
            for name, v in raw.items()
        },
    }
    pl = res["plugins"]
    res["ratios"] = {
        f"stall_later_distckpt_vs_{o}": pl["distckpt"]["stall_later_s"]["median"] / pl[o]["stall_later_s"]["median"]
        for o in ("torch", "async", "distckpt_none")
    }
    res["ratios"].update(
        {
            f"bytes_distckpt_vs_{o}": pl["distckpt"]["bytes_per_checkpoint"] / pl[o]["bytes_per_checkpoint"]
            for o in ("torch", "async")
        }
    )
    res["ratios_per_round"] = {  # each round's ratio of 2nd+ stall medians: the spread of the ratio itself
        f"stall_later_distckpt_vs_{o}": _summary(
            [a / b for a, b in zip(raw["distckpt"]["round_later"], raw[o]["round_later"])]
        )
        for o in ("torch", "async", "distckpt_none")
    }
    res["ratios"].update(
        {
            f"fit_distckpt_vs_{o}": pl["distckpt"]["fit_s"]["median"] / pl[o]["fit_s"]["median"]
            for o in ("torch", "async")
        }
    )
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
