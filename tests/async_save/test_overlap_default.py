"""``async_save=True`` is overlapped staging where a tracked optimizer guards the copy:

- the parameters a tracked optimizer updates and its state are copied after ``save()``
  returned; a model nothing optimizes (an EMA copy) is copied inside ``save()``; with no tracked
  optimizer at all the save is staged;
- a loop that changes parameters in place outside ``optimizer.step()`` right after ``save()``
  gets ``SnapshotInconsistent`` (nothing committed, the previous checkpoint stays last), never
  a torn snapshot; ``async_save="staged"`` saves that loop's state at ``save()``;
- a write the version counter does not count (through ``param.data``) is caught by the join's
  sampled content check.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from async_helpers import RecordingObserver, assert_same, committed_steps, mutate_in_place
from test_overlap import between_chunks, dump, forward_backward, loaded, make, small_chunks, step  # noqa: F401

from dist_ckpt import CheckpointManager
from dist_ckpt import overlap as overlap_mod
from dist_ckpt.errors import SnapshotInconsistent

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _first_save(root: Path, async_save: Any) -> tuple[CheckpointManager, Any, Any, Any, Any, dict]:
    model, opt, sched = make()
    mgr = CheckpointManager(str(root), async_save=async_save)
    state = mgr.track(model=model, optimizer=opt, scheduler=sched)
    mgr._engine.observer = RecordingObserver()
    step(model, opt, sched)
    mgr.save(1, state, force=True)
    mgr.wait()
    return mgr, state, model, opt, sched, dump(model, opt)


def test_default_defers_the_optimizers_tensors(tmp_path: Path) -> None:
    mgr, state, model, opt, sched, _ = _first_save(tmp_path, True)
    observer = mgr._engine.observer
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert observer.submits[-1].deferred_bytes > params  # parameters and AdamW state: after save()
    step(model, opt, sched)
    expected = dump(model, opt)
    mgr.save(2, state, force=True)
    step(model, opt, sched)  # forward/backward, then the step joins the copy
    mgr.close()
    assert committed_steps(tmp_path) == [1, 2]
    assert_same(loaded(tmp_path, 2), expected)


@pytest.mark.parametrize("async_save", [True, "staged"])
def test_in_place_change_after_save_fails_loudly_by_default_and_is_saved_when_staged(
    tmp_path: Path, async_save: Any
) -> None:
    """The pattern of tests/async_save/test_async_single.py (parameters and optimizer state
    changed in place right after save(), outside optimizer.step())."""
    mgr, state, model, opt, sched, expected_1 = _first_save(tmp_path, async_save)
    step(model, opt, sched)
    expected_2 = dump(model, opt)
    mgr.save(2, state, force=True)
    mutate_in_place(model, opt)
    if async_save is True:
        with pytest.raises(SnapshotInconsistent, match=r"step 2: .*model\.a\.weight.*async_save='staged'"):
            mgr.wait()
        assert committed_steps(tmp_path) == [1]
        assert_same(loaded(tmp_path, "last"), expected_1)
    else:
        mgr.wait()
        assert committed_steps(tmp_path) == [1, 2]
        assert_same(loaded(tmp_path, "last"), expected_2)
    mgr.close()


@pytest.mark.parametrize("async_save", [True, "overlap"])
def test_a_write_through_param_data_before_its_copy_fails_the_save(  # noqa: F811 (fixtures)
    tmp_path: Path,
    async_save: Any,
    small_chunks: None,  # noqa: F811
    between_chunks: Any,  # noqa: F811
) -> None:
    """``p.data`` has a version counter of its own: only the join's content check sees it
    (before it, such a save committed the changed values: a torn snapshot)."""
    mgr, state, model, opt, sched, expected_1 = _first_save(tmp_path, async_save)
    step(model, opt, sched)
    gate = threading.Event()
    between_chunks(lambda fqn, done: gate.wait(30))  # the copy waits until the write is done
    mgr.save(2, state, force=True)
    version = model.a.weight._version
    model.a.weight.data.mul_(0.5)  # e.g. a hand-written weight decay before the step
    assert model.a.weight._version == version, "the premise: the write is invisible to the counter"
    gate.set()
    forward_backward(model, opt)
    opt.step()  # joins the copy
    with pytest.raises(SnapshotInconsistent, match=r"step 2: .*model\.a\.weight"):
        mgr.wait()
    mgr.close()
    assert committed_steps(tmp_path) == [1]
    assert_same(loaded(tmp_path, "last"), expected_1)


def test_a_model_no_optimizer_updates_is_copied_inside_save(tmp_path: Path) -> None:
    """An EMA copy updated through ``.data`` after ``save()``: staged, so saved as it was."""
    model, opt, sched = make()
    ema = copy.deepcopy(model)
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    state = mgr.track(model=model, ema=ema, optimizer=opt, scheduler=sched)
    mgr._engine.observer = observer = RecordingObserver()
    step(model, opt, sched)
    ema_at_save = {k: v.clone() for k, v in ema.state_dict().items()}
    mgr.save(1, state, force=True)
    for e, p in zip(ema.parameters(), model.parameters()):  # the EMA update, before the next step
        e.data.mul_(0.9).add_(p.data, alpha=0.1)
    step(model, opt, sched)
    mgr.close()
    ema_bytes = sum(p.numel() * p.element_size() for p in ema.parameters())
    submit = observer.submits[-1]
    assert 0 < submit.deferred_bytes <= submit.bytes - ema_bytes  # the EMA model was not deferred
    restored_ema = copy.deepcopy(ema)
    reader = CheckpointManager(str(tmp_path), read_only=True)
    m2, o2, s2 = make(seed=3)
    step(m2, o2, s2)
    reader.restore(reader.track(model=m2, ema=restored_ema, optimizer=o2, scheduler=s2), which=1)
    reader.close()
    assert_same(dict(restored_ema.state_dict()), ema_at_save)


def test_without_a_tracked_optimizer_the_save_is_staged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, opt, sched = make()
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    state = mgr.track(model=model)
    mgr._engine.observer = observer = RecordingObserver()
    overlap_mod._STAGED_LOGGED.clear()
    with caplog.at_level(logging.DEBUG, logger="dist_ckpt.overlap"):
        for i in (1, 2):
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            mgr.save(i, state, force=True)
            with torch.no_grad():  # a hand-written SGD step, no optimizer to hook
                for p in model.parameters():
                    p.data.sub_(0.1)
            mgr.wait()
    mgr.close()
    assert [s.deferred_bytes for s in observer.submits] == [0, 0]
    logged = [r for r in caplog.records if "staged inside save()" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.DEBUG
    reader = CheckpointManager(str(tmp_path), read_only=True)
    m2 = make(seed=3)[0]
    reader.restore(reader.track(model=m2), which=2)
    reader.close()
    assert_same(dict(m2.state_dict()), expected)


def test_an_optimizer_whose_step_skips_the_hooks_is_not_deferred() -> None:
    class Unhooked(torch.optim.SGD):  # as a wrapper that never ran Optimizer.__init__ for its class
        def step(self, closure: Any = None) -> Any:
            return None

    model = torch.nn.Linear(4, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    raw = Unhooked.__new__(Unhooked)
    raw.__dict__.update(sgd.__dict__)
    assert overlap_mod.runs_step_hooks(sgd) and not overlap_mod.runs_step_hooks(raw)

    class State:  # what prepare() reads of a TrainingState
        objects = {"model": model, "optimizer": raw}
        kinds = {"model": "model", "optimizer": "optimizer"}
        models = {"model": model}

    assert overlap_mod.prepare(State(), lambda: None, True) == frozenset()
    assert overlap_mod.prepare(State(), lambda: None, "overlap")  # explicit: as before
    State.objects = {"model": model, "optimizer": sgd}
    assert overlap_mod.prepare(State(), lambda: None, True) == overlap_mod.guarded([sgd])


def test_samples_name_the_tensors_that_changed_and_a_nan_equals_itself() -> None:
    from dist_ckpt.overlap_samples import Samples

    tensors = [
        torch.full((5000,), float("nan")),  # several pages of fp32
        torch.arange(10, dtype=torch.int64),
        torch.zeros(0),
        torch.ones(3000, dtype=torch.bfloat16),
        torch.zeros(4, dtype=torch.bool),
    ]
    at_save = Samples(tensors)
    assert at_save.differing(Samples(tensors, at_save.groups)) == []
    tensors[1][-1] = -1  # the last element is always sampled
    tensors[3].data.mul_(0.5)  # every element
    tensors[4][0] = True  # the first element is always sampled
    assert at_save.differing(Samples(tensors, at_save.groups)) == [1, 3, 4]


def test_load_weights_right_after_a_save_joins_its_copy_first(tmp_path: Path) -> None:
    """``load_weights`` writes into the module in place: the overlapped copy of the save before
    it must be joined first (it was not: the save failed with SnapshotInconsistent)."""
    mgr, state, model, opt, sched, expected_1 = _first_save(tmp_path, True)
    step(model, opt, sched)
    expected_2 = dump(model, opt)
    mgr.save(2, state, force=True)
    mgr.load_weights(model, which=1)  # e.g. evaluating an earlier checkpoint's weights
    mgr.wait()
    mgr.close()
    assert committed_steps(tmp_path) == [1, 2]
    assert_same(loaded(tmp_path, 2), expected_2)
    assert torch.equal(model.a.weight, expected_1["m.a.weight"])


def test_changed_tensors_are_named_in_tracked_order_whichever_thread_saw_them(
    tmp_path: Path,
    small_chunks: None,  # noqa: F811
    between_chunks: Any,  # noqa: F811
) -> None:
    """The first deferred tensor changes just after its own copy (only the join sees it), the
    others before theirs (the worker sees them first): the message still names them in tracked
    order, the first one first. CI once saw ``model.a.weight`` pushed behind the ten names
    shown by the order in which the two threads happened to find the changes."""
    mgr, state, model, opt, sched, _ = _first_save(tmp_path, True)
    step(model, opt, sched)
    seen: list[str] = []

    def change_all_once_the_second_tensor_is_reached(fqn: str, done: int) -> None:
        if fqn not in seen:
            seen.append(fqn)
            if len(seen) == 2:
                mutate_in_place(model, opt)

    between_chunks(change_all_once_the_second_tensor_is_reached)
    mgr.save(2, state, force=True)
    with pytest.raises(SnapshotInconsistent) as caught:
        mgr.wait()
    names = str(caught.value).split("had them: ", 1)[1].split(". With", 1)[0]
    assert names.startswith(f"{seen[0]}, {seen[1]}, "), names
    assert "more)" in names  # more tensors changed than are named: the first must still be shown
    assert committed_steps(tmp_path) == [1]
    mgr.close()
