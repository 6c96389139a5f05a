"""dist_ckpt.ddp_buckets against the real DDP reducer, 4 gloo ranks in-process.

The module uses DDP internals (there is no public API for the bucket layout); these tests pin
the torch version it was checked against — torch 2.13.0 — and check each behaviour the resume
relies on: the layout captured after the first backward is DDP's rebuilt one, ``restore``
re-creates the reducer with it already rebuilt (no second rebuild), and every case it cannot
make exact warns once, on rank 0, naming the reason. The end-to-end proof (SIGKILL, restart,
bit-identical) is tests/distributed/test_ddp_exact_resume.py."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from support.dist import run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ckpt import ddp_buckets
from dist_ckpt.errors import CorruptCheckpoint

WORLD = 4
SMALL_BUCKETS = 0.003  # MiB (3145 bytes): the model below (4420 bytes of fp32 parameters) needs 2 buckets


def test_checked_against_torch_2_13_0() -> None:
    version = torch.__version__.split("+")[0]
    assert ddp_buckets.CHECKED_TORCH == "2.13.0"
    assert version == ddp_buckets.CHECKED_TORCH, (
        f"dist_ckpt/ddp_buckets.py uses DistributedDataParallel internals checked against torch "
        f"{ddp_buckets.CHECKED_TORCH}; this is torch {version}. Re-run tests/distributed/test_ddp_buckets.py "
        "and test_ddp_exact_resume.py on it, then update CHECKED_TORCH."
    )
    internals = ["_ddp_init_helper", "_build_params_for_reducer", "_build_debug_param_to_name_mapping"]
    missing = [n for n in internals if not hasattr(DDP, n)]
    reducer = ["_rebuild_buckets", "_push_all_rebuilt_params", "_get_zeros_like_grad_buckets", "_set_static_graph"]
    missing += [n for n in reducer if not hasattr(torch.distributed.Reducer, n)]
    assert not missing, f"torch {version}: DDP internals used by dist_ckpt.ddp_buckets are gone: {missing}"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))


def _train(ddp: nn.Module, steps: range, rank: int) -> None:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in steps:
        g = torch.Generator().manual_seed(100 * step + rank)
        loss = ddp(torch.randn(4, 8, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _layout_of(ddp: DDP) -> list[list[str]]:
    return [list(b) for b in ddp_buckets._read_buckets(ddp)]


def _round_trip_worker(rank: int, world: int) -> dict[str, Any]:
    kw = {"bucket_cap_mb": SMALL_BUCKETS}
    a = DDP(_model(), **kw)
    initial = _layout_of(a)
    _train(a, range(1), rank)  # one backward: DDP would rebuild at the next forward
    saved = json.loads(json.dumps(ddp_buckets.capture({"model": a})))  # JSON, as in the checkpoint
    after_capture = a.reducer._rebuild_buckets()  # capture already settled the rebuild
    _train(a, range(1, 3), rank)
    b = DDP(_model(), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp_buckets.restore({"model": b}, saved, saved_world=world, rank=rank, where="ckpt")
    restored = _layout_of(b)
    has_rebuilt = b._has_rebuilt_buckets
    _train(b, range(1, 3), rank)  # trains on the restored layout, never rebuilding it
    return {
        "initial": initial,
        "saved": saved["model"],
        "after_capture": after_capture,
        "restored": restored,
        "has_rebuilt": has_rebuilt,
        "after_training": _layout_of(b),
        "a": _layout_of(a),
        "warnings": [str(w.message) for w in caught],
    }


def test_capture_and_restore_round_trip_at_4_ranks() -> None:
    results = run_ranks(_round_trip_worker, WORLD, timeout=180)
    r = results[0]
    saved = r["saved"]
    assert saved["rebuilt"] and not saved["static_graph_pending"] and saved["world_size"] == WORLD
    assert len(saved["buckets"]) == 2, saved  # several buckets
    assert saved["buckets"] != r["initial"], "the rebuilt layout is in gradient-ready order, not parameter order"
    assert not r["after_capture"], "capture() settles DDP's pending rebuild itself"
    assert r["restored"] == saved["buckets"] == r["a"] == r["after_training"]
    assert r["has_rebuilt"] and r["warnings"] == []
    assert all(res["saved"] == saved and res["restored"] == saved["buckets"] for res in results)


def _warnings_worker(rank: int, world: int) -> dict[str, Any]:
    a = DDP(_model(), bucket_cap_mb=SMALL_BUCKETS)
    _train(a, range(2), rank)
    saved = ddp_buckets.capture({"model": a})
    out: dict[str, Any] = {}

    def restore(name: str, target: nn.Module, doc: dict[str, Any], saved_world: int = world) -> None:
        before = _layout_of(next(iter(ddp_buckets.find_ddp_modules({"m": target}).values())))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp_buckets.restore({"model": target}, doc, saved_world=saved_world, rank=rank, where="ckpt")
        after = _layout_of(next(iter(ddp_buckets.find_ddp_modules({"m": target}).values())))
        out[name] = {"warnings": [str(w.message) for w in caught], "unchanged": before == after}

    restore("world_size", DDP(_model(), bucket_cap_mb=SMALL_BUCKETS), saved, saved_world=2)
    restore("settings", DDP(_model(), bucket_cap_mb=1), saved)
    hooked = DDP(_model(), bucket_cap_mb=SMALL_BUCKETS)
    hooked.register_comm_hook(None, default_hooks.allreduce_hook)
    restore("python_comm_hook", hooked, saved)  # registered again on the new reducer: exact
    out["python_comm_hook"]["layout"] = _layout_of(hooked)
    out["python_comm_hook"]["hook"] = hooked._get_ddp_logging_data().get("comm_hook")
    _train(hooked, range(2, 3), rank)
    out["python_comm_hook"]["after_training"] = _layout_of(hooked)
    builtin = DDP(_model(), bucket_cap_mb=SMALL_BUCKETS)
    builtin._register_builtin_comm_hook(torch.distributed.BuiltinCommHookType.ALLREDUCE)
    restore("builtin_comm_hook", builtin, saved)
    restore("no_layout", DDP(_model(), bucket_cap_mb=SMALL_BUCKETS), {})
    static = DDP(_model(), static_graph=True)
    _train(static, range(1), rank)  # static graph: the rebuild follows the *second* backward
    restore("static_pending", DDP(_model(), static_graph=True), ddp_buckets.capture({"model": static}))
    unused = DDP(_model(), find_unused_parameters=True)  # never rebuilds: nothing to save or restore
    _train(unused, range(2), rank)
    unused_saved = ddp_buckets.capture({"model": unused})
    out["find_unused_saved"] = unused_saved["model"]
    restore("find_unused", DDP(_model(), find_unused_parameters=True), unused_saved)
    try:
        ddp_buckets.restore(
            {"model": DDP(_model())},
            {"model": {"format": 1, "buckets": 3}},
            saved_world=world,
            rank=rank,
            where="ckpt/step_000000004",
        )
    except CorruptCheckpoint as e:
        out["corrupt"] = str(e)
    out["saved"] = saved["model"]["buckets"]
    return out


def test_every_inexact_case_warns_once_on_rank_0_and_leaves_ddp_alone() -> None:
    """World size or bucket settings changed, a built-in comm hook, no layout saved, a static
    graph saved before its rebuild: one warning each, on rank 0 only; a register_comm_hook hook
    is carried over to the re-created reducer; a malformed layout is a CorruptCheckpoint."""
    results = run_ranks(_warnings_worker, WORLD, timeout=180)
    r0 = results[0]
    expected = {
        "world_size": "world size changed (2 -> 4 ranks)",
        "settings": "bucket_bytes_cap=",
        "builtin_comm_hook": "_register_builtin_comm_hook",
        "no_layout": "holds no bucket layout",
        "static_pending": "static_graph=True",
    }
    for case, text in expected.items():
        assert len(r0[case]["warnings"]) == 1 and text in r0[case]["warnings"][0], (case, r0[case])
        assert "not bit-exact" in r0[case]["warnings"][0], (case, r0[case])
        assert r0[case]["unchanged"], f"{case}: DDP's reducer must be left as it is"
        assert all(res[case]["warnings"] == [] for res in results[1:]), f"{case}: warned on a rank other than 0"
    assert "ckpt/step_000000004" in r0["corrupt"] and "malformed" in r0["corrupt"]
    assert r0["find_unused"]["warnings"] == [] and r0["find_unused"]["unchanged"]
    assert r0["find_unused_saved"]["buckets"] == [] and not r0["find_unused_saved"]["rebuilt"]
    hooked = r0["python_comm_hook"]  # a hook from register_comm_hook survives the new reducer
    assert hooked["warnings"] == [] and hooked["hook"] == "allreduce_hook"
    assert hooked["layout"] == hooked["after_training"] == r0["saved"]


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "torch-compile-wrapper"])
def test_find_ddp_modules_sees_through_torch_compile(compiled: bool) -> None:
    # no process group needed: DDP is never constructed; a stand-in subclass instance is found by type
    class FakeDDP(DDP):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.module = nn.Linear(2, 2)

    inner = FakeDDP()
    model = torch.compile(inner) if compiled else inner
    assert ddp_buckets.find_ddp_modules({"model": model}) == {"model": inner}
    holder = nn.ModuleDict({"g": inner})
    assert ddp_buckets.find_ddp_modules({"gan": holder}) == {"gan.g": inner}
