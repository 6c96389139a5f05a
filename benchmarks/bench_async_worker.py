"""One rank of benchmarks/bench_async.py (run by it under torchrun with ``--worker METHOD``):
builds the state, saves it with one method, and writes what it measured as JSON."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


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
    # BENCH_DIST_CKPT_TREE: another checkout's package (bench_async.py --baseline-tree), measured
    # side by side with this one's
    sys.path.insert(0, os.environ.get("BENCH_DIST_CKPT_TREE", str(ROOT)))
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
        import gc
        import threading

        from dist_ckpt import CheckpointManager

        gc_pauses = {"s": 0.0, "t": 0.0}
        main = threading.get_ident()

        def gc_timer(phase: str, info: dict[str, Any]) -> None:  # collections in this thread only
            if threading.get_ident() != main:
                return
            if phase == "start":
                gc_pauses["t"] = time.perf_counter()
            else:
                gc_pauses["s"] += time.perf_counter() - gc_pauses["t"]

        gc.callbacks.append(gc_timer)

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
            gc_pauses["s"] = 0.0
            mgr.save(i, state, force=True)
            result["stall_s"].append(time.perf_counter() - t)
            result.setdefault("gc_s_in_save", []).append(gc_pauses["s"])
            result["submit_breakdown"].append(observer.last_submit)
            job = engine._job
            during(job.done.is_set)
            mgr.wait()
            result["background_s"].append(job.finished - job.submitted)
            result.setdefault("background_parts", []).append(job.timings)
        for i in range(saves, 2 * saves):  # the same, the loop idle meanwhile
            mutate()
            dist.barrier()
            t, called = time.perf_counter(), time.monotonic()  # Job.finished is time.monotonic()
            mgr.save(i, state, force=True)
            result.setdefault("stall_s_loop_idle", []).append(time.perf_counter() - t)
            result.setdefault("submit_breakdown_loop_idle", []).append(observer.last_submit)
            job = engine._job
            mgr.wait()
            result.setdefault("background_s_loop_idle", []).append(job.finished - job.submitted)
            # from the save() call: a rank that no longer waits for the others in save() (rank 0,
            # the decision send) starts its job earlier and waits in the job's first collective
            result.setdefault("call_to_commit_s_loop_idle", []).append(job.finished - called)
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
