"""rng.py and state.py: RNG capture/apply/reseed, the world-size warning, TrainingState checks."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dist_ckpt import rng
from dist_ckpt.errors import ConfigError
from dist_ckpt.format import json_values
from dist_ckpt.state import TrainingState


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(2, generator=None).tolist(),
    )


def test_capture_apply_round_trip_same_next_values():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()  # move away from the seeds
    state = rng.capture()
    expected = _draw()
    _draw()  # advance further
    rng.apply(state)
    assert _draw() == expected


def test_capture_apply_round_trip_through_json():
    """In a checkpoint the state travels as JSON (Python state as lists, NumPy as an array,
    torch as a uint8 tensor); apply() must accept that form."""
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    state = rng.capture()
    expected = _draw()
    python_and_numpy = json_values.decode(json_values.encode({"python": state["python"], "numpy": state["numpy"]}))
    python_as_lists = json_values.from_json(json.loads(json.dumps(python_and_numpy["python"])))  # tuples → lists
    travelled = {
        "python": python_as_lists,
        "numpy": python_and_numpy["numpy"],
        "torch": state["torch"].clone().to(torch.int64),
    }
    _draw()
    rng.apply(travelled)
    assert _draw() == expected


def test_capture_does_not_alias_live_state():
    torch.manual_seed(0)
    state = rng.capture()
    snapshot = state["torch"].clone()
    torch.rand(100)
    assert torch.equal(state["torch"], snapshot)


def test_reseed_is_deterministic_per_step_and_rank():
    seed = rng.reseed(100, 1)
    a = _draw()
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    assert rng.reseed(100, 1) == seed
    assert _draw() == a
    rng.reseed(100, 2)
    b = _draw()
    rng.reseed(101, 1)
    c = _draw()
    assert a != b and a != c and b != c
    for part_a, part_b in zip(a, b):  # every generator is reseeded, not just one
        assert part_a != part_b


def test_world_size_warning_text():
    with pytest.warns(UserWarning) as rec:
        rng.warn_world_size_change(2, 4, 0, False, 120)  # rank 0 speaks for the job
    msg = str(rec[0].message)
    assert "saved by 2 ranks, this job has 4" in msg
    assert "Ranks 2..3 had no saved RNG state and were reseeded from (step=120, rank=<the rank>)" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rng.warn_world_size_change(2, 4, 3, True, 120)  # other ranks stay silent (one warning per job)
    with pytest.warns(UserWarning, match=r"saved by 2 ranks, this job has 1\. Rank 0 restored its own saved RNG state"):
        rng.warn_world_size_change(2, 1, 0, False, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rng.warn_world_size_change(2, 2, 0, False, 120)  # unchanged: silent


def test_rank_key():
    assert rng.rank_key(0) == "rank_0" and rng.rank_key(12) == "rank_12"


# -- TrainingState -----------------------------------------------------------------------------
class _NoState:
    pass


def test_track_rejects_objects_without_state_dict_and_bad_names():
    m = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="thing"):
        TrainingState({"model": m, "thing": _NoState()})
    with pytest.raises(ConfigError, match="at least one"):
        TrainingState({})
    for bad in ("rng", "_dist_ckpt", "a.b"):
        with pytest.raises(ConfigError, match="reserved"):
            TrainingState({bad: m})


def test_optimizer_of_untracked_model_is_refused():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1)
    with pytest.raises(ConfigError, match="opt"):
        TrainingState({"a": a, "opt": opt})  # b's parameters are not tracked
    with pytest.raises(ConfigError, match="opt"):
        TrainingState({"opt": torch.optim.SGD(a.parameters(), lr=0.1)})
    TrainingState({"a": a, "b": b, "opt": opt})  # an optimizer over two tracked models is fine


def test_kinds():
    m = nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    s = TrainingState(
        {"m": m, "o": opt, "s": sched, "c": {"tokens": 1}, "scaler": torch.amp.GradScaler("cpu", enabled=False)}
    )
    assert s.describe() == {"m": "model", "o": "optimizer", "s": "stateful", "c": "values", "scaler": "stateful"}
    assert set(s.state_dict()) == {"m", "o", "s", "scaler"}  # values travel in the progress record
