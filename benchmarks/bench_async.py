"""Async save benchmark: 2 ranks under torchrun, a state of N MB per rank (default 256).

    python benchmarks/bench_async.py [--mb 256] [--saves 5] [--out benchmarks/results/<date>-async.json]

For each method, one torchrun job (so peak RSS is per method) builds the same state — per
rank, 32 large tensors and 32 small ones holding N MB in all, under rank-specific names (each
rank writes its own N MB, as with FSDP shards) — and measures, over saves 2..5:

* ``stall_s``: how long the training loop is blocked by one save call;
* ``background_s``: from the save call to the committed checkpoint (ours: after the manifest
  update too; DCP: the upload future's completion), with the training loop running; and
  ``background_s_loop_idle`` for saves N+1..2N, the loop waiting (the raw write is timed so);
* ``step_s_idle`` / ``step_s_during_save``: median time of a training step (a 384x384
  matmul chain plus a small all-reduce) with no save running and while one runs;
* ``peak_rss_mb``: peak RSS of the rank minus its RSS before the state was built (the writer
  process of process modes is reported apart; shared-memory pages count in both).

Methods: ``ours_thread``, ``ours_process`` (CheckpointManager, async_save=True, local disk,
fsync on); ``dcp_async_thread`` / ``dcp_async_process`` (``dcp.async_save`` with its
defaults: a new staging copy per save); ``dcp_async_thread_cached_stager`` (``dcp.async_save``
with one ``DefaultStager`` kept across saves, so its staging storages are reused too);
``copy_floor`` (a plain ``copy_`` of the same tensors into preallocated buffers);
``raw_write_fsync`` (the same bytes written to one file per rank and fsynced, both ranks at
once). Numbers are the maximum over the two ranks (the slower rank stalls the job).
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
METHODS = [
    "copy_floor",
    "raw_write_fsync",
    "ours_thread",
    "ours_process",
    "dcp_async_thread",
    "dcp_async_thread_cached_stager",
    "dcp_async_process",
]


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hwm_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the worker (one rank) -------------------------------------------------------------------
class _SubmitRecorder:
    """The engine's observer seam: what each save() spent before returning (keys as before)."""

    last_submit: dict[str, float] = {}

    def submitted(self, timings: Any) -> None:
        self.last_submit = {k: getattr(timings, k) for k in ("wait_previous_s", "stage_s", "bytes", "deferred_bytes")}

    def finished(self, job: Any) -> None:
        pass


def worker(method: str, mb: int, saves: int, workdir: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    sys.path.insert(0, str(ROOT))
    import torch.distributed.checkpoint  # noqa: F401  (imports count in the baseline, not in the peak)

    import dist_ckpt  # noqa: F401

    base_rss = rss_mb()

    big = 32
    small_numel = 1024
    big_numel = (mb * 2**20 // 4 - big * small_numel) // big
    tensors = {f"r{rank}.w{i}": torch.randn(big_numel) for i in range(big)}
    tensors.update({f"r{rank}.b{i}": torch.randn(small_numel) for i in range(big)})
    state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    class Shard:
        def state_dict(self) -> dict[str, Any]:
            return dict(tensors)

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            tensors.update(sd)

    a, b = torch.randn(384, 384), torch.randn(384, 384)
    token = torch.zeros(1)

    def train_step(done: Any = None) -> tuple[float, bool]:
        """One step; its all-reduce also tells whether ``done()`` holds on every rank, so all
        ranks run the same number of steps."""
        t = time.perf_counter()
        x = a
        for _ in range(4):
            x = torch.mm(x, b).tanh_()
        token[0] = 1.0 if done is not None and done() else 0.0
        dist.all_reduce(token, op=dist.ReduceOp.MIN)
        return time.perf_counter() - t, bool(token[0])

    def mutate() -> None:  # the optimizer step: every tensor changes in place
        for t in tensors.values():
            t.mul_(1.0001)

    idle = [train_step()[0] for _ in range(20)]
    result: dict[str, Any] = {
        "rank": rank,
        "state_mb": state_bytes / 2**20,
        "stall_s": [],
        "background_s": [],
        "step_s_during_save": [],
        "step_s_idle": statistics.median(idle),
    }
    root = Path(workdir) / method
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()

    def during(done: Any) -> None:
        """Training steps until the save is done on every rank (at most 400)."""
        for _ in range(400):
            dt, all_done = train_step(done)
            if all_done:
                return
            result["step_s_during_save"].append(dt)
        while not done():
            time.sleep(0.001)

    if method == "copy_floor":
        buffers = {k: torch.empty_like(v) for k, v in tensors.items()}
        for _ in range(saves):
            mutate()
            dist.barrier()
            t = time.perf_counter()
            for k, v in tensors.items():
                buffers[k].copy_(v)
            result["stall_s"].append(time.perf_counter() - t)
    elif method == "raw_write_fsync":
        root.mkdir(parents=True, exist_ok=True)
        for i in range(saves):
            mutate()
            dist.barrier()
            t = time.perf_counter()
            path = root / f"rank{rank}-{i}.bin"
            with open(path, "wb") as f:
                for v in tensors.values():
                    f.write(memoryview(v.numpy()).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            result["background_s"].append(time.perf_counter() - t)
            dist.barrier()
            path.unlink()
    elif method.startswith("ours"):
        from dist_ckpt import CheckpointManager

        mode = method.split("_", 1)[1]
        mgr = CheckpointManager(str(root), async_save=True, async_mode=mode, keep_last=2)
        state = mgr.track(shard=Shard())
        engine = mgr._engine
        engine.observer = observer = _SubmitRecorder()
        result["submit_breakdown"] = []
        for i in range(saves):
            mutate()
            dist.barrier()
            t = time.perf_counter()
            mgr.save(i, state, force=True)
            result["stall_s"].append(time.perf_counter() - t)
            result["submit_breakdown"].append(observer.last_submit)
            job = engine._job
            during(job.done.is_set)
            mgr.wait()
            result["background_s"].append(job.finished - job.submitted)
            result.setdefault("background_parts", []).append(job.timings)
        for i in range(saves, 2 * saves):  # the same, the loop idle meanwhile
            mutate()
            dist.barrier()
            mgr.save(i, state, force=True)
            job = engine._job
            mgr.wait()
            result.setdefault("background_s_loop_idle", []).append(job.finished - job.submitted)
            result.setdefault("background_parts_loop_idle", []).append(job.timings)
        result["staging_mb"] = engine.stager.nbytes / 2**20
        result["staging_allocations"] = engine.stager.allocations
        if engine.process is not None:
            result["writer_process_peak_rss_mb"] = hwm_mb(engine.process.pid)
        mgr.close()
    elif method.startswith("dcp_async"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if method.endswith("process") else AsyncCheckpointerType.THREAD
        stager = DefaultStager(StagingOptions(False, False, False, False)) if method.endswith("cached_stager") else None
        # its own gloo group: the loop's all_reduce runs on the default group meanwhile (sharing one
        # group between two threads deadlocks)
        group = dist.new_group(backend="gloo")
        for i in range(saves):
            mutate()
            dist.barrier()
            finished: list[float] = []
            t = time.perf_counter()
            fut = dcp.async_save(
                {"shard": dict(tensors)},
                checkpoint_id=str(root / f"step{i}"),
                async_checkpointer_type=kind,
                async_stager=stager,
                process_group=group,
            )
            result["stall_s"].append(time.perf_counter() - t)
            fut.add_done_callback(lambda _f: finished.append(time.perf_counter()))
            during(lambda: bool(finished))
            fut.result()
            result["background_s"].append(finished[0] - t)
            dist.barrier()
            if rank == 0 and i >= 2:
                shutil.rmtree(root / f"step{i - 2}", ignore_errors=True)
        for i in range(saves, 2 * saves):  # the same, the loop idle meanwhile
            mutate()
            dist.barrier()
            t = time.perf_counter()
            fut = dcp.async_save(
                {"shard": dict(tensors)},
                checkpoint_id=str(root / f"step{i}"),
                async_checkpointer_type=kind,
                async_stager=stager,
                process_group=group,
            )
            fut.result()
            result.setdefault("background_s_loop_idle", []).append(time.perf_counter() - t)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(root / f"step{i - 2}", ignore_errors=True)
        if stager is not None:
            stager.close()
    result["peak_rss_mb"] = hwm_mb() - base_rss
    result["rss_before_state_mb"] = base_rss
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()
    if method == "dcp_async_process":
        os._exit(0)  # DCP's checkpoint process is torn down by its own atexit otherwise (slow)


# -- the launcher ------------------------------------------------------------------------------
def _summary(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    def worst(key: str, skip_first: bool = True) -> dict[str, float] | None:
        per_rank = [r[key][1:] if skip_first else r[key] for r in ranks if r.get(key)]
        if not per_rank:
            return None
        per_save = [max(vals) for vals in zip(*per_rank)]  # the slower rank of each save
        return {"median": statistics.median(per_save), "max": max(per_save), "min": min(per_save), "all": per_save}

    out: dict[str, Any] = {"state_mb_per_rank": ranks[0]["state_mb"]}
    stall = worst("stall_s")
    if stall:
        out["stall_s"] = stall
    bg = worst("background_s", skip_first=ranks[0].get("stall_s") is not None and bool(ranks[0]["stall_s"]))
    if bg:
        out["background_s"] = bg
    if ranks[0].get("background_s_loop_idle"):
        out["background_s_loop_idle"] = worst("background_s_loop_idle", skip_first=False)
    for key in ("background_parts", "background_parts_loop_idle"):
        if ranks[0].get(key):  # write_s: until COMMITTED is published; then the manifest, retention, the exchange
            out[f"{key}_rank0_median"] = {
                k: statistics.median(p[k] for p in ranks[0][key][1:]) for k in ranks[0][key][0]
            }
    out["step_s_idle"] = max(r["step_s_idle"] for r in ranks)
    during = [s for r in ranks for s in r["step_s_during_save"]]
    if during:
        out["step_s_during_save"] = {"median": statistics.median(during), "max": max(during), "n": len(during)}
    out["peak_rss_mb_over_baseline"] = max(r["peak_rss_mb"] for r in ranks)
    for key in ("staging_mb", "staging_allocations", "writer_process_peak_rss_mb"):
        if key in ranks[0]:
            out[key] = max(r[key] for r in ranks)
    if "submit_breakdown" in ranks[0]:
        out["submit_breakdown_rank0_last"] = ranks[0]["submit_breakdown"][-1]
    return out


def launch(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-async-", dir="/tmp"))
    for method in args.methods:
        out = workdir / f"{method}.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
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
        t = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # torchrun and its ranks
            output, _ = proc.communicate()
            output += f"\n(timed out after {args.timeout:.0f}s)"
        if proc.returncode != 0:
            results[method] = {"error": output[-3000:]}
            print(f"{method}: FAILED", file=sys.stderr)
            continue
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
        results[method] = _summary(ranks)
        print(f"{method}: done in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def targets(r: dict[str, Any]) -> dict[str, Any]:
    def med(method: str, key: str) -> float | None:
        v = r.get(method, {}).get(key)
        return v["median"] if isinstance(v, dict) else None

    floor, raw = med("copy_floor", "stall_s"), med("raw_write_fsync", "background_s")
    dcp_stall, dcp_cached = med("dcp_async_thread", "stall_s"), med("dcp_async_thread_cached_stager", "stall_s")
    out: dict[str, Any] = {}
    for mode in ("ours_thread", "ours_process"):
        if mode not in r or "error" in r[mode]:
            continue
        stall, bg, bg_idle = med(mode, "stall_s"), med(mode, "background_s"), med(mode, "background_s_loop_idle")
        model_mb = r[mode]["state_mb_per_rank"]
        rss_budget = (model_mb + r[mode].get("staging_mb", 0)) * 1.1
        out[mode] = {
            "stall_over_copy_floor": stall / floor if floor else None,
            "target_stall_over_copy_floor": 1.5,
            "stall_over_dcp_async_stall": stall / dcp_stall if dcp_stall else None,
            "target_stall_over_dcp_async_stall": 0.3,
            "background_over_raw_write_fsync": bg_idle / raw if raw else None,
            "target_background_over_raw_write_fsync": 1.3,
            "background_over_raw_write_fsync_while_training": bg / raw if raw else None,
            "stall_over_dcp_async_cached_stager_stall": stall / dcp_cached if dcp_cached else None,
            "peak_rss_mb_over_baseline": r[mode]["peak_rss_mb_over_baseline"],
            "rss_budget_mb_model_plus_staging_plus_10pct": rss_budget,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256, help="state size per rank (MB)")
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.mb, args.saves, args.workdir, args.out)
        return
    load_before = os.getloadavg()
    results = launch(args)
    doc = {
        "benchmark": "bench_async",
        "date": datetime.date.today().isoformat(),
        "config": {"mb_per_rank": args.mb, "saves": args.saves, "ranks": 2, "stats_over": "saves 2..N, max over ranks"},
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": sys.version.split()[0],
        },
        "results": results,
        "targets": targets(results),
        "notes": [
            "2 ranks on a 2-CPU VM: each rank's background writer competes with both training loops for the CPUs; "
            "timings vary from run to run by 20-50%.",
            "background_s (ours) ends after rank 0's manifest update and retention and the ranks' outcome exchange; "
            "write_s in background_parts is the time until COMMITTED is published.",
            "dcp_async_* use torch's FileSystemWriter and a dedicated gloo group (sharing the default group with the "
            "training loop's all-reduce deadlocks).",
            "peak_rss_mb_over_baseline: VmHWM minus VmRSS after imports, before the state was built.",
        ],
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
