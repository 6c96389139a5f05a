"""The DCP + fsspec (s3fs) side of ``bench_s3.py``, run in its own Python environment.

s3fs pins an older botocore than the project's boto3, so this worker runs under a separate
venv (``torch`` + ``s3fs``; it imports neither boto3 nor anything of this project) and
``bench_s3.py`` drives it as a subprocess, so that its runs can alternate with ours. Setup::

    python3 -m venv /tmp/fsspec-venv
    /tmp/fsspec-venv/bin/pip install torch==<the project's torch> && /tmp/fsspec-venv/bin/pip install s3fs numpy

Server and credentials come from the environment: ``BENCH_S3_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``. The state is
:func:`make_state` (``--mb`` MiB in 16 fp32 tensors, seeded), the same function ``bench_s3.py``
uses, so both sides move identical tensors (checked by digest).

Protocol: one JSON line per message on the original stdout (anything else the process prints
goes to stderr). First ``{"ready": ...}`` with versions and the state's digest; then for each
command line read from stdin -- ``save NAME``, ``load NAME``, ``verify``, ``quit`` -- one JSON
reply: ``{"wall_s", "cpu_s"}`` for save/load (``dcp.save`` with ``FsspecWriter`` to
``s3://BUCKET/PREFIX/NAME``; ``dcp.load`` with ``FsspecReader`` into preallocated tensors),
``{"ok": bool}`` for verify (last load equals the state), ``{"error": ...}`` on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
import warnings
from typing import Any

import torch

N_TENSORS = 16
MiB = 1024 * 1024
COLS = 1024


def make_state(mb: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``mb`` MiB in ``N_TENSORS`` equal fp32 tensors of ``COLS`` columns (``mb * 16`` rows in all)."""
    g = torch.Generator().manual_seed(seed)
    rows = mb * MiB // (N_TENSORS * 4 * COLS)
    return {f"layers.{i:02d}.weight": torch.randn(rows, COLS, generator=g) for i in range(N_TENSORS)}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--prefix", default="dcp-fsspec")
    ap.add_argument("--thread-count", type=int, default=1, help="FsspecWriter thread_count")
    args = ap.parse_args()

    # Keep the protocol channel clean: our replies go to the original stdout, everything else
    # (warnings, prints from libraries) to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import s3fs
        import torch.distributed.checkpoint as dcp

        try:
            from torch.distributed.checkpoint import FsspecReader, FsspecWriter
        except ImportError:
            from torch.distributed.checkpoint._fsspec_filesystem import (
                FsspecReader,
                FsspecWriter,
            )

        import aiobotocore
        import botocore
        import fsspec

        fs_kwargs: dict[str, Any] = {
            "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {
                "endpoint_url": os.environ["BENCH_S3_ENDPOINT_URL"],
                "region_name": os.environ.get("AWS_REGION", "us-east-1"),
            },
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }
        state = make_state(args.mb)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        reply(
            {
                "ready": {
                    "digest": state_digest(state),
                    "python": sys.version.split()[0],
                    "torch": torch.__version__,
                    "s3fs": s3fs.__version__,
                    "fsspec": fsspec.__version__,
                    "aiobotocore": aiobotocore.__version__,
                    "botocore": botocore.__version__,
                }
            }
        )
    except Exception as e:  # report, don't die silently
        reply({"error": f"worker setup failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()})
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
            path = f"s3://{args.bucket}/{args.prefix}/{name}"
            c0, t0 = time.process_time(), time.perf_counter()
            if cmd == "save":
                writer = FsspecWriter(path, thread_count=args.thread_count, **fs_kwargs)
                dcp.save(state, storage_writer=writer, no_dist=True)
            else:
                for t in target.values():
                    t.zero_()
                c0, t0 = time.process_time(), time.perf_counter()
                reader = FsspecReader(path, **fs_kwargs)
                dcp.load(target, storage_reader=reader, no_dist=True)
            reply({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
        except Exception as e:
            reply({"error": f"{cmd} {name}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()})


if __name__ == "__main__":
    main()
