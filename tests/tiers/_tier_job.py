"""A single-process trainer for the tier tests (a real process the tests kill and restart).

    python _tier_job.py --root URI --local-root DIR --steps 0,1,2 [--mb 8] [--kill-after-wait 2]
                        [--persisted] [--pause-after 2 --go FILE] [--no-wait-upload]
                        [--restore] [--dump DIR] [--backend-options JSON]

Saves the listed steps (the state changes deterministically with the step), optionally
restores first (writing the restored state and the ResumeInfo to --dump), and writes the state
it saved at each step to --dump/saved_<step>.safetensors for bit-for-bit comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_ckpt import CheckpointManager


def _state(step: int, model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def _dump(model: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--local-root", required=True)
    p.add_argument("--steps", default="")
    p.add_argument("--mb", type=float, default=1.0)
    p.add_argument("--kill-after-wait", type=int, default=None)
    p.add_argument(
        "--persisted", action="store_true", help="wait(persisted=True) after each save (up to --pause-after)"
    )
    p.add_argument("--pause-after", type=int, default=None)
    p.add_argument("--go", default=None)
    p.add_argument("--no-wait-upload", action="store_true")
    p.add_argument("--restore", action="store_true")
    p.add_argument("--dump", required=True)
    p.add_argument("--backend-options", default="{}")
    p.add_argument("--persist-every", type=int, default=1)
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--list", action="store_true", help="write checkpoints() (steps and tiers) to --dump/tiers.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    dump = Path(args.dump)
    dump.mkdir(parents=True, exist_ok=True)
    n = max(1, int(args.mb * (1 << 20) / 4 / 1024))
    model = torch.nn.Sequential(torch.nn.Linear(1024, n, bias=False))
    mgr = CheckpointManager(
        args.root,
        local_root=args.local_root,
        persist_every_n_saves=args.persist_every,
        keep_last=args.keep_last,
        backend_options=json.loads(args.backend_options),
        async_save=args.async_save,
    )
    state = mgr.track(model=model)
    if args.restore:
        info = mgr.restore(state)
        (dump / "resume.json").write_text(json.dumps(None if info is None else {"step": info.step, "uri": info.uri}))
        _dump(model, dump / "restored.safetensors")
    for step in [int(s) for s in args.steps.split(",") if s]:
        _state(step, model)
        mgr.save(step, state, force=True)
        _dump(model, dump / f"saved_{step}.safetensors")
        mgr.wait(persisted=args.persisted and (args.pause_after is None or step <= args.pause_after))
        if step == args.kill_after_wait:
            (dump / "waited").write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.pause_after and args.go:
            (dump / f"paused_{step}").write_text("")
            deadline = time.monotonic() + 120
            while not Path(args.go).exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the test never said go")
                time.sleep(0.05)
    if args.list:
        (dump / "tiers.json").write_text(json.dumps({c.step: list(c.tiers) for c in mgr.checkpoints()}))
    mgr.close(wait_for_upload=not args.no_wait_upload)


if __name__ == "__main__":
    main()
