"""The training job the fault scenarios inject faults into (one process, or under torchrun).

    python tests/faults/_fault_job.py --root R --refs REFS --pids PIDS --steps 1,2,3 [--arm-at 3]
    torchrun --nproc-per-node 2 tests/faults/_fault_job.py ...

The storage backend is wrapped in :class:`FaultyBackend` configured from ``$DIST_CKPT_FAULTS``
(armed from the start, or only from step ``--arm-at`` on). For every step it trains one step,
then rank 0 dumps the exact state about to be saved to ``REFS/step_N.safetensors``, saves
(``force=True``), and rank 0 marks ``REFS/step_N.returned`` once ``save`` returned True. Each
rank writes its PID to ``PIDS/rank_R`` first. Prints ``SAVED N`` / ``HOLDING`` lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/: support.faulty_backend

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _fault_lib import BEST, build, mark_returned, train_step, write_ref  # noqa: E402
from support.faulty_backend import FaultyBackend  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from dist_ckpt import CheckpointManager  # noqa: E402
from storage_backends import open_backend  # noqa: E402


def main() -> tuple[object, int]:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--refs", required=True)
    p.add_argument("--pids", required=True)
    p.add_argument("--steps", required=True, help="comma-separated steps to save")
    p.add_argument("--arm-at", type=int, default=None, help="arm the fault rules when this step is reached")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--compression", default="none")
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--hold", type=float, default=0.0, help="seconds to sleep after each save (holding the run lock)")
    p.add_argument("--resume", action="store_true", help="restore('last') first and continue from there")
    p.add_argument(
        "--async-save",
        nargs="?",
        const="true",
        default="false",
        choices=["true", "false", "staged", "overlap"],
        help="async_save: bare or 'true' is True; 'staged' or 'overlap' that value",
    )
    p.add_argument("--async-mode", default="thread")
    p.add_argument("--save-on-sigterm", action="store_true", help="save the current step and exit 143 on SIGTERM")
    args = p.parse_args()
    async_save = {"true": True, "false": False}.get(args.async_save, args.async_save)

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(args.pids, f"rank_{rank}").write_text(str(os.getpid()))
    refs = Path(args.refs)

    model, opt = build(args.width)
    trained = DDP(model) if dist.is_initialized() else model
    backend = FaultyBackend.from_env(open_backend(args.root))
    mgr = CheckpointManager(
        args.root,
        backend=backend,
        best=BEST,
        compression=args.compression,
        keep_last=args.keep_last,
        async_save=async_save,
        async_mode=args.async_mode,
        save_on_sigterm=args.save_on_sigterm,
    )
    state = mgr.track(model=model, optimizer=opt)
    if args.resume:
        info = mgr.restore(state)
        print(f"RESUMED {info.step if info else None}", flush=True)
    # An async save is durable once the next save(), wait() or close() returned (they raise
    # its failure): only then is it marked as acknowledged.
    pending: int | None = None
    stop = False
    for step in [int(s) for s in args.steps.split(",") if s]:
        loss = train_step(trained, opt, step, rank)
        if args.arm_at is not None and step == args.arm_at:
            backend.arm()
        stop = mgr.should_stop()  # with --save-on-sigterm: True once SIGTERM arrived (any rank)
        if rank == 0:
            write_ref(refs, step, model, opt)
        saved = mgr.save(step, state, metrics={"loss": loss}, force=True)
        if rank == 0 and pending is not None:
            mark_returned(refs, pending)
        pending = None
        if saved and rank == 0:
            if async_save:
                pending = step
            else:
                mark_returned(refs, step)
        print(f"SAVED {step}", flush=True)
        if stop:
            print(f"PREEMPTED at {step}", flush=True)
            break
        if args.hold:
            print("HOLDING", flush=True)
            time.sleep(args.hold)
    mgr.close()
    if rank == 0 and pending is not None:
        mark_returned(refs, pending)
    if dist.is_initialized():
        dist.destroy_process_group()
    if stop:
        return trained, 143  # what a preempted job reports
    print("DONE", flush=True)
    return trained, 0  # held by the caller until os._exit: freeing a DDP module at exit can deadlock


if __name__ == "__main__":
    torch.set_num_threads(1)
    trained, exit_code = main()
    # finished: skip finalization (a PyTorch gloo/DDP teardown race: examples/common.py,
    # exit_without_finalization)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
