"""The per-step save decision on 2 ranks (decision.py): one broadcast when nothing is saved;
every rank learns rank 0's metrics, best values and patience; a decision too large for the
fixed buffer and an error on rank 0 take the general path and reach every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.dist import run_ranks


def _decisions(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from dist_ckpt import CheckpointManager
    from dist_ckpt.errors import StepAlreadyExists

    calls: list[str] = []
    for name in ("broadcast", "all_reduce", "all_gather", "barrier"):
        original = getattr(c10d, name)

        def counted(*a: Any, _name: str = name, _fn: Any = original, **k: Any) -> Any:
            calls.append(_name)
            return _fn(*a, **k)

        setattr(c10d, name, counted)
        setattr(dist, name, counted)
    mgr = CheckpointManager(root, save_every_n_steps=100, best={"loss": "min"})
    state = mgr.track(model=torch.nn.Linear(2, 2))
    out: dict[str, Any] = {}
    # ranks report different values: rank 0's are the ones recorded, on every rank
    out["first"] = mgr.save(1, state, metrics={"loss": 1.0 + rank})
    calls.clear()
    out["noop"] = mgr.save(2, state, metrics={"loss": 5.0 + rank, "acc": 0.5})
    out["noop_collectives"] = list(calls)
    out["best"], out["patience"] = dict(mgr.best), dict(mgr.epochs_without_improvement)
    many = {f"m{i:04d}": float(i) + rank for i in range(200)}  # > 1 KiB of JSON
    out["many"] = mgr.save(3, state, metrics={"loss": 6.0, **many})
    out["progress_metrics"] = dict(mgr._progress.metrics)
    try:
        mgr.save(1, state, force=True)  # committed already: rank 0 refuses
    except StepAlreadyExists as e:
        out["error"] = type(e).__name__
    out["after_error"] = mgr.save(100, state, metrics={"loss": 0.5})
    out["best_final"] = dict(mgr.best)
    mgr.close()
    return out


def test_save_decision_on_two_ranks(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_decisions, 2, str(tmp_path / "run"), timeout=120)
    for out in (r0, r1):
        assert out["first"] is True and out["noop"] is False and out["many"] is False
        assert out["noop_collectives"] == ["broadcast"], "a save that does not save: one broadcast"
        assert out["best"] == {"loss": 1.0} and out["patience"] == {"loss": 1}
        assert out["error"] == "StepAlreadyExists"
        assert out["after_error"] is True and out["best_final"] == {"loss": 0.5}
    assert r0["progress_metrics"] == r1["progress_metrics"] and r0["progress_metrics"]["m0199"] == 199.0
