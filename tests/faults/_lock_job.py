"""The two jobs of the run-lock tests (tests/faults/test_run_lock_*.py): an *owner* that holds a
run and an *intruder* that tries to take it — each a real process, the intruder often in another
UTS namespace (another host name).

    python _lock_job.py owner --root R --refs D --stale-after 1 [--go FILE] [--pause-at-commit]
                              [--async-save --hold-write FILE]
    python _lock_job.py intruder --root R --refs D --stale-after 1 [--retry S] [--save STEP]
                                 [--hold FILE]

Both use the fault suite's model (``_fault_lib``) and dump the exact state of each step they save
to ``refs/step_N.safetensors`` first, so ``check_run`` can compare bit for bit. Lines printed:
``HOST name``, ``OWNER token`` (the lock record's owner), ``SAVED N``, ``PAUSED`` (owner, right
before it stops itself with SIGSTOP inside the commit of its second step), ``INFLIGHT`` (owner,
an async save's shard is written but not committed), ``RUNLOCKED message`` (then exit 3),
``ACQUIRED t held-heartbeat`` (intruder: when it got the run, and the heartbeat of the lock it
found there).

The owner saves step 1, then waits for ``--go`` to appear (idling: only its heartbeat thread
touches the lock), then saves step 2. ``--pause-at-commit``: the save of step 2 stops the process
(SIGSTOP, a real one) right before its metadata.json is created — all shards written, nothing
committed. ``--hold-write``: the async save of step 2 blocks before its shard is committed
until that file exists. The intruder opens the run (``--retry``: keeps trying for that many
seconds while it gets RunLocked), restores the last step, saves ``--save`` and, with
``--hold``, keeps the run open until that file exists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/: support.faulty_backend

from _fault_lib import BEST, build, train_step, write_ref  # noqa: E402
from support.faulty_backend import FaultyBackend, Rule  # noqa: E402

from dist_ckpt import CheckpointManager  # noqa: E402
from dist_ckpt.errors import RunLocked  # noqa: E402
from dist_ckpt.run_lock import LOCK, LockInfo  # noqa: E402
from storage_backends import open_backend  # noqa: E402


def say(*parts: object) -> None:
    print(*parts, flush=True)


def wait_file(path: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.02)


def stop_self(op: str, key: str) -> None:
    say("PAUSED", key)
    os.kill(os.getpid(), signal.SIGSTOP)  # the whole process, heartbeat thread included
    say("CONTINUED", key)


def _lock_owner(root: str) -> str | None:
    held = LockInfo.parse(open_backend(root).read(LOCK))
    return held.owner if held else None


def owner(args: argparse.Namespace) -> int:
    rules = []
    if args.pause_at_commit:
        rules.append(Rule("create_if_absent", "step_000000002*/metadata.json", "call", hook=stop_self))
    if args.hold_write:

        def hold(op: str, key: str) -> None:
            say("INFLIGHT", key)
            wait_file(args.hold_write)

        rules.append(Rule("writer.commit", "step_000000002*/rank_*", "call", hook=hold))
    backend = FaultyBackend(open_backend(args.root), rules)
    model, opt = build()
    mgr = CheckpointManager(
        args.root, backend=backend, best=BEST, lock_stale_after=args.stale_after, async_save=args.async_save
    )
    say("OWNER", _lock_owner(args.root))
    state = mgr.track(model=model, optimizer=opt)
    try:
        for step in (1, 2):
            if step == 2 and args.go:
                wait_file(args.go)  # idle: nothing but the heartbeat thread touches the lock
            loss = train_step(model, opt, step)
            write_ref(Path(args.refs), step, model, opt)
            mgr.save(step, state, metrics={"loss": loss}, force=True)
            if args.async_save:
                mgr.wait()  # durable (or its failure raised) before it is reported
            say("SAVED", step)
        mgr.close()
    except RunLocked as e:
        say("RUNLOCKED", " ".join(str(e).split()))
        return 3
    return 0


def intruder(args: argparse.Namespace) -> int:
    say("HOST", socket.gethostname())
    deadline = time.monotonic() + args.retry
    backend = open_backend(args.root)
    while True:
        found = backend.read_versioned(LOCK)
        held = LockInfo.parse(found.data) if found else None
        try:
            mgr = CheckpointManager(args.root, best=BEST, lock_stale_after=args.stale_after)
            break
        except RunLocked as e:
            if time.monotonic() > deadline:
                say("RUNLOCKED", " ".join(str(e).split()))
                return 3
            time.sleep(0.05)
    say(
        "ACQUIRED",
        json.dumps(
            {"time": time.time(), "held_heartbeat": held.heartbeat if held else None, "owner": _lock_owner(args.root)}
        ),
    )
    if args.save is not None:
        model, opt = build()
        state = mgr.track(model=model, optimizer=opt)
        info = mgr.restore(state)
        say("RESUMED", info.step if info else None)
        loss = train_step(model, opt, args.save)
        write_ref(Path(args.refs), args.save, model, opt)
        mgr.save(args.save, state, metrics={"loss": loss}, force=True)
        say("SAVED", args.save)
    if args.hold:
        wait_file(args.hold)
    mgr.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("owner", "intruder"))
    p.add_argument("--root", required=True)
    p.add_argument("--refs", required=True)
    p.add_argument("--stale-after", type=float, required=True)
    p.add_argument("--go", help="owner: wait for this file before saving step 2")
    p.add_argument("--pause-at-commit", action="store_true")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--hold-write", help="owner: block step 2's shard commit until this file exists")
    p.add_argument("--retry", type=float, default=0.0, help="intruder: keep trying for this many seconds")
    p.add_argument("--save", type=int, help="intruder: restore the last step, then save this step")
    p.add_argument("--hold", help="intruder: keep the run open until this file exists")
    args = p.parse_args()
    return owner(args) if args.role == "owner" else intruder(args)


if __name__ == "__main__":
    sys.exit(main())
