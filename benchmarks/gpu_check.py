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
- ``overlap_staging``: ``async_save=True`` (overlapped staging; ``"overlap"`` before
  2026-11-27) with a CUDA model and AdamW: the loop's blocked
  time per save (the call plus the wait before the next optimizer step) against
  ``async_save="staged"``, each overlapped checkpoint equal to the parameters at its save(), and
  a write through ``param.data`` right after a save failing it (``SnapshotInconsistent``).

The timed sections (stall, compute_overlap, overlap_staging) are in gpu_timings.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from gpu_timings import (
    ROOT,
    MiB,
    compute_overlap,
    overlap_staging,
    stall_and_staging,
)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--state-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", help="run only these sections (comma-separated names)")
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
        ("overlap_staging", lambda: overlap_staging(args.state_mib * MiB, 5)),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        sections = [(name, run) for name, run in sections if name in wanted]
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
