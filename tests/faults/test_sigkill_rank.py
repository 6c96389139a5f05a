"""SIGKILL of one rank of a 2-rank torchrun job while it writes its shard of step 3 (its writes
are slowed down so the kill lands mid-file). The step never becomes visible; step 2 loads
bit-identical; the next manager start removes the half-written staging folder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from _fault_lib import QUIET, check_run, committed_steps, start_job, wait_for

from storage_backends import open_backend

pytestmark = QUIET


def test_sigkill_of_one_rank_while_shards_are_written(tmp_path: Path) -> None:
    root = tmp_path / "run"
    slow = {
        "op": "writer.write",
        "key": "step_000000003.tmp-*/rank_00001*",
        "action": "delay",
        "delay": 0.5,
        "count": None,
        "ranks": [1],
    }
    job = start_job(tmp_path, str(root), [1, 2, 3], nproc=2, faults=[slow])
    try:
        victim = job.pid_of(1)
        # rank 1's first file of step 3: its temp file in the staging folder
        wait_for(
            lambda: list(root.glob("step_000000003.tmp-*/.rank_00001.safetensors.part-*")),
            120,
            "rank 1 to start writing step 3",
            job,
        )
        os.kill(victim, signal.SIGKILL)
        rc = job.wait(120)
    finally:
        job.kill()
    assert rc != 0, job.output()
    assert (tmp_path / "refs" / "step_2.returned").exists() and not (tmp_path / "refs" / "step_3.returned").exists()
    assert committed_steps(open_backend(str(root))) == [1, 2]
    assert list(root.glob("step_000000003.tmp-*")), "the killed save left its staging folder (gc removes it)"
    check_run(str(root), tmp_path / "refs", expect_last=2)
