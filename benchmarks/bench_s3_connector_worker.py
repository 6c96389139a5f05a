"""One side of ``bench_s3_connector.py``: a client process that saves and loads one state to S3.

Each side runs in a process of its own so that the client CPU it reports is its own only (the
AWS CRT keeps event-loop threads alive between calls; boto3 keeps a thread pool): CPU time is
``resource.getrusage(RUSAGE_SELF)`` user + system of this process, all threads, around each
call. The server (SeaweedFS) is another process and is not counted.

Sides (``--side``):

* ``dist_ckpt``: ``dist_ckpt.save(state, uri, compression="none")`` / ``dist_ckpt.load``. The
  endpoint and credentials come from boto3's standard configuration (``AWS_ENDPOINT_URL_S3``,
  ``AWS_ACCESS_KEY_ID``, ...), as a user's job gets them; backend options are the defaults.
* ``s3torchconnector``: ``dcp.save`` with ``S3StorageWriter(region, uri,
  s3client_config=S3ClientConfig(force_path_style=True), thread_count=T)`` and ``dcp.load``
  with ``S3StorageReader`` (its default, ``S3ReaderConstructor.dcp_optimized()``). The endpoint
  comes from ``AWS_ENDPOINT_URL`` (the CRT client reads it), path-style addressing because a
  loopback server has no virtual-host DNS.

Protocol (one JSON line per message on the original stdout; libraries' prints go to stderr):
``{"ready": {...versions, "digest"}}``, then per command line -- ``save NAME``, ``load NAME``,
``verify``, ``quit`` -- ``{"wall_s", "cpu_s"}`` / ``{"ok"}`` / ``{"error"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_s3_fsspec_worker import make_state, state_digest  # noqa: E402


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def make_side(
    side: str, bucket: str, prefix: str, thread_count: int
) -> tuple[Callable[..., None], Callable[..., None], dict[str, Any]]:
    """``(save(state, name), load(target, name), versions)`` of one side."""
    import torch.distributed.checkpoint as dcp

    if side == "dist_ckpt":
        import boto3

        import dist_ckpt

        def save(state: dict[str, torch.Tensor], name: str) -> None:
            dist_ckpt.save(state, f"s3://{bucket}/{prefix}/{name}", compression="none")

        def load(target: dict[str, torch.Tensor], name: str) -> None:
            dist_ckpt.load(target, f"s3://{bucket}/{prefix}/{name}")

        try:
            import awscrt  # noqa: F401

            crt = getattr(awscrt, "__version__", "installed")
        except ImportError:
            crt = None
        return save, load, {"boto3": boto3.__version__, "awscrt": crt}

    if side == "s3torchconnector":
        import s3torchconnector
        from s3torchconnector import S3ClientConfig
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

        region = os.environ.get("AWS_REGION", "us-east-1")
        config = S3ClientConfig(force_path_style=True)

        def save(state: dict[str, torch.Tensor], name: str) -> None:
            writer = S3StorageWriter(
                region, f"s3://{bucket}/{prefix}/{name}", s3client_config=config, thread_count=thread_count
            )
            dcp.save(state, storage_writer=writer, no_dist=True)

        def load(target: dict[str, torch.Tensor], name: str) -> None:
            reader = S3StorageReader(region, f"s3://{bucket}/{prefix}/{name}", s3client_config=config)
            dcp.load(target, storage_reader=reader, no_dist=True)

        return save, load, {"s3torchconnector": s3torchconnector.__version__, "s3client_config": repr(config)}

    raise SystemExit(f"unknown --side {side!r} (expected dist_ckpt or s3torchconnector)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", required=True, choices=("dist_ckpt", "s3torchconnector"))
    ap.add_argument("--mb", type=int, required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--thread-count", type=int, default=8, help="S3StorageWriter thread_count")
    args = ap.parse_args()

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        save, load, versions = make_side(args.side, args.bucket, args.side, args.thread_count)
        state = make_state(args.mb)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        reply({"ready": {"digest": state_digest(state), "torch": torch.__version__, **versions}})
    except Exception as e:
        reply({"error": f"{args.side} setup failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return

    for line in sys.stdin:
        cmd, _, name = line.strip().partition(" ")
        try:
            if cmd == "quit":
                reply({"ok": True})
                return
            if cmd == "verify":
                reply({"ok": all(torch.equal(target[k], state[k]) for k in state)})
                continue
            if cmd not in ("save", "load") or not name:
                reply({"error": f"unknown command {line.strip()!r}"})
                continue
            if cmd == "load":
                for t in target.values():
                    t.zero_()
            c0, t0 = cpu_seconds(), time.perf_counter()
            (save(state, name) if cmd == "save" else load(target, name))
            reply({"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0})
        except Exception as e:
            reply({"error": f"{cmd} {name}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()})


if __name__ == "__main__":
    main()
