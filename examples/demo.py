"""`make demo`: train 2 ranks, SIGKILL the job mid-run, resume automatically, and show that
the resumed run's losses and final parameters equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exactness import EXAMPLES, compare, torchrun  # noqa: E402

from dist_ckpt import CheckpointManager  # noqa: E402

STEPS = 40


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="dist_ckpt_demo_"))
    log = work / "torchrun.log"
    common = ["--steps", str(STEPS), "--save-every", "5", "--keep-last", "3"]
    print(f"dist_ckpt demo — working in {work} (torchrun output: {log})")

    print(f"1. uninterrupted run: 2 ranks (DDP, dropout, shuffled DistributedSampler), {STEPS} steps")
    rc = torchrun(
        "train_ddp.py",
        2,
        [
            "--ckpt",
            str(work / "run_a"),
            *common,
            "--losses-out",
            str(work / "a.jsonl"),
            "--final-out",
            str(work / "a.safetensors"),
        ],
        log=log,
    )
    if rc != 0:
        print(f"   failed (exit {rc}); see {log}")
        return 1

    crash = random.Random().randrange(7, STEPS - 5)
    print(f"2. same run, rank 0 SIGKILLed after step {crash} (the whole job dies)")
    rc = torchrun(
        "train_ddp.py",
        2,
        ["--ckpt", str(work / "run_b"), *common, "--crash-at-step", str(crash), "--losses-out", str(work / "b.jsonl")],
        log=log,
    )
    print(f"   job exited with code {rc} (killed)")
    print(f"   train_ddp.py --ckpt {work / 'run_b'} --list-checkpoints:")
    listed = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_ddp.py"), "--ckpt", str(work / "run_b"), "--list-checkpoints"],
        capture_output=True,
        text=True,
    )
    print("\n".join(f"   {line}" for line in (listed.stdout + listed.stderr).splitlines()))
    listing = CheckpointManager(str(work / "run_b"), read_only=True).checkpoints()

    print("3. the job is started again with --resume auto (the default): it continues from the last checkpoint")
    rc = torchrun(
        "train_ddp.py",
        2,
        [
            "--ckpt",
            str(work / "run_b"),
            *common,
            "--resume",
            "auto",
            "--losses-out",
            str(work / "b.jsonl"),
            "--final-out",
            str(work / "b.safetensors"),
        ],
        log=log,
    )
    if rc != 0:
        print(f"   resume failed (exit {rc}); see {log}")
        return 1
    resumed_from = max(c.step for c in listing)
    result = compare(work / "a.jsonl", work / "b.jsonl", work / "a.safetensors", work / "b.safetensors")
    print(
        f"   resumed from step {resumed_from}; compared {result.steps_compared} per-step losses and "
        f"{result.tensors_compared} final parameter/optimizer tensors"
    )
    if result.identical:
        print("RESULT: the resumed run is bit-identical to the uninterrupted run")
        return 0
    print(f"RESULT: MISMATCH — {result.first_difference}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
