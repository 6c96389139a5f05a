"""The timed sections of benchmarks/gpu_check.py (CUDA only): the save call's stall and the
staging copy, compute overlapped with a save in flight, and the overlap staging mode; medians
of interleaved rounds."""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def model_of_bytes(nbytes: int, device: str) -> Any:
    import torch

    width = 4096
    layers = max(1, nbytes // (width * width * 4))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)


def _median(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _usable_stager(stagers: dict[str, Any], name: str, make: Any, self_closing: set[str]) -> Any:
    """The stager to use for this save: the reused one, or a new one where DCP closed it.

    Seen on the GPU machine (torch 2.11.0+cu130): ``DefaultStager._stage`` calls
    ``StateDictStager.close()`` after every stage, which empties its deep-copy dispatch table
    and storage cache, so a reused stager fails on its second save (KeyError: <class 'type'>).
    torch 2.13 keeps the stager usable. Where it closed itself, a fresh stager per save is the
    best configuration that DCP version allows (its caches are dropped either way)."""
    stager = stagers[name]
    if not stager._state_dict_stager._deepcopy_dispatch:
        stager = stagers[name] = make()
        self_closing.add(name)
    return stager


def stall_and_staging(state_bytes: int, rounds: int) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from dist_ckpt import CheckpointManager

    model = model_of_bytes(state_bytes, "cuda:0")
    tensors = list(model.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    floor_buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy_floor() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        offset = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            floor_buffer[offset : offset + n].copy_(t.view(-1).view(torch.uint8), non_blocking=True)
            offset += n
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    mgr = CheckpointManager(str(work / "ours"), async_save="staged", keep_last=1)
    state = mgr.track(model=model)
    makers = {
        "dcp_blocking_staging": lambda: DefaultStager(
            StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False)
        ),
        "dcp_async_staging": lambda: DefaultStager(
            StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=True)
        ),
    }
    stagers = {name: make() for name, make in makers.items()}
    self_closing: set[str] = set()
    timings: dict[str, list[float]] = {"ours": [], "ours_to_commit": [], "floor": []}
    timings.update({name: [] for name in stagers})
    timings.update({f"{name}_to_commit": [] for name in stagers})
    buffers = []
    for step in range(rounds + 1):  # round 0 allocates the staging buffers: not counted
        timings_this = {}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mgr.save(step, state, force=True)
        timings_this["ours"] = time.perf_counter() - t0
        mgr.wait()
        timings_this["ours_to_commit"] = time.perf_counter() - t0
        buffer = mgr._engine.stager.buffer  # the reused staging buffer (test-only peek)
        buffers.append({"data_ptr": buffer.data_ptr(), "pinned": bool(buffer.is_pinned())})
        for name in list(stagers):
            stager = _usable_stager(stagers, name, makers[name], self_closing)
            target = work / f"{name}_{step}"
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            response = dcp.async_save(
                dict(model.state_dict()), checkpoint_id=str(target), async_stager=stager, no_dist=True
            )
            staged = getattr(response, "staging_completion", None)
            if staged is not None:
                staged.result()  # parameters may change only after staging completed
            timings_this[name] = time.perf_counter() - t0
            upload = getattr(response, "upload_completion", response)
            upload.result()
            timings_this[f"{name}_to_commit"] = time.perf_counter() - t0
            shutil.rmtree(target, ignore_errors=True)
        timings_this["floor"] = copy_floor()
        if step > 0:
            for key, value in timings_this.items():
                timings[key].append(value)
    mgr.close()
    for stager in stagers.values():
        stager.close()
    shutil.rmtree(work, ignore_errors=True)
    summary = {key: _median(values) for key, values in timings.items()}
    floor = summary["floor"]["median"]
    ours = summary["ours"]["median"]
    return {
        "state_mib": nbytes / MiB,
        "seconds": summary,
        "ours_stall_vs_floor": ours / floor,
        "ours_stall_vs_dcp": {name: ours / summary[name]["median"] for name in stagers},
        "dcp_stagers_closed_after_each_save": sorted(self_closing),
        "pinned_staging": {
            "pinned_every_save": all(b["pinned"] for b in buffers),
            "same_buffer_every_save": len({b["data_ptr"] for b in buffers}) == 1,
            "saves": len(buffers),
        },
    }


def compute_overlap(state_bytes: int, steps: int) -> dict[str, Any]:
    import torch

    from dist_ckpt import CheckpointManager

    a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.bfloat16)

    def step() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    model = model_of_bytes(state_bytes, "cuda:0")
    work = tempfile.mkdtemp(prefix="gpu_overlap_")
    mgr = CheckpointManager(work, async_save="staged", keep_last=1)
    state = mgr.track(model=model)
    mgr.save(0, state, force=True)
    mgr.wait()
    idle, busy = [], []
    for round_ in range(1, 4):
        idle += [step() for _ in range(steps)]
        mgr.save(round_, state, force=True)
        busy += [step() for _ in range(steps)]  # the write of this save runs meanwhile
        mgr.wait()
    mgr.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "step_s_without_save": _median(idle),
        "step_s_with_save_in_flight": _median(busy),
        "ratio": statistics.median(busy) / statistics.median(idle),
        "overlap_staging_with_compute": "see the overlap_staging section (async_save='overlap')",
    }


def overlap_staging(state_bytes: int, rounds: int) -> dict[str, Any]:
    """Overlapped staging (``async_save=True``, since 2026-11-27; ``"overlap"`` before) with
    real CUDA compute: the loop's blocked time per save (the
    call plus the wait before the next optimizer step) against ``async_save="staged"`` (before
    2026-11-27: ``True``, which meant staged then), rounds
    interleaved; and every overlapped checkpoint equals the state at its save() exactly.

    The host's blocked time alone undersells the overlap on a GPU: CUDA kernels are queued
    asynchronously, so the host waits for the copy either way, but with the overlap the GPU runs
    the forward/backward meanwhile. The iteration's wall time (save, forward/backward, optimizer
    step, synchronize) is therefore measured too, with an iteration that saves nothing as the
    baseline."""
    import torch

    from dist_ckpt import CheckpointManager

    torch.manual_seed(0)
    model = model_of_bytes(state_bytes // 3, "cuda:0")  # parameters plus AdamW's two moments
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 4096, device="cuda:0")

    def fwd_bwd() -> None:
        opt.zero_grad()
        for _ in range(4):  # gradient accumulation: a step long enough to hide a copy in
            model(x).float().pow(2).mean().backward()

    fwd_bwd()
    opt.step()
    work = tempfile.mkdtemp(prefix="gpu_overlap_staging_")
    managers = {
        # "overlap": the default, async_save=True (the same tensors deferred as "overlap" here)
        mode: CheckpointManager(f"{work}/{mode}", async_save="staged" if mode == "blocking" else True, keep_last=2)
        for mode in ("blocking", "overlap")
    }
    states = {mode: mgr.track(model=model, optimizer=opt) for mode, mgr in managers.items()}
    blocked: dict[str, list[float]] = {mode: [] for mode in managers}
    iteration: dict[str, list[float]] = {mode: [] for mode in (*managers, "no_save")}
    exact: list[bool] = []
    step = 0
    for round_ in range(rounds + 1):
        fwd_bwd()
        opt.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd()
        opt.step()
        torch.cuda.synchronize()
        if round_:
            iteration["no_save"].append(time.perf_counter() - t0)
        for mode, mgr in managers.items():
            step += 1
            fwd_bwd()
            opt.step()
            torch.cuda.synchronize()
            expected = [p.detach().clone() for p in model.parameters()]
            torch.cuda.synchronize()
            t_iter = t0 = time.perf_counter()
            mgr.save(step, states[mode], force=True)
            took = time.perf_counter() - t0
            fwd_bwd()  # the overlapped copy runs meanwhile
            t0 = time.perf_counter()
            mgr.wait_staged()  # what the optimizer's step pre-hook does
            took += time.perf_counter() - t0
            opt.step()  # changes every parameter: a copy not yet done would show in the checkpoint
            torch.cuda.synchronize()
            iterated = time.perf_counter() - t_iter
            mgr.wait()
            if round_:
                blocked[mode].append(took)
                iteration[mode].append(iterated)
            if mode == "overlap":
                probe = model_of_bytes(state_bytes // 3, "cuda:0")
                popt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
                reader = CheckpointManager(f"{work}/{mode}", read_only=True)
                reader.restore(reader.track(model=probe, optimizer=popt), which=step)
                reader.close()
                exact.append(all(torch.equal(a, b) for a, b in zip(probe.parameters(), expected)))
    # a write through param.data right after save(): no version counter counts it; the join's
    # byte samples (taken on the training stream at save()) must, and fail the save
    from dist_ckpt.errors import SnapshotInconsistent

    step += 1
    managers["overlap"].save(step, states["overlap"], force=True)
    next(model.parameters()).data.mul_(0.5)
    fwd_bwd()
    opt.step()
    try:
        managers["overlap"].wait()
        data_write = "not detected"
    except SnapshotInconsistent:
        data_write = "SnapshotInconsistent"
    for mgr in managers.values():
        mgr.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "param_data_write_after_save": data_write,
        "blocked_s_blocking": _median(blocked["blocking"]),
        "blocked_s_overlap": _median(blocked["overlap"]),
        "overlap_over_blocking": statistics.median(blocked["overlap"]) / statistics.median(blocked["blocking"]),
        "iteration_s": {mode: _median(values) for mode, values in iteration.items()},
        "iteration_overlap_over_blocking": statistics.median(iteration["overlap"])
        / statistics.median(iteration["blocking"]),
        "overlap_checkpoints_equal_state_at_save": all(exact),
        "checked": len(exact),
    }
