"""A Lightning fit through DistCkptIO, restartable with the same command (``ckpt_path="last"``).

Rank 0 writes the global step it reached to ``--progress`` after every batch (the test
SIGKILLs the job once it passes a chosen step) and, at the end, the final parameters and
Adam state to ``--final-out`` (safetensors)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from lightning_common import Regressor, final_state, loader  # noqa: E402

from dist_ckpt.integrations.lightning import DistCkptIO, DistCkptModelCheckpoint  # noqa: E402


class Progress(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.is_global_zero:
            tmp = self.path + ".tmp"
            Path(tmp).write_text(str(trainer.global_step))
            os.replace(tmp, self.path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dirpath", required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--progress", default=None)
    p.add_argument("--final-out", default=None)
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    model = Regressor()
    callbacks: list[L.Callback] = [
        DistCkptModelCheckpoint(
            dirpath=args.dirpath, save_last=True, save_top_k=args.top_k, monitor="val_loss", every_n_epochs=1
        )
    ]
    if args.progress:
        callbacks.append(Progress(args.progress))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        plugins=[DistCkptIO(async_save=True, compression="zstd")],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, loader(), loader(shuffle=False), ckpt_path="last")
    if trainer.is_global_zero and args.final_out:
        save_file({k: v.contiguous() for k, v in final_state(model, trainer.optimizers[0]).items()}, args.final_out)


if __name__ == "__main__":
    main()
