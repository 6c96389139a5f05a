"""Are an S3 server's conditional writes atomic under concurrency? A check, not a timing.

Starts the server (``--server moto`` or ``seaweedfs``, through ``tests/support/s3server.py``)
on loopback and runs ``--rounds`` rounds; in each, ``--writers`` threads (one boto3 client each)
released by a barrier race to create one new key with ``If-None-Match: *``, then race to
replace it with ``If-Match: <its ETag>``. An atomic server lets exactly one writer win each
race. moto checks the condition and then writes without a lock, so this counts how often more
than one won. Prints one JSON document (and writes it to ``--out``). Usage::

    python benchmarks/s3_conditional_race.py --server moto --rounds 200 \
        --out benchmarks/results/2026-11-26-s3-conditional-race.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from botocore.exceptions import ClientError  # noqa: E402
from support.s3server import S3Server, start_moto, start_seaweedfs  # noqa: E402


def _race(clients: list[Any], bucket: str, key: str, what: str, **condition: str) -> int:
    barrier = threading.Barrier(len(clients))

    def attempt(i: int) -> int:
        barrier.wait()
        try:
            clients[i].put_object(Bucket=bucket, Key=key, Body=f"{what} by writer {i}".encode(), **condition)
            return 1
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return 0
            raise

    with ThreadPoolExecutor(len(clients)) as pool:
        return sum(pool.map(attempt, range(len(clients))))


def run(server: S3Server, rounds: int, writers: int) -> dict[str, Any]:
    bucket = server.create_bucket()
    clients = [server.client(max_attempts=1) for _ in range(writers)]
    admin = server.client()
    create_multi = cas_multi = create_none = cas_none = 0
    start = time.monotonic()
    for r in range(rounds):
        key = f"race-{r}"
        won = _race(clients, bucket, key, "created", IfNoneMatch="*")
        create_multi += won > 1
        create_none += won == 0
        etag = admin.head_object(Bucket=bucket, Key=key)["ETag"]
        won = _race(clients, bucket, key, "swapped", IfMatch=etag)  # never the created bytes (same ETag)
        cas_multi += won > 1
        cas_none += won == 0
    return {
        "server": server.version,
        "rounds": rounds,
        "writers_per_race": writers,
        "create_races_with_several_winners": create_multi,
        "create_races_with_no_winner": create_none,
        "cas_races_with_several_winners": cas_multi,
        "cas_races_with_no_winner": cas_none,
        "seconds": round(time.monotonic() - start, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("moto", "seaweedfs"), default="moto")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = (start_moto if args.server == "moto" else start_seaweedfs)(Path(tmp))
        try:
            doc = {"date": time.strftime("%Y-%m-%d"), **run(server, args.rounds, args.writers)}
        finally:
            server.stop()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
