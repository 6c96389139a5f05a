"""Async save against DCP ``async_save`` in its best configurations, at 1 and 2 ranks, with a
real model and AdamW state; ours with blocking staging and with ``async_save="overlap"``.

    python benchmarks/bench_async_peers.py [--mb 32] [--rounds 2] [--saves 4] [--out FILE]

Each rank trains its own stack of Linear layers (``--mb`` MB of fp32 parameters per rank,
plus AdamW's two moments: 3x that in state) under rank-specific names, so every rank writes
its own part (as with FSDP shards). One torchrun job per (round, world size, method); the
methods run interleaved in every round. Per save (the first of each job is a warm-up):

* ``blocked_s``: how long the training loop is held up by the save: the ``save`` call, plus
  — where the method lets the copy run during the next forward/backward — the wait before
  the next ``optimizer.step()`` for the copy to finish (ours: ``mgr.wait_staged()``, what the
  optimizer's step pre-hook does; DCP: ``response.staging_completion.result()``); the two parts as ``call_s``
  and ``wait_s``;
* ``call_to_commit_s``: from the save call to the committed checkpoint (ours: COMMITTED
  published and the manifest updated; DCP: its upload future done), the loop training on;
* ``fwd_bwd_s``: the forward/backward right after the save call (the overlapped copy and
  the background write compete with it for the CPUs), next to ``fwd_bwd_s_idle``.

Methods:

* ``copy_floor``: ``copy_`` of every parameter and optimizer-state tensor into preallocated
  buffers (the floor of a blocking staging copy);
* ``ours_blocking``: ``CheckpointManager(async_save="staged")`` (thread worker, local disk,
  fsync; ``async_save=True`` before 2026-11-27, when True meant staged);
* ``ours_overlap``: ``CheckpointManager(async_save=True)``: overlapped staging, the default
  since 2026-11-27 (it defers the same tensors as ``"overlap"``, used before, for this model);
* ``dcp_reused_stager``: ``dcp.async_save`` with one ``DefaultStager(StagingOptions(False,
  False, False, False))`` reused across saves (staging storages reused; the options that
  help on CPU: pinned memory and non-blocking copies are for CUDA, shared memory for the
  process checkpointer), thread checkpointer, FileSystemWriter;
* ``dcp_reused_stager_async_staging``: the same with ``use_async_staging=True``: the call
  returns before the copy; the loop must wait for ``staging_completion`` before the next
  optimizer step (DCP's own overlap).

DCP's state dict comes from ``get_state_dict`` inside a ``Stateful`` (DCP's documented
pattern), timed inside the call as ours is.
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
METHODS = ["copy_floor", "ours_blocking", "ours_overlap", "dcp_reused_stager", "dcp_reused_stager_async_staging"]
WIDTH = 1024


def worker(method: str, mb: int, saves: int, workdir: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    sys.path.insert(0, str(ROOT))
    layers = max(1, mb * 2**20 // (4 * (WIDTH * WIDTH + WIDTH)))
    model = nn.ModuleDict({f"r{rank}": nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(16, WIDTH)
    token = torch.zeros(1)

    def fwd_bwd() -> float:
        t = time.perf_counter()
        loss = model[f"r{rank}"](x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        return time.perf_counter() - t

    def step(done: Any = None) -> bool:
        """One training step; its all-reduce also tells whether ``done()`` holds on every
        rank, so the ranks always run the same collectives."""
        fwd_bwd()
        opt.step()
        token[0] = 1.0 if done is not None and done() else 0.0
        dist.all_reduce(token, op=dist.ReduceOp.MIN)
        return bool(token[0])

    for _ in range(3):
        step()
    idle = [fwd_bwd() for _ in range(5)]
    tensors = [p for p in model.parameters()] + [v for st in opt.state.values() for v in st.values() if v.numel() > 1]
    result: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "layers": layers,
        "fwd_bwd_s_idle": statistics.median(idle),
        "state_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "blocked_s": [],
        "call_to_commit_s": [],
        "fwd_bwd_s": [],
        "call_s": [],
        "wait_s": [],
    }
    root = Path(workdir) / f"{method}-{world}-{os.getpid() if rank == 0 else 0}"
    group = dist.new_group(backend="gloo")  # DCP's collectives, apart from the loop's all-reduce
    marker = [str(root)]
    dist.broadcast_object_list(marker)
    root = Path(marker[0])

    def until(done: Any) -> None:  # train on until the save is committed on every rank
        for _ in range(200):
            if step(done):
                return
        while not done():
            time.sleep(0.001)

    if method == "copy_floor":
        buffers = [torch.empty_like(t) for t in tensors]
        for _ in range(saves):
            step()
            dist.barrier()
            t = time.perf_counter()
            for b, s in zip(buffers, tensors):
                b.copy_(s)
            result["blocked_s"].append(time.perf_counter() - t)
    elif method.startswith("ours"):
        from dist_ckpt import CheckpointManager

        mgr = CheckpointManager(str(root), async_save=True if method == "ours_overlap" else "staged", keep_last=2)
        state = mgr.track(model=model, optimizer=opt)
        for i in range(saves):
            step()
            dist.barrier()
            called = time.monotonic()
            t = time.perf_counter()
            mgr.save(i, state, force=True)
            blocked = time.perf_counter() - t
            job = mgr._engine._job
            result["fwd_bwd_s"].append(fwd_bwd())
            t = time.perf_counter()
            mgr.wait_staged()  # what the optimizer's step pre-hook does (a no-op without overlap)
            result["wait_s"].append(time.perf_counter() - t)
            result["call_s"].append(blocked)
            blocked += result["wait_s"][-1]
            opt.step()
            token[0] = 0.0
            dist.all_reduce(token)
            result["blocked_s"].append(blocked)
            until(job.done.is_set)
            mgr.wait()
            result["call_to_commit_s"].append(job.finished - called)
            result.setdefault("timings", []).append(job.timings)
        mgr.close()
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        class App:  # DCP's documented Stateful wrapper
            def state_dict(self) -> dict[str, Any]:
                m, o = get_state_dict(model, opt)
                return {"model": m, "optim": o}

            def load_state_dict(self, sd: dict[str, Any]) -> None:
                set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

        async_staging = method.endswith("async_staging")
        stager = DefaultStager(StagingOptions(False, False, async_staging, False))
        for i in range(saves):
            step()
            dist.barrier()
            finished: list[float] = []
            called = time.monotonic()
            t = time.perf_counter()
            resp = dcp.async_save(
                {"app": App()}, checkpoint_id=str(root / f"step{i}"), async_stager=stager, process_group=group
            )
            blocked = time.perf_counter() - t
            upload = resp.upload_completion if async_staging else resp
            upload.add_done_callback(lambda _f: finished.append(time.monotonic()))
            result["fwd_bwd_s"].append(fwd_bwd())
            t = time.perf_counter()
            if async_staging:
                resp.staging_completion.result()  # the parameters may change only after this
            result["wait_s"].append(time.perf_counter() - t)
            result["call_s"].append(blocked)
            blocked += result["wait_s"][-1]
            opt.step()
            token[0] = 0.0
            dist.all_reduce(token)
            result["blocked_s"].append(blocked)
            until(lambda: bool(finished))
            upload.result()
            result["call_to_commit_s"].append(finished[0] - called)
            dist.barrier()
            if rank == 0 and i >= 2:
                shutil.rmtree(root / f"step{i - 2}", ignore_errors=True)
        stager.close()
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


def run_job(method: str, world: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any] | str:
    out = workdir / f"{method}-{world}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(world),
        __file__,
        "--worker",
        method,
        "--mb",
        str(args.mb),
        "--saves",
        str(args.saves),
        "--workdir",
        str(workdir),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        return f"timed out after {args.timeout}s: {output[-2000:]}"
    if proc.returncode != 0:
        return output[-3000:]
    return {"ranks": [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]}


def summarise(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per save (warm-up dropped) the slower rank; medians and ranges over all rounds' saves."""
    out: dict[str, Any] = {"state_mb_per_rank": jobs[0]["ranks"][0]["state_mb"], "jobs": len(jobs)}
    for key in ("blocked_s", "call_s", "wait_s", "call_to_commit_s", "fwd_bwd_s"):
        per_save = [max(vals) for job in jobs for vals in list(zip(*[r[key] for r in job["ranks"]]))[1:]]
        if per_save:
            out[key] = {
                "median": statistics.median(per_save),
                "min": min(per_save),
                "max": max(per_save),
                "n": len(per_save),
            }
    out["fwd_bwd_s_idle"] = statistics.median(max(r["fwd_bwd_s_idle"] for r in job["ranks"]) for job in jobs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mb", type=int, default=32, help="fp32 parameters per rank (MB); the state is about 3x (84 MB at 32)"
    )
    p.add_argument("--saves", type=int, default=4, help="saves per job (the first is a warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.mb, args.saves, args.workdir, args.out)
        return
    import torch

    load_before = os.getloadavg()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-peers-", dir="/tmp"))
    raw: dict[str, dict[str, list[Any]]] = {f"{w}_ranks": {m: [] for m in args.methods} for w in args.world_sizes}
    errors: dict[str, str] = {}
    for rnd in range(args.rounds):
        for world in args.world_sizes:
            for method in args.methods:
                got = run_job(method, world, args, workdir)
                if isinstance(got, str):
                    errors[f"{world}_ranks/{method}/round{rnd}"] = got
                    print(f"round {rnd} {world} ranks {method}: FAILED", file=sys.stderr)
                else:
                    raw[f"{world}_ranks"][method].append(got)
                    print(f"round {rnd} {world} ranks {method}: done", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    results = {ws: {m: summarise(jobs) for m, jobs in by_m.items() if jobs} for ws, by_m in raw.items()}
    ratios: dict[str, Any] = {}
    for ws, r in results.items():

        def med(m: str, k: str) -> float | None:
            return r.get(m, {}).get(k, {}).get("median")

        floor = med("copy_floor", "blocked_s")
        ratios[ws] = {}
        for ours in ("ours_blocking", "ours_overlap"):
            b, c = med(ours, "blocked_s"), med(ours, "call_to_commit_s")
            ratios[ws][ours] = {
                "blocked_over_copy_floor": b / floor if b and floor else None,
                **{
                    f"blocked_over_{d}": b / med(d, "blocked_s") if b and med(d, "blocked_s") else None
                    for d in ("dcp_reused_stager", "dcp_reused_stager_async_staging")
                },
                **{
                    f"call_to_commit_over_{d}": c / med(d, "call_to_commit_s")
                    if c and med(d, "call_to_commit_s")
                    else None
                    for d in ("dcp_reused_stager", "dcp_reused_stager_async_staging")
                },
            }
    doc = {
        "benchmark": "async_peers",
        "date": datetime.date.today().isoformat(),
        "config": {
            "param_mb_per_rank": args.mb,
            "saves_per_job": args.saves,
            "warmup_saves_dropped": 1,
            "rounds": args.rounds,
            "world_sizes": args.world_sizes,
            "width": WIDTH,
            "torch": torch.__version__,
            "stats": "per save the slower rank; median, min, max over every round's saves",
        },
        "host": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "results": results,
        "ratios": ratios,
        "errors": errors,
        "notes": [
            "CPU only, 2 cores shared by the ranks, their background writers and other jobs on the machine.",
            "DCP's pinned memory and non-blocking copies apply to CUDA tensors only; see benchmarks/gpu_check.py.",
        ],
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
