"""Tiered checkpoints benchmark: 2 ranks under torchrun, N MB per rank (default 64), SeaweedFS
on loopback as the root.

    python benchmarks/bench_tiered.py [--mb 64] [--rounds 5] [--out benchmarks/results/<date>-tiered.json]

One torchrun job holds two managers over the same state (rank-specific tensors, as FSDP
shards): ``direct`` (root = S3, no local tier) and ``tiered`` (root = S3, ``local_root`` on the
local disk, ``persist_every_n_saves=1``). Rounds interleave them (the order alternates), one
synchronous save each per round, and measure (maximum over the two ranks, medians and ranges
over rounds):

* ``direct.save_s``: the training stall of a direct S3 save (= its time to the S3 commit);
* ``tiered.local_commit_s``: the stall of a tiered save (returns at the local commit, with the
  promotion queued);
* ``tiered.s3_commit_s``: from the save call until the step is committed at S3 (the uploader);
* ``tiered.step_s_idle`` / ``tiered.step_s_during_promotion``: a training step (a 384x384
  matmul chain plus a small all-reduce) with nothing running, and while the uploader promotes;
* ``tiered_async.stall_s``: the stall of the same save with ``async_save=True`` on top.

The ratio ``local_commit_s / direct.save_s`` is per round, then the median and range.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from dist_ckpt import CheckpointManager

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    numel = args.mb * 2**20 // 4 // 16
    tensors = {f"r{rank}.w{i}": torch.randn(numel) for i in range(16)}

    class Shard:
        def state_dict(self) -> dict[str, Any]:
            return dict(tensors)

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            tensors.update(sd)

    a, b = torch.randn(384, 384), torch.randn(384, 384)
    token = torch.zeros(1)

    def train_step(done: Any = None) -> tuple[float, bool]:
        t = time.perf_counter()
        x = a
        for _ in range(4):
            x = torch.mm(x, b).tanh_()
        token[0] = 1.0 if done is not None and done() else 0.0
        dist.all_reduce(token, op=dist.ReduceOp.MIN)
        return time.perf_counter() - t, bool(token[0])

    work = Path(args.workdir)
    uri = args.uri
    direct = CheckpointManager(f"{uri}/direct")
    tiered = CheckpointManager(f"{uri}/tiered", local_root=str(work / "local_tiered"))
    tiered_async = CheckpointManager(f"{uri}/tiered_async", local_root=str(work / "local_async"), async_save=True)
    states = {
        name: m.track(shard=Shard())
        for name, m in (("direct", direct), ("tiered", tiered), ("tiered_async", tiered_async))
    }
    idle = [train_step()[0] for _ in range(30)]
    out: dict[str, Any] = {"rank": rank, "step_s_idle": statistics.median(idle), "rounds": []}
    for r in range(args.rounds):
        row: dict[str, Any] = {}
        order = ["direct", "tiered", "tiered_async"] if r % 2 == 0 else ["tiered_async", "tiered", "direct"]
        for name in order:
            for t in tensors.values():
                t.mul_(1.0001)
            dist.barrier()
            t0 = time.perf_counter()
            if name == "direct":
                direct.save(r, states[name], force=True)
                row["direct_save_s"] = time.perf_counter() - t0
            elif name == "tiered":
                tiered.save(r, states[name], force=True)
                row["local_commit_s"] = time.perf_counter() - t0
                queue = Path(work / "local_tiered" / ".tiers" / "queue" / f"step_{r:09d}.json")
                during = []
                for _ in range(2000):  # steps while the uploader promotes (all ranks agree when it is done)
                    dt, done = train_step(lambda: not queue.exists())
                    if done:
                        break
                    during.append(dt)
                tiered.wait(persisted=True)
                row["s3_commit_s"] = time.perf_counter() - t0
                row["steps_during_promotion"] = len(during)
                row["step_s_during_promotion"] = statistics.median(during) if during else None
            else:
                tiered_async.save(r, states[name], force=True)
                row["async_stall_s"] = time.perf_counter() - t0
                tiered_async.wait(persisted=True)
        out["rounds"].append(row)
    for m in (direct, tiered, tiered_async):
        m.close()
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(out))
    dist.destroy_process_group()


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    rounds = [
        {k: max(r["rounds"][i][k] or 0.0 for r in ranks) for k in ranks[0]["rounds"][i]}
        for i in range(len(ranks[0]["rounds"]))
    ]
    rounds = rounds[1:] if len(rounds) > 2 else rounds  # the first round warms up (plans, connections)
    col = lambda k: [r[k] for r in rounds]  # noqa: E731
    ratio = [r["local_commit_s"] / r["direct_save_s"] for r in rounds]
    during = [r["step_s_during_promotion"] for r in rounds if r["step_s_during_promotion"]]
    idle = max(r["step_s_idle"] for r in ranks)
    return {
        "direct": {"save_s": _stats(col("direct_save_s"))},
        "tiered": {
            "local_commit_s": _stats(col("local_commit_s")),
            "s3_commit_s": _stats(col("s3_commit_s")),
            "step_s_idle": idle,
            "step_s_during_promotion": _stats(during) if during else None,
            "steps_during_promotion": _stats(col("steps_during_promotion")),
        },
        "tiered_async": {"stall_s": _stats(col("async_stall_s"))},
        "ratio_local_commit_to_direct_s3_save": _stats(ratio),
        "ratio_step_during_promotion_to_idle": (statistics.median(during) / idle) if during else None,
        "rounds": rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--mb", type=int, default=64, help="state per rank (MB)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from support.s3server import start_seaweedfs

    workdir = Path(tempfile.mkdtemp(prefix="bench-tiered-", dir="/tmp"))
    server = start_seaweedfs(workdir / "weed")
    try:
        uri = f"s3://{server.create_bucket()}/bench"
        raw = workdir / "out.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            __file__,
            "--worker",
            "--uri",
            uri,
            "--workdir",
            str(workdir),
            "--mb",
            str(args.mb),
            "--rounds",
            str(args.rounds),
            "--out",
            str(raw),
        ]
        env = {
            **os.environ,
            **server.env(),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "DIST_CKPT_UPLOADER_IDLE_S": "5",
        }
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"benchmark job failed:\n{output[-4000:]}")
        ranks = [json.loads(Path(f"{raw}.rank{r}").read_text()) for r in range(2)]
        result = {
            "benchmark": "tiered",
            "date": datetime.date.today().isoformat(),
            "mb_per_rank": args.mb,
            "ranks": 2,
            "root": "SeaweedFS on loopback",
            "local_root": "ext4 (virtual disk), fsync on",
            "rounds": args.rounds,
            "loadavg": os.getloadavg(),
            **summarize(ranks),
        }
    finally:
        server.stop()
        time.sleep(6)  # the uploaders' idle exit (they have nothing left)
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
