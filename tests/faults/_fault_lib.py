"""Shared pieces of the fault suite: the model every job trains, reference dumps, launching the
fault job (one process or torchrun), and :func:`check_run` — the checks every scenario ends with.

The job (``_fault_job.py``) writes, on rank 0, ``refs/step_N.safetensors`` holding the exact
state it is about to save at step N (model parameters and optimizer state, flattened), and
``refs/step_N.returned`` once ``mgr.save`` returned True. :func:`check_run` then proves:

- a new manager start (garbage collection + manifest reconciliation) succeeds;
- ``restore("last")`` gives the expected step, bit-identical to its reference; every other
  committed step loads bit-identical too;
- every step whose save returned is committed (nothing acknowledged was lost);
- no partial step is visible: no ``*.tmp-*`` folder, no step without ``COMMITTED``, no
  unfinished upload, no ``.part-`` temp file;
- ``manifest.json`` agrees with the ``COMMITTED`` markers (``dist_ckpt.verify.verify_run``,
  which also checks every file's checksums).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointError
from dist_ckpt.run_store import MANIFEST, RunStore, parse_step_prefix, step_prefix
from dist_ckpt.verify import verify_run
from storage_backends import Backend, open_backend

HERE = Path(__file__).resolve().parent
JOB = HERE / "_fault_job.py"
BEST = {"loss": "min"}
QUIET = [  # pytestmark of every fault test module
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:world size changed:UserWarning"),
]


# -- the model ---------------------------------------------------------------------------------
def build(width: int = 64, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int = 0) -> float:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def flatten(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model parameters and optimizer state as one flat dict of tensors (FQN names, so a DDP
    job's dump compares with a plain model's)."""
    out = {f"model.{k}": v.detach().clone().contiguous() for k, v in get_model_state_dict(model).items()}
    for fqn, st in get_optimizer_state_dict(model, opt).get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{fqn}.{k}"] = v.detach().clone().reshape(-1).contiguous()
    return out


def write_ref(refs: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    refs.mkdir(parents=True, exist_ok=True)
    tmp = refs / f".step_{step}.tmp"
    save_file(flatten(model, opt), str(tmp))
    os.replace(tmp, refs / f"step_{step}.safetensors")


def mark_returned(refs: Path, step: int) -> None:
    (refs / f"step_{step}.returned").write_text("ok")


def returned_steps(refs: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1].split(".")[0]) for p in refs.glob("step_*.returned"))


def assert_bit_identical(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert found.keys() == expected.keys(), f"{what}: keys differ: {sorted(set(found) ^ set(expected))[:5]}"
    for k in expected:
        a, b = found[k], expected[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{what}: {k} is {a.dtype}{list(a.shape)}, expected {b.dtype}{list(b.shape)}"
        )
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{what}: {k} differs"


def assert_named_error(exc: BaseException, *names: str) -> None:
    """One of dist_ckpt.errors, naming the file/key(s)."""
    assert isinstance(exc, CheckpointError), f"{type(exc).__name__} is not a dist_ckpt error: {exc}"
    for name in names:
        assert name in str(exc), f"{type(exc).__name__} does not name {name!r}: {exc}"


# -- running the job --------------------------------------------------------------------------
@dataclass
class Job:
    proc: subprocess.Popen[str]
    log: Path
    pids: Path

    def pid_of(self, rank: int, timeout: float = 60.0) -> int:
        path = self.pids / f"rank_{rank}"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"job exited ({self.proc.returncode}) before rank {rank} started:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"rank {rank} did not start in {timeout}s:\n{self.output()}")
            time.sleep(0.05)
        return int(path.read_text())

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job timed out after {timeout}s:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


def start_job(
    tmp: Path,
    root: str,
    steps: list[int] | str,
    *,
    nproc: int = 1,
    faults: list[dict[str, Any]] | None = None,
    arm_at: int | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    name: str = "job",
) -> Job:
    """Start ``_fault_job.py`` (``nproc > 1``: under torchrun) in its own session."""
    from support.faulty_backend import FaultyBackend

    refs, pids, log = tmp / "refs", tmp / f"{name}.pids", tmp / f"{name}.log"
    pids.mkdir(parents=True, exist_ok=True)
    args = [
        "--root",
        root,
        "--refs",
        str(refs),
        "--pids",
        str(pids),
        "--steps",
        ",".join(map(str, steps)) if not isinstance(steps, str) else steps,
        *(extra or []),
    ]
    if arm_at is not None:
        args += ["--arm-at", str(arm_at)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--monitor-interval=0.1",
            str(JOB),
            *args,
        ]
    else:
        cmd = [sys.executable, str(JOB), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("DIST_CKPT_FAULTS", None)
    if faults:
        full_env.update(FaultyBackend.env(faults, log=str(tmp / f"{name}.faults.jsonl"), armed=arm_at is None))
    out = open(log, "a")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True)
    out.close()
    return Job(proc, log, pids)


def run_job(tmp: Path, root: str, steps: list[int] | str, *, timeout: float = 120.0, **kw: Any) -> tuple[int, str]:
    job = start_job(tmp, root, steps, **kw)
    rc = job.wait(timeout)
    return rc, job.output()


def injected(tmp: Path, name: str = "job") -> list[dict[str, Any]]:
    path = tmp / f"{name}.faults.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(cond: Callable[[], Any], timeout: float, what: str, job: Job | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if job is not None and job.proc.poll() is not None:
            raise AssertionError(f"job exited ({job.proc.returncode}) while waiting for {what}:\n{job.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}" + (f":\n{job.output()}" if job else "")
            )
        time.sleep(0.02)


# -- the checks every scenario ends with -------------------------------------------------------
@dataclass
class RunCheck:
    last: int | None
    committed: list[int]
    manifest_steps: list[int]


def committed_steps(backend: Backend) -> list[int]:
    steps = []
    for o in backend.list("step_"):
        top, _, rest = o.key.partition("/")
        step = parse_step_prefix(top)
        if rest == "COMMITTED" and step is not None:
            steps.append(step)
    return sorted(steps)


def restore_into_fresh(root: str, backend: Backend | None, which: Any = "last", *, width: int = 64, **options: Any):
    """A fresh model/optimizer restored from ``which`` (read-only manager): (info, flat state)."""
    model, opt = build(width, seed=12345)  # different init: a no-op restore would show
    with CheckpointManager(root, backend=backend, read_only=True, best=BEST, **options) as mgr:
        info = mgr.restore(mgr.track(model=model, optimizer=opt), which)
    return info, flatten(model, opt)


def check_run(
    root: str,
    refs: Path | None,
    *,
    expect_last: int | None,
    backend: Backend | None = None,
    width: int = 64,
    all_steps: bool = True,
    keep_last: int | None = None,
    manager_options: dict[str, Any] | None = None,
) -> RunCheck:
    """The after-the-fault checks (see the module docstring). ``backend``: a clean backend for
    ``root`` (e.g. an S3Backend for the test server); opened from ``root`` when None.
    ``keep_last``: the job ran with retention, so only its newest acknowledged saves must remain."""
    b = backend or open_backend(root)
    options = dict(manager_options or {})
    # 1. the next job's manager start: removes leftovers, reconciles the manifest
    CheckpointManager(root, backend=b, best=BEST, **options).close()
    # 2. no partial step visible
    left = RunStore(b).leftovers()
    assert not (left.temp_dirs or left.uncommitted_steps or left.unfinished_uploads), (
        f"leftovers after a manager start: {left}"
    )
    assert not [o.key for o in b.list("") if ".part-" in o.key or ".tmp-" in o.key]
    if not root.startswith("s3://"):
        stray = [str(p.relative_to(root)) for p in Path(root).rglob("*") if ".tmp-" in p.name or ".part-" in p.name]
        assert not stray, f"temp files/folders left after a manager start: {stray}"
    # 3. manifest.json consistent with the COMMITTED markers; every file's checksums right
    report = verify_run(b)
    assert report.ok, json.dumps(report.to_json(), indent=1)[:4000]
    committed = committed_steps(b)
    manifest = json.loads(b.read(MANIFEST)) if committed else {"checkpoints": [], "pointers": {}}
    listed = sorted(e["step"] for e in manifest["checkpoints"])
    assert listed == committed, f"manifest lists {listed}, COMMITTED markers say {committed}"
    assert manifest["pointers"].get("last") == (committed[-1] if committed else None)
    # 4. last is what we expect, bit-identical; acknowledged saves all there
    info, state = restore_into_fresh(root, b, "last", width=width)
    assert (info.step if info else None) == expect_last, (
        f"restore('last') gave {info and info.step}, expected {expect_last}"
    )
    if refs is not None:
        acknowledged = returned_steps(refs)
        if acknowledged:
            assert committed and max(acknowledged) <= committed[-1], (
                f"acknowledged {acknowledged}, committed {committed}"
            )
        oldest_kept = committed[-keep_last] if keep_last and len(committed) >= keep_last else -1
        for step in acknowledged:
            if step < oldest_kept:
                continue  # retention dropped it after newer steps committed
            assert step in committed, f"save({step}) returned True but step {step} is not committed: data lost"
        if expect_last is not None:
            assert_bit_identical(state, load_file(str(refs / f"step_{expect_last}.safetensors")), f"step {expect_last}")
        if all_steps:
            for step in committed:
                if step != expect_last:
                    _, st = restore_into_fresh(root, b, step, width=width)
                    assert_bit_identical(st, load_file(str(refs / f"step_{step}.safetensors")), f"step {step}")
    return RunCheck(info.step if info else None, committed, listed)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / step_prefix(step)


class LocalJob:
    """The job of ``_fault_job.py`` run inside the test process (single rank): same model,
    same reference dumps, so :func:`check_run` applies."""

    def __init__(self, root: str, refs: Path, *, backend: Backend | None = None, width: int = 64, **options: Any):
        self.root, self.refs = root, refs
        self.model, self.opt = build(width)
        self.mgr = CheckpointManager(root, backend=backend, best=BEST, **options)
        self.state = self.mgr.track(model=self.model, optimizer=self.opt)
        self.pending: int | None = None  # an async save not yet known to be durable

    def save(self, step: int) -> bool:
        """Train one step and save it. An async save counts as acknowledged only once the next
        save() or close() returned (they raise its failure)."""
        loss = train_step(self.model, self.opt, step)
        write_ref(self.refs, step, self.model, self.opt)
        try:
            saved = self.mgr.save(step, self.state, metrics={"loss": loss}, force=True)
        finally:
            pending, self.pending = self.pending, None
        if pending is not None:
            mark_returned(self.refs, pending)
        if saved and self.mgr.config.async_save:
            self.pending = step
        elif saved:
            mark_returned(self.refs, step)
        return saved

    def close(self) -> None:
        pending, self.pending = self.pending, None
        self.mgr.close()
        if pending is not None:
            mark_returned(self.refs, pending)
