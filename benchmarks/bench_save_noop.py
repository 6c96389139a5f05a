"""Per-call cost of a ``save()`` that does not save, 2 ranks under torchrun (gloo, CPU).

    python benchmarks/bench_save_noop.py [--calls 200] [--rounds 15]

Every training step calls ``mgr.save(step, state, metrics=...)``; with
``save_every_n_steps`` and a tracked metric that does not improve, the call only agrees on the
decision (rank 0 decides, every rank learns it). Measured side by side, in interleaved rounds
of ``--calls`` calls each, µs per call of:

- ``noop_save``: ``mgr.save()`` not due (``save_every_n_steps=10**9``, ``best={"loss": "min"}``,
  a worse loss each call);
- ``barrier``: a bare ``dist.barrier()`` — the cheapest collective, the anchor;
- ``decision_as_object``: the same decision agreed the general way (``broadcast_object_list``:
  a pickle in two broadcasts), as the manager did before the decision got its own path.

Also counts the collectives one call issues (by wrapping torch.distributed's functions).
Prints JSON: medians with min/max over rounds, the ratios to the barrier, the collective counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "barrier",
    "gather",
    "scatter",
    "send",
    "recv",
    "all_to_all",
    "monitored_barrier",
)


class CollectiveCounter:
    """Counts calls of the primitive collectives (also those made inside helpers such as
    ``broadcast_object_list``, which look them up in ``distributed_c10d``)."""

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.count = 0
        for name in COLLECTIVES:
            original = getattr(c10d, name, None)
            if original is None:
                continue
            wrapped = self._wrap(original)
            setattr(c10d, name, wrapped)
            if getattr(dist, name, None) is original:
                setattr(dist, name, wrapped)

    def _wrap(self, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return fn(*args, **kwargs)

        return counted


def _per_call_us(fn: Any, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def worker(calls: int, rounds: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from dist_ckpt import CheckpointManager

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counter = CollectiveCounter()
    mgr = CheckpointManager(os.environ["BENCH_ROOT"], save_every_n_steps=10**9, best={"loss": "min"})
    state = mgr.track(model=torch.nn.Linear(8, 8))
    assert mgr.save(1, state, metrics={"loss": 1.0})  # the first value is the best: a real save
    step = [2]

    def noop_save() -> None:
        saved = mgr.save(step[0], state, metrics={"loss": 2.0})
        assert not saved
        step[0] += 1

    def decision_as_object() -> None:  # the general path: rank 0 decides, broadcast_object_list
        mgr._agree((lambda: (mgr._decide(step[0], {"loss": 2.0}, None, False), False)) if rank == 0 else None)

    for fn in (noop_save, dist.barrier, decision_as_object):  # warm up
        fn()
    counts = {}
    for name, fn in (("noop_save", noop_save), ("barrier", dist.barrier), ("decision_as_object", decision_as_object)):
        before = counter.count
        fn()
        counts[name] = counter.count - before
    samples: dict[str, list[float]] = {"noop_save": [], "barrier": [], "decision_as_object": []}
    for _ in range(rounds):  # interleaved: load changes hit every variant alike
        for name, fn in (
            ("noop_save", noop_save),
            ("barrier", dist.barrier),
            ("decision_as_object", decision_as_object),
        ):
            dist.barrier()
            samples[name].append(_per_call_us(fn, calls))
    mgr.close()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"counts": counts, "samples": samples}, f)
    dist.destroy_process_group()


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.calls, args.rounds, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "BENCH_ROOT": os.path.join(tmp, "run"), "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                __file__,
                "--worker",
                "--calls",
                str(args.calls),
                "--rounds",
                str(args.rounds),
                "--out",
                out,
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        with open(out) as f:
            raw = json.load(f)
    s = raw["samples"]
    ratio = [n / b for n, b in zip(s["noop_save"], s["barrier"], strict=True)]
    ratio_old = [o / b for o, b in zip(s["decision_as_object"], s["barrier"], strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "save_noop",
                "ranks": 2,
                "calls_per_round": args.calls,
                "rounds": args.rounds,
                "us_per_call": {name: _summary(v) for name, v in s.items()},
                "noop_save_vs_barrier": _summary(ratio),
                "decision_as_object_vs_barrier": _summary(ratio_old),
                "collectives_per_call": raw["counts"],
                "cpu_count": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
