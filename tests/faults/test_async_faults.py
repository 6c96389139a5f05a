"""Faults of async saves (``async_save=True``): a save returns once the state is staged and is
durable once the next ``save()``, ``wait()`` or ``close()`` returned.

- SIGTERM (a real signal) while a background write is in flight: without a handler the job
  dies and the in-flight step never becomes visible; with ``save_on_sigterm=True`` the
  in-flight save completes, the current step is saved and the job exits 143.
- The background worker dies: in thread mode it raises (a bug, not a storage error); in
  process mode the writer process calls ``os._exit`` mid-write, or is SIGKILLed from outside.
  The failure is raised as a dist_ckpt error naming the step at the next call, the step has no
  COMMITTED, and the previous checkpoint stays the latest, bit-identical."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from _fault_lib import QUIET, LocalJob, assert_named_error, check_run, committed_steps, start_job, wait_for
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt.errors import CheckpointError
from storage_backends import open_backend

pytestmark = QUIET
SLOW_STEP_3 = {
    "op": "writer.write",
    "key": "step_000000003.tmp-*/rank_*",
    "action": "delay",
    "delay": 0.1,
    "count": None,
}


def _part_file(root: Path, step: int) -> list[Path]:
    return list(root.glob(f"step_{step:09d}.tmp-*/.rank_00000.safetensors.part-*"))


def test_sigterm_during_an_async_save_kills_the_job_and_the_step_stays_invisible(tmp_path: Path) -> None:
    root = tmp_path / "run"
    job = start_job(tmp_path, str(root), range(1, 9), faults=[SLOW_STEP_3], extra=["--async-save"])
    try:
        pid = job.pid_of(0)
        wait_for(lambda: _part_file(root, 3), 120, "the background write of step 3", job)
        os.kill(pid, signal.SIGTERM)
        rc = job.wait(60)
    finally:
        job.kill()
    assert rc == -signal.SIGTERM, job.output()
    assert 3 not in committed_steps(open_backend(str(root)))
    check_run(str(root), tmp_path / "refs", expect_last=2)


def test_sigterm_during_an_async_save_with_save_on_sigterm(tmp_path: Path) -> None:
    root = tmp_path / "run"
    job = start_job(tmp_path, str(root), range(1, 9), faults=[SLOW_STEP_3], extra=["--async-save", "--save-on-sigterm"])
    try:
        pid = job.pid_of(0)
        wait_for(lambda: _part_file(root, 3), 120, "the background write of step 3", job)
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGTERM)  # a second one changes nothing
        rc = job.wait(120)
    finally:
        job.kill()
    assert rc == 143, job.output()
    stopped = int(re.search(r"PREEMPTED at (\d+)", job.output()).group(1))
    assert 3 < stopped < 8, job.output()
    # the in-flight save completed and the current step was saved; nothing after it
    assert committed_steps(open_backend(str(root))) == list(range(1, stopped + 1))
    check_run(str(root), tmp_path / "refs", expect_last=stopped)


def test_background_worker_thread_raises(tmp_path: Path) -> None:
    root, refs = str(tmp_path / "run"), tmp_path / "refs"
    backend = FaultyBackend(
        open_backend(root), [Rule("writer.write", "step_000000003*/rank_*", "fail", error="RuntimeError")]
    )
    job = LocalJob(root, refs, backend=backend, async_save=True)
    assert job.save(1) and job.save(2) and job.save(3)  # staged: returns before the failure
    with pytest.raises(CheckpointError) as err:
        job.save(4)  # raises step 3's failure, on every rank, once
    assert_named_error(err.value, "step 3", "RuntimeError", "rank_00000.safetensors")
    assert committed_steps(open_backend(root)) == [1, 2]
    assert [c.step for c in job.mgr.checkpoints()][-1] == 2
    assert job.save(4)  # the manager keeps working
    job.close()
    check_run(root, refs, expect_last=4)


@pytest.mark.parametrize("how", ["os._exit-in-worker", "SIGKILL-from-outside"])
def test_background_writer_process_dies(tmp_path: Path, how: str) -> None:
    root, refs = str(tmp_path / "run"), tmp_path / "refs"
    if how == "os._exit-in-worker":  # the rule travels into the writer process with the pickled backend
        rule = Rule("writer.write", "step_000000003*/rank_*", "exit", nth=2)
    else:
        rule = Rule("writer.write", "step_000000003*/rank_*", "delay", delay=0.5, count=None)
    backend = FaultyBackend(open_backend(root), [rule], log=str(tmp_path / "faults.jsonl"))
    job = LocalJob(root, refs, backend=backend, async_save=True, async_mode="process")
    assert job.save(1) and job.save(2) and job.save(3)
    worker = job.mgr._engine.process.pid
    # overlapped staging (the default): step 3's write starts once its copy is joined (by the
    # next optimizer step, or here, with no step in between)
    job.mgr.wait_staged()
    if how == "SIGKILL-from-outside":
        wait_for(lambda: _part_file(Path(root), 3), 60, "the writer process to write step 3")
        os.kill(worker, signal.SIGKILL)
    with pytest.raises(CheckpointError) as err:
        job.save(4)
    assert_named_error(err.value, "step 3", "writer process exited")
    if how == "os._exit-in-worker":
        assert (tmp_path / "faults.jsonl").read_text().count('"exit"') == 1
    assert committed_steps(open_backend(root)) == [1, 2]
    try:
        job.close()
    except CheckpointError as e:  # a manager whose writer died may report it again on close
        assert_named_error(e, "writer process")
    check_run(root, refs, expect_last=2)
