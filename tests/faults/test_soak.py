"""Soak: 200 save/restore cycles with random faults and kills, then a full verify of the run.

Not in the default run: ``make soak`` (``pytest -m soak tests/faults``). ``SOAK_CYCLES`` and
``SOAK_SEED`` override the cycle count and the random seed (printed, to replay a failure).
``SOAK_ASYNC`` picks the save mode: unset or ``off`` synchronous saves; ``overlap``, ``staged``
or ``true`` that ``async_save`` value (``make soak-overlap``). With an async mode each save's
outcome is settled one training step later: the next ``train_step`` runs (its forward/backward
while the overlapped staging copy runs, its ``optimizer.step()`` joining that copy) with the
save's faults still armed, then ``mgr.wait()`` raises the save's failure — or returns, and only
then is the save acknowledged. The child jobs of the real kills save with the same mode.

One training job in this process (the faulty backend wrapper around a local run root, with
retention ``keep_last=3`` and a best pointer) saves a new step every cycle while a random fault
from the table hits that save: EIO/ENOSPC on a shard write, its fsync, metadata.json, COMMITTED,
the publish rename or the manifest update; slow storage; an in-process kill at every crash point (the wrapper
goes dead: nothing the library does afterwards
reaches the storage, as after SIGKILL); and every ~20 cycles a real one — a child job resumes
the run and dies with ``os._exit`` at a random crash point (every other time, a second job first
tries the run while this one holds it, and must fail with RunLocked). After every kill the job restarts
(a new manager: gc + manifest reconciliation) and must resume from the last committed step,
bit-identical. At the end every committed checkpoint is verified (checksums, manifest) and
loaded bit-identical; no acknowledged save may be missing (except those retention dropped).
Prints one summary line.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from _fault_lib import BEST, QUIET, assert_bit_identical, build, committed_steps, flatten, run_job, train_step
from safetensors.torch import load_file
from support.faulty_backend import FaultyBackend, Rule, SimulatedCrash

from dist_ckpt import CheckpointManager
from dist_ckpt.async_job import NoObserver, SubmitTimings
from dist_ckpt.errors import CheckpointError
from dist_ckpt.run_store import RunStore
from dist_ckpt.verify import verify_run
from storage_backends.local import LocalBackend

pytestmark = [pytest.mark.timeout(3600), *QUIET]
KEEP_LAST = 3


def _faults(p: str) -> dict[str, list[Rule]]:
    """Fault name -> rules hitting the save of step prefix ``p``."""
    return {
        "none": [],
        "slow-writes": [Rule("writer.write", f"{p}*", "delay", delay=0.01, count=None)],
        "eio-shard-write": [Rule("writer.write", f"{p}*/rank_*", "fail", error="EIO")],
        "enospc-shard-write": [Rule("writer.write", f"{p}*/rank_*", "fail", error="ENOSPC", nth=2)],
        "eio-shard-fsync": [Rule("writer.commit", f"{p}*/rank_*", "fail", error="EIO")],
        "eio-metadata": [Rule("create_if_absent", f"{p}*/metadata.json", "fail", error="EIO")],
        "eio-committed": [Rule("create_if_absent", f"{p}*/COMMITTED", "fail", error="EIO")],
        "eio-publish": [Rule("publish", f"{p}*", "fail", error="EIO")],
        "eio-manifest": [Rule("compare_and_swap", "manifest.json", "fail", error="EIO")],
        "kill-mid-shard": [Rule("writer.write", f"{p}*/rank_*", "crash", nth=2)],
        "kill-before-metadata": [Rule("create_if_absent", f"{p}*/metadata.json", "crash")],
        "kill-before-committed": [Rule("create_if_absent", f"{p}*/COMMITTED", "crash")],
        "kill-after-committed": [Rule("create_if_absent", f"{p}*/COMMITTED", "crash", when="after")],
        "kill-before-manifest": [Rule("compare_and_swap", "manifest.json", "crash")],
        "kill-after-manifest": [Rule("compare_and_swap", "manifest.json", "crash", when="after")],
        "kill-during-retention": [Rule("delete_prefix", "step_*", "crash")],
    }


REAL_KILL_POINTS = [
    {"op": "writer.write", "key": "{p}*/rank_*", "action": "exit", "nth": 2},
    {"op": "create_if_absent", "key": "{p}*/COMMITTED", "action": "exit"},
    {"op": "create_if_absent", "key": "{p}*/COMMITTED", "action": "exit", "when": "after"},
    {"op": "compare_and_swap", "key": "manifest.json", "action": "exit"},
    {"op": "delete_prefix", "key": "step_*", "action": "exit"},
]


_ASYNC_MODES: dict[str, bool | str] = {"off": False, "": False, "true": True, "staged": "staged", "overlap": "overlap"}


def soak_async_mode() -> bool | str:
    """``SOAK_ASYNC`` as an ``async_save`` value (a clear error for anything else)."""
    raw = os.environ.get("SOAK_ASYNC", "off").strip().lower()
    if raw not in _ASYNC_MODES:
        raise pytest.UsageError(f"SOAK_ASYNC={raw!r}: expected one of {sorted(k for k in _ASYNC_MODES if k)}")
    return _ASYNC_MODES[raw]


@pytest.mark.soak
def test_soak(tmp_path: Path, capsys) -> None:
    seed = int(os.environ.get("SOAK_SEED", str(int(time.time()))))
    soak(tmp_path, capsys, int(os.environ.get("SOAK_CYCLES", "200")), seed, soak_async_mode())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_soak_with_overlapped_staging(tmp_path: Path, capsys) -> None:
    """40 cycles (under a minute alone) with ``async_save="overlap"``, in the slow run; the long
    one is ``make soak-overlap``."""
    soak(tmp_path, capsys, 40, int(os.environ.get("SOAK_SEED", str(int(time.time())))), "overlap")


def soak(tmp_path: Path, capsys, cycles: int, seed: int, mode: bool | str) -> None:
    child_async = [] if mode is False else ["--async-save", "true" if mode is True else str(mode)]
    rnd = random.Random(seed)
    root, refs_dir = str(tmp_path / "run"), tmp_path / "refs"
    refs: dict[int, dict] = {}  # step -> exact state saved (kept for every attempted step)
    acknowledged: list[int] = []
    injected: Counter[str] = Counter()
    verified = restarts = real_kills = 0
    model, opt = build()
    started = time.monotonic()
    deferred: list[int] = []  # async: bytes each save left to the overlapped copy

    class Observer(NoObserver):
        def submitted(self, timings: SubmitTimings) -> None:
            deferred.append(timings.deferred_bytes)

    def start() -> tuple[FaultyBackend, CheckpointManager, object]:
        nonlocal verified, restarts
        backend = FaultyBackend(LocalBackend(root), armed=True)
        mgr = CheckpointManager(root, backend=backend, keep_last=KEEP_LAST, best=BEST, async_save=mode)
        state = mgr.track(model=model, optimizer=opt)
        if mgr._engine is not None:
            mgr._engine.observer = Observer()
        info = mgr.restore(state)
        committed = committed_steps(backend.inner)
        assert (info.step if info else None) == (committed[-1] if committed else None), (seed, committed, info)
        if info is not None:
            assert_bit_identical(flatten(model, opt), refs[info.step], f"seed {seed}: resumed step {info.step}")
            verified += 1
        restarts += 1
        return backend, mgr, state

    def outcome(saved_step: int, name: str, call) -> None:
        """Run ``call`` (a save, or the wait that settles an async one) and judge its outcome
        against the fault ``name`` armed for ``saved_step``."""
        nonlocal backend, mgr, state
        try:
            call()
            acknowledged.append(saved_step)
        except SimulatedCrash:
            assert backend.dead  # killed outside DCP (manifest update, retention): nothing to check
        except CheckpointError as e:
            assert backend.injected, f"seed {seed}: save {saved_step} failed without a fault: {e!r}"
            if not backend.dead:  # a real error (not the stand-in for a kill) names the run and object
                assert root in str(e), f"seed {seed}: error does not name the run: {e}"
        if backend.injected:
            injected[name] += 1
        if backend.dead:  # killed: the job restarts from the last committed checkpoint
            backend, mgr, state = start()
        elif acknowledged[-1:] == [saved_step] and (previous == "eio-manifest" or saved_step % 10 == 1):
            # after a successful save the live manager's manifest agrees with the COMMITTED
            # markers, even when the previous manifest update had failed (no restart needed)
            problems = verify_run(backend.inner, quick=True).problems
            assert problems == [], (seed, problems)

    backend, mgr, state = start()
    step, previous = 0, "none"
    pending: tuple[int, str] | None = None  # async: the save not settled yet (its step, its fault)
    for cycle in range(cycles):
        step += 1
        p = f"step_{step:09d}"
        if cycle % 20 == 19 and pending is not None:  # settled before this job hands the run over
            outcome(*pending, mgr.wait)
            previous, pending = pending[1], None
        if cycle % 20 == 19:  # a real kill: a child job resumes the run and dies mid-save
            if cycle % 40 == 19:  # first, while this job holds the run: a second job is refused
                rc, out = run_job(tmp_path, root, [step], extra=["--resume"], name=f"second{cycle}")
                assert rc != 0 and "RunLocked" in out, out
                injected["second-job"] += 1
            mgr.close()
            point = {k: (v.format(p=p) if isinstance(v, str) else v) for k, v in rnd.choice(REAL_KILL_POINTS).items()}
            rc, out = run_job(
                tmp_path,
                root,
                [step],
                faults=[point],
                extra=["--resume", "--keep-last", str(KEEP_LAST), *child_async],
                name=f"kill{cycle}",
            )
            # (a retention crash point is only reached when retention has something to delete)
            assert rc == 137 or (rc == 0 and point["op"] == "delete_prefix"), out
            if rc == 137:
                real_kills += 1
                injected[f"real-kill:{point['op']}"] += 1
            if (refs_dir / f"step_{step}.safetensors").exists():
                refs[step] = load_file(str(refs_dir / f"step_{step}.safetensors"))
            backend, mgr, state = start()
            continue
        name = rnd.choice(list(_faults(p)))
        loss = train_step(model, opt, step)  # async: runs while the pending save copies and writes
        if pending is not None:
            before = state
            outcome(*pending, mgr.wait)
            previous, pending = pending[1], None
            if state is not before:  # the restore replaced this step's training: train it again
                loss = train_step(model, opt, step)
        refs[step] = flatten(model, opt)
        backend.clear()
        for rule in _faults(p)[name]:
            backend.add(rule)
        if mode is False:
            outcome(step, name, lambda: _assert(mgr.save(step, state, metrics={"loss": loss}, force=True)))
            previous = name
            continue
        try:  # returns once staged: the outcome is settled after the next training step
            assert mgr.save(step, state, metrics={"loss": loss}, force=True)
            pending = (step, name)
        except CheckpointError as e:  # nothing of a previous save is pending here: this save's own
            raise AssertionError(f"seed {seed}: async save {step} raised at save(): {e!r}") from e

    if pending is not None:
        outcome(*pending, mgr.wait)
    mgr.close()
    backend, mgr, state = start()  # the final restart: gc + reconcile
    mgr.close()
    run = LocalBackend(root)
    report = verify_run(run)
    assert report.ok, (seed, report.to_json())
    committed = committed_steps(run)
    lost = []
    for s in acknowledged:
        newer = [c for c in committed if c > s]
        if s not in committed and len(newer) < KEEP_LAST:
            lost.append(s)  # neither kept nor legitimately dropped by retention
    left = RunStore(run).leftovers()
    assert not (left.temp_dirs or left.uncommitted_steps or left.unfinished_uploads), left
    for s in committed:
        m, o = build(seed=1)
        with CheckpointManager(root, read_only=True) as reader:
            assert reader.restore(reader.track(model=m, optimizer=o), s).step == s
        assert_bit_identical(flatten(m, o), refs[s], f"seed {seed}: step {s}")
        verified += 1
    summary = (
        f"soak: {cycles} cycles, {sum(injected.values())} faults injected ({real_kills} real kills, "
        f"{restarts - 1} restarts), {verified} checkpoints verified, data lost = {len(lost)} "
        f"[async_save={mode!r}, seed {seed}, {time.monotonic() - started:.0f}s]"
    )
    overlapped = sum(1 for b in deferred if b)
    summary += f", {overlapped} of {len(deferred)} staged saves overlapped" if mode is not False else ""
    with capsys.disabled():
        print("\n" + summary)
        print("  faults: " + ", ".join(f"{k}={v}" for k, v in sorted(injected.items())))
    assert not lost, f"acknowledged saves lost: {lost} ({summary})"
    if mode == "overlap":  # the soak exercised what it names: the copies ran in the background
        assert overlapped == len(deferred) > 0, summary


def _assert(saved: bool) -> None:
    assert saved
