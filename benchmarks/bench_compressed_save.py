"""Save and load wall time of a compressed (zstd) vs an uncompressed checkpoint, to local disk
and to S3 on loopback (a SeaweedFS it starts itself).

    python benchmarks/bench_compressed_save.py [--mb 128] [--dtype bf16|fp32] [--no-s3]

The state is ``--mb`` MB of weight-like tensors (normal ×0.02, 16 tensors) in one process,
saved with ``dist_ckpt.save`` (codec none and zstd-1), best of 3. Prints JSON: per target and
codec the save/load seconds and stored bytes, and zstd's time and size relative to none.
Compression trades CPU for bytes: it wins where bandwidth, not CPU, is the limit (S3, NFS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import dist_ckpt  # noqa: E402
from storage_backends import open_backend  # noqa: E402


def _state(mb: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    per = mb * 1024 * 1024 // 16 // torch.empty((), dtype=dtype).element_size()
    return {f"layer{i}.weight": (torch.randn(per, generator=g) * 0.02).to(dtype) for i in range(16)}


def _stored_bytes(uri: str) -> int:
    backend = open_backend(uri)
    return sum(o.size for o in backend.list("") if o.key.endswith(".safetensors"))


def _measure(root: str, state: dict[str, torch.Tensor], codec: str, repeat: int) -> dict[str, Any]:
    saves, loads, stored = [], [], 0
    for attempt in range(repeat):
        uri = f"{root}/{codec}-{attempt}/step_000000001"
        t0 = time.perf_counter()
        dist_ckpt.save(state, uri, compression=codec)
        saves.append(time.perf_counter() - t0)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        t0 = time.perf_counter()
        dist_ckpt.load(target, uri)
        loads.append(time.perf_counter() - t0)
        assert all(torch.equal(target[k], state[k]) for k in state)
        stored = _stored_bytes(f"{root}/{codec}-{attempt}")
    return {"save_s": round(min(saves), 4), "load_s": round(min(loads), 4), "stored_MB": round(stored / 2**20, 1)}


def _target(name: str, root: str, state: dict[str, torch.Tensor], repeat: int) -> dict[str, Any]:
    none, zstd = _measure(root, state, "none", repeat), _measure(root, state, "zstd", repeat)
    return {
        "none": none,
        "zstd": zstd,
        "zstd_over_none": {k: round(zstd[k] / none[k], 3) for k in ("save_s", "load_s", "stored_MB")},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    state = _state(args.mb, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    out: dict[str, Any] = {
        "benchmark": "compressed_save",
        "date": time.strftime("%Y-%m-%d"),
        "mb": args.mb,
        "dtype": args.dtype,
        "cpus": os.cpu_count(),
        "results": {},
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        out["results"]["local"] = _target("local", f"{tmp}/run", state, args.repeat)
        if not args.no_s3:
            from support.s3server import start_seaweedfs

            server = start_seaweedfs(Path(tmp) / "seaweed")
            try:
                os.environ.update(
                    {
                        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
                        "AWS_ACCESS_KEY_ID": server.access_key,
                        "AWS_SECRET_ACCESS_KEY": server.secret_key,
                        "AWS_REGION": server.region,
                    }
                )
                out["results"]["s3_loopback"] = _target("s3", f"s3://{server.create_bucket()}/run", state, args.repeat)
            finally:
                server.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
