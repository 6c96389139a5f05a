"""An incremental-checkpoint job (frozen base + adapter) that fault tests kill mid-retention.

    python tests/faults/_incremental_job.py --root R --refs REFS --steps 3,4 [--resume]

The backend is wrapped in :class:`FaultyBackend` from ``$DIST_CKPT_FAULTS``. For each step it
trains one step, writes the model state about to be saved to ``REFS/step_N.safetensors``, and
saves with ``keep_last=2`` (retention deletes the oldest step after each commit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: support.faulty_backend
sys.path.insert(0, str(HERE.parent / "unit"))  # incremental_common

from incremental_common import AdapterRun  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from support.faulty_backend import FaultyBackend  # noqa: E402

from dist_ckpt import CheckpointManager  # noqa: E402
from storage_backends import open_backend  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--refs", required=True)
    p.add_argument("--steps", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--compression", default="none")
    args = p.parse_args()
    run = AdapterRun(0)
    backend = FaultyBackend.from_env(open_backend(args.root, fsync=False))
    with CheckpointManager(
        args.root, backend=backend, keep_last=2, incremental=True, compression=args.compression
    ) as mgr:
        state = mgr.track(**run.objects())
        if args.resume:
            mgr.restore(state)
        for step in (int(s) for s in args.steps.split(",")):
            run.train_step()
            model = {k: v.contiguous() for k, v in run.model.state_dict().items()}
            save_file(model, str(Path(args.refs) / f"step_{step}.safetensors"))
            mgr.save(step, state, force=True)
            print("SAVED", step, flush=True)


if __name__ == "__main__":
    main()
