"""Tiered checkpoints on 2 loopback nodes x 2 ranks (two torchrun agents, c10d rendezvous, each
with its own local tier): each node's tier holds its ranks' shards; the job is SIGKILLed, one
node's local tier is wiped, and the resumed job reads that node's shards from S3 — bit-identical
to an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from exactness import compare
from tier_support import reap_uploaders, wait_for

from dist_ckpt.run_store import RunStore
from storage_backends import open_backend

ROOT = Path(__file__).resolve().parents[2]


pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two torchrun agents, killed and resumed

STEPS = 16
COMMON = ["--steps", str(STEPS), "--save-every", "4", "--keep-last", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(node_args: list[list[str]], log: Path, timeout: float = 300) -> list[int]:
    """One torchrun agent of 2 ranks per entry of ``node_args`` (its own arguments)."""
    env = {
        **os.environ,
        "NNODES": str(len(node_args)),
        "NPROC": "2",
        "RDZV": f"127.0.0.1:{_free_port()}",
        "RUN_ID": f"job{_free_port()}",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "DIST_CKPT_UPLOADER_IDLE_S": "10",
    }
    with open(log, "ab") as out:
        agents = [
            subprocess.Popen(
                [str(ROOT / "examples" / "launch_node.sh"), "train_fsdp.py", *COMMON, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
            for args in node_args
        ]
        try:
            return [a.wait(timeout=timeout) for a in agents]
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
                    a.wait()


def _queues_empty(*locals_: Path) -> bool:
    return all(not list((d / ".tiers" / "queue").glob("*.json")) for d in locals_ if (d / ".tiers" / "queue").is_dir())


def test_two_nodes_one_local_tier_wiped_resume_reads_its_shards_from_s3(s3_uri: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    try:
        run_a, run_b = f"{s3_uri}/a", f"{s3_uri}/b"
        a_nodes = [tmp_path / "a_node0", tmp_path / "a_node1"]
        codes = _launch(
            [
                [
                    "--ckpt",
                    run_a,
                    "--local-root",
                    str(d),
                    "--losses-out",
                    str(tmp_path / "a.jsonl"),
                    "--final-out",
                    str(tmp_path / "a.st"),
                ]
                for d in a_nodes
            ],
            log,
        )
        assert codes == [0, 0], log.read_text()[-4000:]

        nodes = [tmp_path / "node0", tmp_path / "node1"]
        codes = _launch(
            [
                [
                    "--ckpt",
                    run_b,
                    "--local-root",
                    str(d),
                    "--crash-at-step",
                    "9",
                    "--losses-out",
                    str(tmp_path / "b.jsonl"),
                ]
                for d in nodes
            ],
            log,
        )
        assert any(c != 0 for c in codes), "global rank 0 was SIGKILLed; the job must fail"
        # each node's tier holds only its own ranks' shards
        held = [sorted(p.name for p in d.glob("step_000000008/rank_*")) for d in nodes]
        assert sorted(held[0] + held[1]) == [f"rank_{r:05d}.safetensors" for r in range(4)], held
        # the detached uploaders of both nodes finish step 8 without the job
        wait_for(
            lambda: _queues_empty(*nodes) and 8 in [e.step for e in RunStore(open_backend(run_b)).committed_entries()],
            120,
            "step 8 promoted by both nodes' uploaders",
        )
        shutil.rmtree(nodes[1])  # one node's local tier is lost (a replaced node)
        codes = _launch(
            [
                [
                    "--ckpt",
                    run_b,
                    "--local-root",
                    str(d),
                    "--resume",
                    "auto",
                    "--losses-out",
                    str(tmp_path / "b.jsonl"),
                    "--final-out",
                    str(tmp_path / "b.st"),
                ]
                for d in nodes
            ],
            log,
        )
        assert codes == [0, 0], log.read_text()[-4000:]
        result = compare(tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "a.st", tmp_path / "b.st")
        assert result.identical and result.steps_compared == STEPS, result.first_difference
    finally:
        reap_uploaders(tmp_path)
