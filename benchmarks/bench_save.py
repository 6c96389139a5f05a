"""Synchronous single-process save/load speed against the floor and against the alternatives.

A state of ``--mb`` MiB in ``--tensors`` tensors (fp32 and bf16, uneven sizes) is saved and
loaded, best of ``--repeat``, by:

- ``raw``:   the same bytes written to one file with ``os.write`` + ``fsync`` / read back with
             ``readinto`` straight into the target tensors — the floor for a durable save;
- ``ours``:  ``dist_ckpt.save`` / ``dist_ckpt.load`` (codec none, fsync on, checksums on);
- ``dcp``:   ``torch.distributed.checkpoint.save`` / ``load`` with ``FileSystemWriter`` /
             ``FileSystemReader`` (fsyncs its files by default);
- ``torch``: ``torch.save`` + ``fsync`` / ``torch.load(weights_only=True)``.

Loads run from the page cache (the files were just written). Prints one JSON document with
times (s, wall clock, best of the rounds), process CPU times, throughputs (GB/s) and the
ratios ``ours/raw`` and ``ours/dcp``; ``--out`` also writes it to a file. Rounds interleave the
contenders and every save starts after ``os.sync()``, so a slow spell of a shared disk or CPU,
or the previous contender's dirty pages, do not land on one contender only. Use a directory on a real disk
(``--dir``; the default is the system temp
dir, refused when it is a tmpfs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dist_ckpt  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", category=FutureWarning)


def make_state(total_mb: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` tensors totalling ``total_mb`` MiB: mostly fp32 matrices, every fourth bf16,
    sizes varying by a factor of ~3 (like the layers of a model)."""
    g = torch.Generator().manual_seed(seed)
    weights = [1 + (i * 7 % 5) for i in range(n)]
    total = total_mb * 2**20
    state: dict[str, torch.Tensor] = {}
    for i, w in enumerate(weights):
        dtype = torch.bfloat16 if i % 4 == 3 else torch.float32
        nbytes = total * w // sum(weights)
        cols = 1024
        rows = max(1, nbytes // (cols * dtype.itemsize))
        state[f"layers.{i:02d}.weight"] = torch.randn(rows, cols, generator=g).to(dtype)
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def empty_like_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty_like(v) for k, v in state.items()}


def raw_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the contenders --------------------------------------------------------------------------


def raw_save(state: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(path)
    fd = os.open(os.path.join(path, "data.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for t in state.values():
            view = raw_view(t)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_load(target: dict[str, torch.Tensor], path: str) -> None:
    with open(os.path.join(path, "data.bin"), "rb", buffering=0) as f:
        for t in target.values():
            view = raw_view(t)
            while view:
                n = f.readinto(view)
                if not n:
                    raise EOFError(path)
                view = view[n:]


def ours_save(state: dict[str, torch.Tensor], path: str) -> None:
    dist_ckpt.save(state, path)


def ours_load(target: dict[str, torch.Tensor], path: str) -> None:
    dist_ckpt.load(target, path)


def dcp_save(state: dict[str, torch.Tensor], path: str) -> None:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path), no_dist=True)


def dcp_load(target: dict[str, torch.Tensor], path: str) -> None:
    dcp.load(target, storage_reader=dcp.FileSystemReader(path), no_dist=True)


def torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(path)
    file = os.path.join(path, "state.pt")
    torch.save(state, file)
    fsync_path(file)


def torch_load(target: dict[str, torch.Tensor], path: str) -> None:
    loaded = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    target.update(loaded)


CONTENDERS: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {
    "raw": (raw_save, raw_load),
    "ours": (ours_save, ours_load),
    "dcp": (dcp_save, dcp_load),
    "torch": (torch_save, torch_load),
}


def fs_type(path: str) -> str:
    best, fstype = "", "unknown"
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mount = parts[1]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, fstype = mount, parts[2]
    return fstype


def run(mb: int, tensors: int, repeat: int, base_dir: str, only: list[str]) -> dict[str, Any]:
    state = make_state(mb, tensors)
    size = nbytes(state)
    work = tempfile.mkdtemp(prefix="bench_save-", dir=base_dir)
    save_times: dict[str, list[float]] = {name: [] for name in only}
    load_times: dict[str, list[float]] = {name: [] for name in only}
    save_cpu: dict[str, list[float]] = {name: [] for name in only}
    load_cpu: dict[str, list[float]] = {name: [] for name in only}
    try:
        # Rounds interleave the contenders, so a slow spell of a shared disk or CPU hits all
        # of them rather than one; the best of the rounds counts.
        last: dict[str, str] = {}
        for i in range(repeat):
            for name in only:
                path = os.path.join(work, name, f"step_{i:09d}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if name in last:
                    shutil.rmtree(last[name])
                gc.collect()
                # Start every save with no dirty pages (and the delete above committed), so its
                # fsync flushes only its own data, not what the previous contender left behind.
                os.sync()
                c0, t0 = time.process_time(), time.perf_counter()
                CONTENDERS[name][0](state, path)
                save_times[name].append(time.perf_counter() - t0)
                save_cpu[name].append(time.process_time() - c0)
                last[name] = path
        targets = {name: empty_like_state(state) for name in only}
        for name in only:  # warm-up: page cache, lazy imports, first-touch of the targets
            CONTENDERS[name][1](targets[name], last[name])
        for _ in range(repeat):
            for name in only:
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                CONTENDERS[name][1](targets[name], last[name])
                load_times[name].append(time.perf_counter() - t0)
                load_cpu[name].append(time.process_time() - c0)
        for name in only:  # every contender must really have loaded the data
            for k, v in state.items():
                if not torch.equal(targets[name][k], v):
                    raise AssertionError(f"{name}: {k} differs after load")
        del targets
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results: dict[str, Any] = {}
    for name in only:
        save_best, load_best = min(save_times[name]), min(load_times[name])
        results[name] = {
            "save_s": round(save_best, 4),
            "load_s": round(load_best, 4),
            "save_GBps": round(size / save_best / 1e9, 3),
            "load_GBps": round(size / load_best / 1e9, 3),
            "save_all_s": [round(t, 4) for t in save_times[name]],
            "load_all_s": [round(t, 4) for t in load_times[name]],
            # CPU time of this process (all threads), least of the rounds: the work done,
            # whatever the wall clock lost to other jobs on a shared machine.
            "save_cpu_s": round(min(save_cpu[name]), 4),
            "load_cpu_s": round(min(load_cpu[name]), 4),
        }

    def ratio(a: str, b: str, what: str) -> float | None:
        if a in results and b in results:
            return round(results[a][what] / results[b][what], 3)
        return None

    ratios = {
        "save_cpu_ours_over_raw": ratio("ours", "raw", "save_cpu_s"),
        "load_cpu_ours_over_raw": ratio("ours", "raw", "load_cpu_s"),
        "save_ours_over_raw": ratio("ours", "raw", "save_s"),
        "save_ours_over_dcp": ratio("ours", "dcp", "save_s"),
        "save_ours_over_torch": ratio("ours", "torch", "save_s"),
        "load_ours_over_raw": ratio("ours", "raw", "load_s"),
        "load_ours_over_dcp": ratio("ours", "dcp", "load_s"),
        "load_ours_over_torch": ratio("ours", "torch", "load_s"),
    }
    targets = {
        "save_ours_over_raw_max": 1.15,
        "load_ours_over_raw_max": 1.3,
        "load_ours_over_dcp_max": 0.8,
    }
    met = {
        "save_ours_over_raw": ratios["save_ours_over_raw"] is not None and ratios["save_ours_over_raw"] <= 1.15,
        "load_ours_over_raw": ratios["load_ours_over_raw"] is not None and ratios["load_ours_over_raw"] <= 1.3,
        "load_ours_over_dcp": ratios["load_ours_over_dcp"] is not None and ratios["load_ours_over_dcp"] <= 0.8,
    }
    return {
        "benchmark": "bench_save",
        "date": _dt.date.today().isoformat(),
        "config": {
            "mb": mb,
            "bytes": size,
            "tensors": tensors,
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
            "repeat": repeat,
            "statistic": "best of repeat; rounds interleave the contenders",
            "dir_fs": fs_type(base_dir),
            "page_cache": "loads read files just written (warm cache); saves fsync; os.sync() before each save",
        },
        "env": {
            "torch": torch.__version__,
            "dist_ckpt": dist_ckpt.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "targets_met": met,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="state size in MiB (default 512)")
    parser.add_argument("--tensors", type=int, default=16, help="number of tensors (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts (default 3)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (a real disk, not tmpfs)")
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help="comma-separated subset of " + ",".join(CONTENDERS)
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.tensors < 1 or args.mb < 1:
        parser.error("--mb and --tensors must be positive")
    if fs_type(args.dir) in ("tmpfs", "ramfs"):
        parser.error(f"{args.dir} is a {fs_type(args.dir)}: fsync costs nothing there; pass --dir on a real disk")
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(only) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    doc = run(args.mb, args.tensors, args.repeat, args.dir, only)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
