"""Multi-node without Docker: two torchrun agents (c10d rendezvous on loopback) act as two
nodes of 2 ranks each, train, checkpoint to the S3 test server, are killed, and resume as
2 nodes x 2 ranks (bit-identical to an uninterrupted run) and as 1 node x 2 ranks (state
loaded identical). The agents run examples/launch_node.sh, the compose file's entrypoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from exactness import compare
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.slow  # two torchrun agents, killed and resumed: run by .ci/run after make test

STEPS = 16
COMMON = ["--steps", str(STEPS), "--save-every", "4", "--keep-last", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, nnodes: int, args: list[str], log: Path, timeout: float = 300) -> list[int]:
    """Start ``nnodes`` agents of 2 ranks each; return their exit codes."""
    env = {
        **os.environ,
        "NNODES": str(nnodes),
        "NPROC": "2",
        "RDZV": f"127.0.0.1:{_free_port()}",
        "RUN_ID": f"job{_free_port()}",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    with open(log, "ab") as out:
        agents = [
            subprocess.Popen(
                [str(ROOT / "examples" / "launch_node.sh"), script, *COMMON, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
            for _ in range(nnodes)
        ]
        try:
            return [a.wait(timeout=timeout) for a in agents]
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
                    a.wait()


@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp.py"])
def test_two_nodes_killed_and_resumed_on_s3(script: str, s3_uri: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    run_a, run_b = f"{s3_uri}/a", f"{s3_uri}/b"
    codes = _launch(
        script,
        2,
        ["--ckpt", run_a, "--losses-out", str(tmp_path / "a.jsonl"), "--final-out", str(tmp_path / "a.st")],
        log,
    )
    assert codes == [0, 0], log.read_text()[-4000:]

    codes = _launch(
        script, 2, ["--ckpt", run_b, "--crash-at-step", "9", "--losses-out", str(tmp_path / "b.jsonl")], log
    )
    assert any(c != 0 for c in codes), "global rank 0 was SIGKILLed; the job must fail"
    codes = _launch(
        script,
        2,
        [
            "--ckpt",
            run_b,
            "--resume",
            "auto",
            "--losses-out",
            str(tmp_path / "b.jsonl"),
            "--final-out",
            str(tmp_path / "b.st"),
        ],
        log,
    )
    assert codes == [0, 0], log.read_text()[-4000:]
    result = compare(tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "a.st", tmp_path / "b.st")
    assert result.identical and result.steps_compared == STEPS, result.first_difference

    # The finished 4-rank run, resumed by one node of 2 ranks: the state loads identical.
    codes = _launch(script, 1, ["--ckpt", run_a, "--loaded-out", str(tmp_path / "loaded.st")], log)
    assert codes == [0], log.read_text()[-4000:]
    saved, loaded = load_file(str(tmp_path / "a.st")), load_file(str(tmp_path / "loaded.st"))
    assert saved.keys() == loaded.keys() and len(saved) > 4
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
