"""Run test code on several ranks: in spawned processes (gloo) or under ``torchrun``.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh Python processes, joins them
into one gloo process group and calls ``fn(rank, world_size, *args)`` in each. It returns the
ranks' return values (``results[r]`` from rank ``r``) or raises :class:`RanksFailed` carrying
every failing rank's traceback. ``fn`` and ``args`` must be picklable: define ``fn`` at module
level in an importable module (a test module or a helper next to it), not in a closure.

The rendezvous store (a ``TCPStore``) is hosted by the calling process on a port the OS picks,
so there is no free-port race; children find it through the usual ``MASTER_ADDR`` /
``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE`` variables with ``TORCHELASTIC_USE_AGENT_STORE=True``,
exactly as under ``torchrun``. With ``init_process_group=False`` the process group is left to
``fn`` (``dist.init_process_group("gloo")`` with the default ``env://`` works).

Ranks are started with ``start_method="forkserver"`` by default: a fork server that has
imported torch once forks every rank (a fraction of a second for 4 ranks, where ``"spawn"``
re-imports torch in each rank: seconds per rank on a small machine). Each rank still starts
from a clean process (the fork server never ran torch code), gets the caller's current
environment, and ``sys.path``; pass ``start_method="spawn"`` for fully fresh interpreters.

On a failure the other ranks get ``grace`` seconds to finish (they are usually stuck in a
collective waiting for the failed one), then are killed. On a timeout every rank still running
dumps its Python stacks (faulthandler, SIGUSR1) into the error before it is killed.

``run_torchrun(script, nproc, *args)`` runs a script under ``python -m torch.distributed.run
--standalone`` and returns the completed process, raising with the output on failure.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["RanksFailed", "run_ranks", "run_torchrun"]

_POLL_S = 0.05
# How gloo reports that a peer went away: the symptom on the other ranks, not the cause.
_PEER_DIED = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.nn.parallel"]


class RanksFailed(AssertionError):
    """One or more ranks failed, crashed or timed out. ``failures`` maps rank → report."""

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    env: dict[str, str],
    workdir: str,
    init_process_group: bool,
    pg_timeout_s: float,
) -> None:
    """Entry point of every rank (runs in the spawned process)."""
    # The parent's environment as it is now (a forkserver child would otherwise inherit the
    # environment of the moment the fork server started), plus the rank's variables.
    os.environ.clear()
    os.environ.update(env)
    stacks = open(os.path.join(workdir, f"stacks_{rank}.txt"), "w")  # noqa: SIM115 (lives as long as the process)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    result_path = os.path.join(workdir, f"result_{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist

        # A torch preloaded by the fork server read OMP_NUM_THREADS before this rank's value.
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
        try:
            value = fn(rank, world_size, *args)
        finally:
            if init_process_group and dist.is_initialized():
                dist.destroy_process_group()
        outcome: tuple[str, Any] = ("ok", value)
    except BaseException:  # noqa: BLE001 (reported to the parent, which raises)
        outcome = ("error", traceback.format_exc())
    try:
        payload = pickle.dumps(outcome)
    except Exception:  # noqa: BLE001
        payload = pickle.dumps(("error", f"rank {rank}: return value is not picklable:\n{traceback.format_exc()}"))
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, result_path)
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without running atexit/finalisers of torch's thread pools: faster, and a clean
    # result file was already written.
    os._exit(0 if outcome[0] == "ok" else 1)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    grace: float = 10.0,
    init_process_group: bool = True,
    env: dict[str, str] | None = None,
    start_method: str = "forkserver",
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes (gloo group).

    Returns the list of return values by rank. Raises :class:`RanksFailed` naming every rank
    that raised (with its traceback), crashed (exit code), or was still running at
    ``timeout`` seconds (with its stacks).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch.distributed as dist

    # The store lives here, on a port the OS picked; children connect as clients.
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout)
    )
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Takes effect when the fork server starts (first use in this process): it imports
        # torch once and every rank is forked from it, instead of each importing torch anew.
        ctx.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory(prefix="run_ranks-") as workdir:
        base_env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_WORLD_SIZE": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **(env or {}),
        }
        procs = []
        try:
            for rank in range(world_size):
                rank_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"}
                p = ctx.Process(
                    target=_child,
                    args=(fn, rank, world_size, args, rank_env, workdir, init_process_group, timeout),
                    name=f"rank{rank}",
                )
                p.start()
                procs.append(p)
            return _join(procs, workdir, timeout, grace)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
            del store


def _read_result(workdir: str, rank: int) -> tuple[str, Any] | None:
    path = os.path.join(workdir, f"result_{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _join(procs: list[Any], workdir: str, timeout: float, grace: float) -> list[Any]:
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    first_failure: float | None = None
    while True:
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            break
        now = time.monotonic()
        if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
            first_failure = now
        if now > deadline or (first_failure is not None and now > first_failure + grace):
            break
        time.sleep(_POLL_S)

    timed_out = time.monotonic() > deadline
    still_running = [rank for rank, p in enumerate(procs) if p.is_alive()]
    if still_running:
        for rank in still_running:
            os.kill(procs[rank].pid, signal.SIGUSR1)
        time.sleep(1.0)
        for rank in still_running:
            procs[rank].kill()
            procs[rank].join(5)

    results: list[Any] = [None] * world_size
    failures: dict[int, str] = {}
    for rank, p in enumerate(procs):
        outcome = _read_result(workdir, rank)
        if rank in still_running:
            stacks = Path(workdir, f"stacks_{rank}.txt").read_text(errors="replace").strip()
            why = f"timed out after {timeout:.0f}s" if timed_out else "killed after another rank failed"
            failures[rank] = f"{why}; its stacks:\n{stacks or '(none captured)'}"
        elif outcome is None:
            failures[rank] = f"exited with code {p.exitcode} without a result (crashed or killed)"
        elif outcome[0] == "error":
            failures[rank] = outcome[1]
        else:
            results[rank] = outcome[1]
    if failures:
        # The root cause first: ranks that raised on their own, then ranks that only saw a peer
        # die ("Connection closed/reset by peer"), then ranks killed while stuck waiting.
        order = sorted(failures, key=lambda r: (r in still_running, any(m in failures[r] for m in _PEER_DIED), r))
        body = "\n".join(f"--- rank {r} ---\n{failures[r].rstrip()}" for r in order)
        raise RanksFailed(f"{len(failures)} of {world_size} ranks failed:\n{body}", failures)
    return results


def run_torchrun(
    script: str | os.PathLike[str],
    nproc: int,
    *args: str,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under ``torchrun --standalone --nproc-per-node nproc`` (free port chosen
    by torchrun). Returns the completed process; raises :class:`RanksFailed` with the output
    on a non-zero exit or a timeout (the whole process group is killed)."""
    cmd: Sequence[str] = [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--monitor-interval=0.1",
        str(script),
        *map(str, args),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: torchrun and its ranks
        out, _ = proc.communicate()
        raise RanksFailed(f"torchrun {script} timed out after {timeout:.0f}s; output:\n{out}", {-1: out}) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if proc.returncode != 0:
        raise RanksFailed(f"torchrun {script} exited with {proc.returncode}; output:\n{out}", {-1: out})
    return result
