"""GPU check (≤ 5 min on one GPU): the CUDA paths that cannot run on the CPU-only dev machine.

Run it whenever a GPU machine is lent (``python benchmarks/gpu_check.py --out result.json``);
it prints one JSON object and commits nothing by itself. Sections:

- ``contexts``: RNG capture (a save) and restore must not create a CUDA context on a device
  the process never used. Each case runs in a fresh child process, before this process touches
  CUDA, and reads per-device memory through NVML (no context of its own): a CPU-only job on a
  GPU machine, a job on ``cuda:0`` only, and — for comparison — what
  ``torch.cuda.get_rng_state_all()`` (the former capture) costs.
- ``rng``: every visible device's generator is captured by a save and restored exactly.
- ``nccl_single_rank``: one torchrun rank on NCCL — async saves, saves that are not due (the
  decision broadcast on the CUDA device), a restore that gives back exactly what was saved.
- ``pinned_staging``: async saves of CUDA tensors stage into one pinned buffer, reused.
- ``stall``: async-save stall of CUDA tensors (2nd+ saves, interleaved rounds) vs
  ``dcp.async_save`` with a reused pinned ``DefaultStager`` (blocking and async staging) and the
  device-to-host copy floor into a reused pinned buffer.
- ``compute_overlap``: GPU step time (bf16 matmuls) while a background save is in flight, as a
  ratio of the step time without one.
- ``overlap_staging``: ``async_save="overlap"`` with a CUDA model and AdamW: the loop's blocked
  time per save (the call plus the wait before the next optimizer step) against
  ``async_save=True``, and each overlapped checkpoint equal to the parameters at its save().
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def _child_nccl() -> None:
    """One torchrun rank on NCCL: async saves of CUDA tensors, no-op saves (the decision
    broadcast goes to the CUDA device NCCL needs), a restore, exactness of what came back."""
    import torch
    import torch.distributed as dist

    from dist_ckpt import CheckpointManager

    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.AdamW(model.parameters())
    with tempfile.TemporaryDirectory() as root:
        mgr = CheckpointManager(root, async_save=True, save_every_n_steps=3, best={"loss": "min"})
        state = mgr.track(model=model, optimizer=opt)
        saved = []
        for step in range(7):
            loss = model(torch.randn(8, 256, device="cuda")).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            saved.append(mgr.save(step, state, metrics={"loss": 1.0 + step}))  # worse each step
        mgr.wait()
        expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        info = mgr.restore(state)
        exact = all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
        mgr.close()
    dist.destroy_process_group()
    print(json.dumps({"saved": saved, "restored_step": info.step if info else None, "exact": exact}))


def nccl_single_rank() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", __file__, "--child-nccl"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _nvml_memory() -> list[dict[str, Any]]:
    """Per device: used MiB and this process's MiB, read through NVML (creates no context)."""
    import pynvml

    pynvml.nvmlInit()
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        mine = [
            p.usedGpuMemory
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == os.getpid() and p.usedGpuMemory is not None
        ]
        out.append(
            {
                "device": i,
                "used_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).used / MiB,
                "this_process_mib": sum(mine) / MiB if mine else 0.0,
            }
        )
    return out


def _child_context_case(case: str) -> dict[str, Any]:
    """Runs in a fresh child: one save + restore (or the former capture) and memory around it."""
    import torch

    from dist_ckpt import CheckpointManager

    before = _nvml_memory()
    initialized_before = torch.cuda.is_initialized()
    if case == "former_get_rng_state_all":
        torch.cuda.get_rng_state_all()
    else:
        device = "cuda:0" if case == "cuda0_job" else "cpu"
        model = torch.nn.Linear(64, 64).to(device)
        with tempfile.TemporaryDirectory() as root:
            mgr = CheckpointManager(root)
            state = mgr.track(model=model)
            mgr.save(0, state, force=True)
            mgr.restore(state)
            mgr.close()
    time.sleep(1.0)  # NVML's per-process accounting lags a little
    return {
        "case": case,
        "cuda_initialized_before": initialized_before,
        "cuda_initialized_after": torch.cuda.is_initialized(),
        "memory_before": before,
        "memory_after": _nvml_memory(),
    }


def contexts() -> dict[str, Any]:
    results = {}
    for case in ("cpu_only_job", "cuda0_job", "former_get_rng_state_all"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child-context", case],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        )
        if proc.returncode != 0:
            results[case] = {"error": proc.stderr[-3000:]}
            continue
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = results.get("cpu_only_job", {})
    results["cpu_only_job_created_no_context"] = cpu.get("cuda_initialized_after") is False
    return results


def _model(nbytes: int, device: str) -> Any:
    import torch

    width = 4096
    layers = max(1, nbytes // (width * width * 4))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)


def rng_roundtrip() -> dict[str, Any]:
    import torch

    from dist_ckpt import CheckpointManager

    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    torch.manual_seed(1234)
    for d in devices:
        torch.rand(1000, device=d)  # advance every generator away from its seed
    model = torch.nn.Linear(16, 16).to(devices[0])
    with tempfile.TemporaryDirectory() as root:
        mgr = CheckpointManager(root)
        state = mgr.track(model=model)
        mgr.save(0, state, force=True)
        expected = [torch.rand(8, device=d).cpu() for d in devices]
        for d in devices:
            torch.rand(12345, device=d)
        mgr.restore(state)
        got = [torch.rand(8, device=d).cpu() for d in devices]
        mgr.close()
    return {
        "devices": len(devices),
        "every_device_restored_exactly": all(torch.equal(a, b) for a, b in zip(expected, got)),
    }


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

    model = _model(state_bytes, "cuda:0")
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

    mgr = CheckpointManager(str(work / "ours"), async_save=True, keep_last=1)
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

    model = _model(state_bytes, "cuda:0")
    work = tempfile.mkdtemp(prefix="gpu_overlap_")
    mgr = CheckpointManager(work, async_save=True, keep_last=1)
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
    """``async_save="overlap"`` with real CUDA compute: the loop's blocked time per save (the
    call plus the wait before the next optimizer step) against ``async_save=True``, rounds
    interleaved; and every overlapped checkpoint equals the state at its save() exactly."""
    import torch

    from dist_ckpt import CheckpointManager

    torch.manual_seed(0)
    model = _model(state_bytes // 3, "cuda:0")  # parameters plus AdamW's two moments
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 4096, device="cuda:0")

    def fwd_bwd() -> None:
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()

    fwd_bwd()
    opt.step()
    work = tempfile.mkdtemp(prefix="gpu_overlap_staging_")
    managers = {
        mode: CheckpointManager(f"{work}/{mode}", async_save=True if mode == "blocking" else "overlap", keep_last=2)
        for mode in ("blocking", "overlap")
    }
    states = {mode: mgr.track(model=model, optimizer=opt) for mode, mgr in managers.items()}
    blocked: dict[str, list[float]] = {mode: [] for mode in managers}
    exact: list[bool] = []
    step = 0
    for round_ in range(rounds + 1):
        for mode, mgr in managers.items():
            step += 1
            fwd_bwd()
            opt.step()
            torch.cuda.synchronize()
            expected = [p.detach().clone() for p in model.parameters()]
            t0 = time.perf_counter()
            mgr.save(step, states[mode], force=True)
            took = time.perf_counter() - t0
            fwd_bwd()  # the overlapped copy runs meanwhile
            t0 = time.perf_counter()
            mgr.wait_staged()  # what the optimizer's step pre-hook does
            took += time.perf_counter() - t0
            opt.step()  # changes every parameter: a copy not yet done would show in the checkpoint
            mgr.wait()
            if round_:
                blocked[mode].append(took)
            if mode == "overlap":
                probe = _model(state_bytes // 3, "cuda:0")
                popt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
                reader = CheckpointManager(f"{work}/{mode}", read_only=True)
                reader.restore(reader.track(model=probe, optimizer=popt), which=step)
                reader.close()
                exact.append(all(torch.equal(a, b) for a, b in zip(probe.parameters(), expected)))
    for mgr in managers.values():
        mgr.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "blocked_s_blocking": _median(blocked["blocking"]),
        "blocked_s_overlap": _median(blocked["overlap"]),
        "overlap_over_blocking": statistics.median(blocked["overlap"]) / statistics.median(blocked["blocking"]),
        "overlap_checkpoints_equal_state_at_save": all(exact),
        "checked": len(exact),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--state-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child-context", help=argparse.SUPPRESS)
    parser.add_argument("--child-nccl", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_nccl:
        _child_nccl()
        return
    if args.child_context:
        print(json.dumps(_child_context_case(args.child_context)))
        return
    import torch

    result: dict[str, Any] = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible; run it on a GPU machine")
    # contexts first: this process must not hold a CUDA context while children are measured
    sections = [
        ("contexts", contexts),
        ("rng", rng_roundtrip),
        ("nccl_single_rank", nccl_single_rank),
        ("stall", lambda: stall_and_staging(args.state_mib * MiB, args.rounds)),
        ("compute_overlap", lambda: compute_overlap(args.state_mib * MiB, 5)),
        ("overlap_staging", lambda: overlap_staging(args.state_mib * MiB, 3)),
    ]
    for name, run in sections:
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception:  # a section's failure is a finding: report it and run the others
            result[name] = {"error": traceback.format_exc()[-3000:]}
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    result["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
