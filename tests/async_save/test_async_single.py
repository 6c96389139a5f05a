"""Async saves in one process, thread and process workers: snapshots are taken at save()
time, staging buffers are reused, failures surface at the next call, the memory budget,
if_busy="skip", plan caching, and clean shutdown (no child process, no /dev/shm segment)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from async_helpers import (
    RecordingObserver,
    alive,
    assert_same,
    children_of,
    committed_steps,
    make_state,
    mutate_in_place,
    shard_faults,
    shm_entries,
    snapshot,
    train_step,
)
from support.faulty_backend import FaultyBackend

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import StorageError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def manager(root: Path, backend: FaultyBackend | None = None, **options) -> CheckpointManager:
    options.setdefault("async_save", True)
    return CheckpointManager(str(root), backend=backend or shard_faults(str(root)), **options)


def restored(root: Path, step: int, width: int = 32) -> tuple[dict[str, torch.Tensor], dict]:
    model, opt, sched, counters = make_state(seed=99, width=width)
    train_step(model, opt, sched, counters)  # give the optimizer state tensors to load into
    mgr = CheckpointManager(str(root), read_only=True)
    mgr.restore(mgr.track(model=model, optimizer=opt, scheduler=sched, counters=counters), which=step)
    mgr.close()
    return snapshot(model, opt), {"counters": dict(counters), "sched": sched.state_dict()}


def test_state_changed_right_after_save_does_not_leak(tmp_path: Path, mode: str = "thread") -> None:
    model, opt, sched, counters = make_state()
    shm_before = shm_entries()
    # changes parameters in place outside optimizer.step() right after save(): "staged" (the
    # default, overlapped staging, fails such a save instead: test_overlap_default.py)
    mgr = manager(tmp_path, shard_faults(str(tmp_path), delay=1.0), async_mode=mode, async_save="staged")
    state = mgr.track(model=model, optimizer=opt, scheduler=sched, counters=counters)
    for _ in range(2):
        train_step(model, opt, sched, counters)
    expected = snapshot(model, opt)
    expected_values = {"counters": dict(counters), "sched": sched.state_dict()}
    mgr.save(5, state, force=True)
    if mode == "thread":  # the writer sleeps before writing: the save is certainly still running
        assert not mgr._engine._job.done.is_set()
    mutate_in_place(model, opt)
    counters["seen"] = -1
    counters["tag"] = "changed"
    train_step(model, opt, sched, counters)  # the scheduler and counters move on too
    mgr.wait()
    assert committed_steps(tmp_path) == [5]
    got, values = restored(tmp_path, 5)
    assert_same(got, expected)
    assert values == expected_values
    pid = mgr._engine.process.pid if mode == "process" else None
    mgr.close()
    if pid is not None:
        assert not alive(pid), "the writer process must be reaped by close()"
    assert shm_entries() == shm_before


def test_consecutive_saves_reuse_staging_buffers(tmp_path: Path, mode: str = "thread") -> None:
    model, opt, sched, counters = make_state()
    shm_before = shm_entries()
    mgr = manager(tmp_path, async_mode=mode)
    state = mgr.track(model=model, optimizer=opt, scheduler=sched, counters=counters)
    stager = mgr._engine.stager
    expected, pointers = {}, []
    for step in (1, 2, 3):
        train_step(model, opt, sched, counters)
        expected[step] = snapshot(model, opt)
        assert mgr.save(step, state, force=True)
        views = stager.staged()
        pointers.append((stager.buffer.data_ptr(), {fqn: t.data_ptr() for fqn, t in views.items()}))
    mgr.wait()
    assert stager.allocations == 1, "one buffer for the three saves"
    assert pointers[0] == pointers[1] == pointers[2], "every save copied into the same staging tensors"
    assert any(fqn.startswith("optimizer.state.") for fqn in pointers[0][1]), "optimizer state is staged too"
    assert committed_steps(tmp_path) == [1, 2, 3]
    assert [c.step for c in mgr.checkpoints()] == [1, 2, 3]
    for step in (1, 2, 3):
        assert_same(restored(tmp_path, step)[0], expected[step])
    mgr.close()
    assert stager.buffer is None
    assert shm_entries() == shm_before


def test_background_failure_surfaces_at_next_call(tmp_path: Path, mode: str = "thread") -> None:
    model, opt, sched, counters = make_state()
    mgr = manager(tmp_path, shard_faults(str(tmp_path), fail_at=2), async_mode=mode)
    state = mgr.track(model=model, optimizer=opt, scheduler=sched, counters=counters)
    train_step(model, opt, sched, counters)
    mgr.save(1, state, force=True)
    train_step(model, opt, sched, counters)
    mgr.save(2, state, force=True)  # its shard fails in the background
    train_step(model, opt, sched, counters)
    with pytest.raises(StorageError, match="background save of step 2 failed.*injected failure"):
        mgr.save(3, state, force=True)
    assert committed_steps(tmp_path) == [1]
    assert not any(Path(tmp_path).glob("step_000000002/COMMITTED"))
    assert mgr.checkpoints()[-1].step == 1 and "last" in mgr.checkpoints()[-1].pointers
    mgr.wait()  # raised once, not again
    assert mgr.save(3, state, force=True)  # the manager keeps working
    mgr.close()
    assert committed_steps(tmp_path) == [1, 3]


def test_failure_is_raised_by_wait_and_close(tmp_path: Path) -> None:
    model, opt, sched, counters = make_state()
    mgr = manager(tmp_path, shard_faults(str(tmp_path), fail_at=1))
    state = mgr.track(model=model, optimizer=opt)
    mgr.save(1, state, force=True)
    with pytest.raises(StorageError, match="step 1"):
        mgr.wait()
    mgr2 = manager(tmp_path / "b", shard_faults(str(tmp_path / "b"), fail_at=1))
    mgr2.save(1, mgr2.track(model=model), force=True)
    with pytest.raises(StorageError, match="step 1"):
        mgr2.close()
    assert mgr2._engine._thread is None, "close() cleaned up before raising"
    mgr.close()


def test_if_busy_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, opt, sched, counters = make_state()
    mgr = manager(tmp_path, shard_faults(str(tmp_path), delay=1.0), if_busy="skip")
    state = mgr.track(model=model, optimizer=opt)
    train_step(model, opt, sched, counters)
    assert mgr.save(1, state, force=True)
    with caplog.at_level(logging.WARNING, logger="dist_ckpt"):
        assert not mgr.save(2, state, force=True)
    assert "step 2 not saved: the previous save is still in flight" in caplog.text
    mgr.wait()
    assert mgr.save(3, state, force=True)  # idle again: saved
    mgr.close()
    assert committed_steps(tmp_path) == [1, 3]


def test_over_the_staging_budget_the_save_is_synchronous(tmp_path: Path) -> None:
    model, opt, sched, counters = make_state(width=64)
    train_step(model, opt, sched, counters)
    mgr = manager(tmp_path, max_staging_bytes=4096)
    state = mgr.track(model=model, optimizer=opt, scheduler=sched)
    expected = snapshot(model, opt)
    assert mgr.save(1, state, force=True)
    assert committed_steps(tmp_path) == [1], "committed before save() returned"
    assert mgr._engine.stager.buffer is None, "no staging buffer is kept over the budget"
    mutate_in_place(model, opt)
    assert_same(restored(tmp_path, 1, width=64)[0], expected)
    mgr.close()
    # under the budget: staged, asynchronous
    mgr = manager(tmp_path / "b", max_staging_bytes=1 << 30)
    mgr.save(1, mgr.track(model=model, optimizer=opt), force=True)
    assert mgr._engine.stager.buffer is not None
    mgr.close()


def test_plans_are_cached_and_each_save_gets_its_own_staging_prefix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt, sched, counters = make_state()
    mgr = manager(tmp_path)
    state = mgr.track(model=model, optimizer=opt, scheduler=sched, counters=counters)
    expected, reused = {}, []
    caplog.set_level(logging.DEBUG, logger="dist_ckpt.async_write")  # the planner's reuse record
    for step in (1, 2, 3):
        caplog.clear()
        train_step(model, opt, sched, counters)
        expected[step] = snapshot(model, opt)
        mgr.save(step, state, force=True)
        mgr.wait()
        reused.append(any(getattr(r, "local_plan_reused", False) for r in caplog.records))
    assert reused == [False, True, True], "the 2nd and 3rd saves reuse the cached plan"
    assert committed_steps(tmp_path) == [1, 2, 3]
    assert not list(Path(tmp_path).glob("*.tmp-*")), "every save published its own staging prefix"
    for step in (1, 2, 3):
        assert_same(restored(tmp_path, step)[0], expected[step])
    mgr.close()


def test_interpreter_exit_waits_for_the_saves_in_flight(tmp_path: Path) -> None:
    """One interpreter, two managers (thread and process workers), each with a save in flight
    at exit and no close(): both saves commit, the writer process is gone, /dev/shm is clean."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})  # tests/: support.faulty_backend
        from async_helpers import shard_faults, make_state, train_step
        from dist_ckpt import CheckpointManager
        model, opt, sched, counters = make_state()
        managers = []
        for mode in ("thread", "process"):
            root = {str(tmp_path)!r} + "/" + mode
            mgr = CheckpointManager(root, backend=shard_faults(root, delay=0.5), async_save=True, async_mode=mode)
            managers.append(mgr)
            state = mgr.track(model=model, optimizer=opt)
            train_step(model, opt, sched, counters)
            mgr.save(7, state, force=True)
        print("CHILD", managers[1]._engine.process.pid, flush=True)
        # no close(): the interpreter exits with both saves in flight
    """)
    shm_before = shm_entries()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("save of step 7 in flight; waiting for it") >= 1, out.stderr
    assert committed_steps(tmp_path / "thread") == [7]
    assert committed_steps(tmp_path / "process") == [7]
    assert not alive(int(out.stdout.split("CHILD", 1)[1].split()[0])), "no writer process outlives its parent"
    assert shm_entries() == shm_before


def test_process_mode(tmp_path: Path) -> None:
    """The thread-mode behaviours with a writer process (one process for all of them, it
    takes seconds to start): consecutive saves reuse one shared buffer, in-place changes
    after save() do not leak, a failure surfaces at the next call; close() leaves no child
    and no shared-memory segment."""
    me = os.getpid()
    children_before, shm_before = set(children_of(me)), shm_entries()
    backend = shard_faults(str(tmp_path), delay=1.0, slow_at={4}, fail_at=5)
    mgr = manager(tmp_path, backend, async_mode="process", async_save="staged")  # step 4 mutates after save()
    engine = mgr._engine
    engine.observer = observer = RecordingObserver()
    pid = engine.process.pid
    assert pid in children_of(me)
    model, opt, sched, counters = make_state()
    state = mgr.track(model=model, optimizer=opt, scheduler=sched, counters=counters)
    expected, pointers = {}, []
    for step in (1, 2, 3):
        train_step(model, opt, sched, counters)
        expected[step] = snapshot(model, opt)
        assert mgr.save(step, state, force=True)
        pointers.append((engine.stager.buffer.data_ptr(), {f: t.data_ptr() for f, t in engine.stager.staged().items()}))
    assert engine.stager.allocations == 1 and pointers[0] == pointers[1] == pointers[2]
    assert engine.stager.buffer.is_shared()
    # step 4: its shard waits 1 s before writing; change everything meanwhile
    train_step(model, opt, sched, counters)
    expected[4] = snapshot(model, opt)
    expected_values = {"counters": dict(counters), "sched": sched.state_dict()}
    mgr.save(4, state, force=True)
    mutate_in_place(model, opt)
    counters["seen"], counters["tag"] = -1, "changed"
    train_step(model, opt, sched, counters)
    mgr.wait()
    assert observer.jobs[-1].seconds > 0.9, "the save was still running while the state changed"
    # step 5: its shard fails in the writer process
    mgr.save(5, state, force=True)
    with pytest.raises(StorageError, match="background save of step 5 failed.*injected failure"):
        mgr.save(6, state, force=True)
    assert committed_steps(tmp_path) == [1, 2, 3, 4]
    assert mgr.checkpoints()[-1].step == 4 and "last" in mgr.checkpoints()[-1].pointers
    mgr.close()
    assert not alive(pid), "close() reaped the writer process"
    assert set(children_of(me)) == children_before
    assert shm_entries() == shm_before
    for step in (1, 2, 3, 4):
        assert_same(restored(tmp_path, step)[0], expected[step])
    assert restored(tmp_path, 4)[1] == expected_values


def test_writer_process_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from dist_ckpt import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r}, async_save=True, async_mode="process")
        print("CHILD", mgr._engine.process.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        child = int(line.split()[1])
        assert alive(child)
        parent.kill()  # SIGKILL: no atexit, no close()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the orphaned writer process exits (and init reaps it)"
    finally:
        if parent.poll() is None:
            parent.kill()
