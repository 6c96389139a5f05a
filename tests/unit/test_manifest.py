"""manifest.py: pure functions over the run manifest — pointers, retention, (de)serialisation."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_ckpt import manifest as mf
from dist_ckpt.errors import CorruptCheckpoint

NAN = float("nan")


def E(step: int, **metrics: float) -> mf.Entry:
    return mf.Entry(step, epoch=step // 10, metrics=metrics, time=1000.0 + step, size=10 * step, world_size=2)


def build(entries, modes) -> mf.Manifest:
    m = mf.Manifest()
    for e in entries:
        m = mf.with_entry(m, e, modes)
    return m


# -- pointers --------------------------------------------------------------------------------
def test_pointers_last_and_best_min_max_independent():
    entries = [E(0, loss=3.0, pck=0.1), E(5, loss=1.0, pck=0.2), E(7, loss=2.0, pck=0.9), E(9, loss=4.0, pck=0.5)]
    p = mf.compute_pointers(entries, {"loss": "min", "pck": "max"})
    assert p == {"last": 9, "best:loss": 5, "best:pck": 7}


def test_pointers_order_of_entries_does_not_matter():
    entries = [E(9, loss=4.0), E(0, loss=3.0), E(5, loss=1.0)]
    assert mf.compute_pointers(entries, {"loss": "min"}) == {"last": 9, "best:loss": 5}


def test_pointers_tie_goes_to_earlier_step():
    entries = [E(1, loss=2.0), E(2, loss=1.0), E(3, loss=1.0), E(4, loss=1.0)]
    assert mf.compute_pointers(entries, {"loss": "min"})["best:loss"] == 2
    entries = [E(1, acc=0.5), E(2, acc=0.9), E(3, acc=0.9)]
    assert mf.compute_pointers(entries, {"acc": "max"})["best:acc"] == 2


def test_nan_is_never_best():
    entries = [E(1, loss=NAN), E(2, loss=5.0), E(3, loss=NAN), E(4, loss=6.0)]
    assert mf.compute_pointers(entries, {"loss": "min"})["best:loss"] == 2
    assert mf.compute_pointers(entries, {"loss": "max"})["best:loss"] == 4
    only_nan = [E(1, loss=NAN), E(2, loss=NAN)]
    assert "best:loss" not in mf.compute_pointers(only_nan, {"loss": "min"})


def test_metric_never_reported_has_no_pointer_and_empty_has_none():
    assert mf.compute_pointers([E(1, loss=1.0)], {"pck": "max"}) == {"last": 1}
    assert mf.compute_pointers([], {"loss": "min"}) == {}


def test_infinities_order_correctly():
    entries = [E(1, loss=math.inf), E(2, loss=3.0), E(3, loss=-math.inf)]
    assert mf.compute_pointers(entries, {"loss": "min"})["best:loss"] == 3
    assert mf.compute_pointers(entries, {"loss": "max"})["best:loss"] == 1


def test_is_better_strict():
    assert mf.is_better(1.0, None, "min") and mf.is_better(1.0, None, "max")
    assert mf.is_better(1.0, 2.0, "min") and not mf.is_better(2.0, 1.0, "min")
    assert mf.is_better(2.0, 1.0, "max") and not mf.is_better(1.0, 2.0, "max")
    assert not mf.is_better(1.0, 1.0, "min") and not mf.is_better(1.0, 1.0, "max")
    assert not mf.is_better(NAN, None, "min") and not mf.is_better(NAN, 1.0, "max")
    assert mf.is_better(1.0, NAN, "min")


# -- with_entry / without_steps --------------------------------------------------------------
def test_with_entry_sorts_replaces_and_recomputes_pointers():
    modes = {"loss": "min"}
    m = build([E(5, loss=2.0), E(1, loss=3.0)], modes)
    assert m.steps() == [1, 5]
    assert m.pointers == {"last": 5, "best:loss": 5}
    assert m.best_modes == {"loss": "min"}
    m2 = mf.with_entry(m, E(5, loss=9.0), modes)  # same step: replaced, not duplicated
    assert m2.steps() == [1, 5] and m2.entry(5).metrics == {"loss": 9.0}
    assert m2.pointers == {"last": 5, "best:loss": 1}
    assert m.entry(5).metrics == {"loss": 2.0}  # pure: the input is unchanged
    m3 = mf.with_entry(m2, E(3, pck=1.0), {"pck": "max"})  # modes merge
    assert m3.best_modes == {"loss": "min", "pck": "max"}
    assert m3.pointers == {"last": 5, "best:loss": 1, "best:pck": 3}


def test_without_steps_recomputes_pointers():
    modes = {"loss": "min"}
    m = build([E(1, loss=1.0), E(2, loss=2.0), E(3, loss=3.0)], modes)
    m2 = mf.without_steps(m, [1, 3])
    assert m2.steps() == [2]
    assert m2.pointers == {"last": 2, "best:loss": 2}
    assert m2.best_modes == modes
    assert mf.without_steps(m, []).pointers == m.pointers


# -- retention ---------------------------------------------------------------------------------
def test_retention_keeps_last_n():
    m = build([E(s) for s in range(10)], {})
    assert mf.retention_drops(m, keep_last=3) == [0, 1, 2, 3, 4, 5, 6]
    assert mf.retention_drops(m, keep_last=10) == []
    assert mf.retention_drops(m, keep_last=None) == []
    assert mf.retention_drops(mf.Manifest(), keep_last=1) == []


def test_retention_keeps_pointed_to_steps():
    modes = {"loss": "min", "pck": "max"}
    m = build(
        [E(0, loss=0.5, pck=0.1), E(1, loss=1.0, pck=0.99), E(2, loss=2.0), E(3, loss=3.0), E(4, loss=4.0)], modes
    )
    assert m.pointers == {"last": 4, "best:loss": 0, "best:pck": 1}
    assert mf.retention_drops(m, keep_last=2) == [2]


def test_retention_keeps_every_kth_step():
    m = build([E(s) for s in range(0, 21)], {})
    drops = mf.retention_drops(m, keep_last=2, keep_every_n_steps=5)
    assert sorted(set(range(21)) - set(drops)) == [0, 5, 10, 15, 19, 20]


def test_retention_never_drops_newest_even_with_degenerate_keep_last():
    m = build([E(s) for s in range(4)], {})
    assert 3 not in mf.retention_drops(m, keep_last=0)
    assert mf.retention_drops(m, keep_last=0) == [0, 1, 2]


def test_retention_drops_old_best_once_superseded():
    modes = {"loss": "min"}
    m = build([E(0, loss=5.0), E(1, loss=6.0), E(2, loss=7.0), E(3, loss=1.0)], modes)
    assert mf.retention_drops(m, keep_last=1) == [0, 1, 2]


# -- (de)serialisation -------------------------------------------------------------------------
def test_dumps_loads_round_trip():
    modes = {"loss": "min", "acc": "max"}
    m = build([E(0, loss=NAN, acc=math.inf), E(3, loss=1.5, acc=-math.inf), E(7, loss=2.5)], modes)
    m = mf.Manifest(m.entries, m.pointers, m.best_modes, tracker_run_id="wandb-xyz", config_hash="abcd")
    data = mf.dumps(m)
    json.loads(data)  # strict JSON: no NaN/Infinity literals
    assert b"NaN" not in data and b"Infinity" not in data
    back = mf.loads(data)
    assert back.steps() == [0, 3, 7]
    assert back.pointers == m.pointers == {"last": 7, "best:loss": 3, "best:acc": 0}
    assert back.best_modes == modes
    assert back.tracker_run_id == "wandb-xyz" and back.config_hash == "abcd"
    assert math.isnan(back.entry(0).metrics["loss"]) and back.entry(0).metrics["acc"] == math.inf
    assert back.entry(3).metrics["acc"] == -math.inf
    e = back.entry(7)
    assert (e.epoch, e.time, e.size, e.world_size, e.codec) == (0, 1007.0, 70, 2, "none")
    assert mf.dumps(back) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"\xff\xfe garbage",
        b"[]",
        b"null",
        b'{"format": "something/else", "checkpoints": []}',
        b'{"format": "dist_ckpt.manifest/1"}',
        b'{"format": "dist_ckpt.manifest/1", "checkpoints": null}',
        b'{"format": "dist_ckpt.manifest/1", "checkpoints": [1]}',
        b'{"format": "dist_ckpt.manifest/1", "checkpoints": [{"step": "x"}]}',
        b'{"format": "dist_ckpt.manifest/1", "checkpoints": [{"step": 1, "metrics": {"l": "abc"}}]}',
        b'{"format": "dist_ckpt.manifest/1", "checkpoints": [], "pointers": {"last": null}}',
    ],
)
def test_loads_garbage_is_corrupt(data):
    with pytest.raises(CorruptCheckpoint, match="manifest.json"):
        mf.loads(data)


def test_loads_truncated_is_corrupt_and_names_where():
    data = mf.dumps(build([E(s, loss=float(s)) for s in range(5)], {"loss": "min"}))
    for cut in (1, len(data) // 3, len(data) // 2, len(data) - 2):
        with pytest.raises(CorruptCheckpoint, match="s3://b/run/manifest.json"):
            mf.loads(data[:cut], "s3://b/run/manifest.json")


def test_loads_dangling_pointer_is_corrupt():
    m = build([E(1, loss=1.0), E(2, loss=2.0)], {"loss": "min"})
    doc = json.loads(mf.dumps(m))
    doc["checkpoints"] = [c for c in doc["checkpoints"] if c["step"] != 1]  # best:loss now dangles
    with pytest.raises(CorruptCheckpoint, match="best:loss"):
        mf.loads(json.dumps(doc).encode())


def test_rebuild_from_entries():
    m = mf.rebuild([E(4, loss=2.0), E(1, loss=1.0)], {"loss": "min"}, "run-1", "h")
    assert m.steps() == [1, 4]
    assert m.pointers == {"last": 4, "best:loss": 1}
    assert (m.tracker_run_id, m.config_hash) == ("run-1", "h")


# -- property: retention never loses the newest, a pointed-to, or the best checkpoint ----------
_metric = st.one_of(
    st.none(),  # not reported this time
    st.just(NAN),
    st.floats(min_value=-3, max_value=3, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 1)),
)


def _brute_force_pointers(history: list[mf.Entry], modes: dict[str, str]) -> dict[str, int]:
    """Pointers over every step ever saved, by definition: the earliest step holding the best
    non-NaN value (min or max) of each metric; last = the highest step."""
    out = {"last": max(e.step for e in history)}
    for metric, mode in modes.items():
        values = [
            (e.step, e.metrics[metric]) for e in history if metric in e.metrics and not math.isnan(e.metrics[metric])
        ]
        if not values:
            continue
        best = min(v for _, v in values) if mode == "min" else max(v for _, v in values)
        out["best:" + metric] = min(s for s, v in values if v == best)
    return out


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=40),
    metrics=st.lists(st.tuples(_metric, _metric), min_size=40, max_size=40),
    keep_last=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
    keep_every=st.one_of(st.none(), st.integers(min_value=2, max_value=10)),
    modes=st.fixed_dictionaries({"loss": st.sampled_from(["min", "max"]), "pck": st.sampled_from(["min", "max"])}),
)
def test_property_retention_never_loses_newest_pointed_or_best(gaps, metrics, keep_last, keep_every, modes):
    manifest = mf.Manifest()
    history: list[mf.Entry] = []
    on_disk: set[int] = set()
    step = -1
    for gap, (loss, pck) in zip(gaps, metrics):
        step += gap
        reported = {k: v for k, v in (("loss", loss), ("pck", pck)) if v is not None}
        entry = mf.Entry(step, metrics=reported)
        history.append(entry)
        on_disk.add(step)
        # the manager's loop: add the entry, decide drops, write the manifest, then delete
        new = mf.with_entry(manifest, entry, modes)
        drops = mf.retention_drops(new, keep_last, keep_every)
        manifest = mf.without_steps(new, drops)
        assert step not in drops, "the newest checkpoint was dropped"
        assert not set(drops) & set(new.pointers.values()), "a pointed-to checkpoint was dropped"
        assert set(drops) <= on_disk
        on_disk -= set(drops)
        assert set(manifest.steps()) == on_disk
        # pointers over what survives == pointers over all history: the best is never lost
        assert manifest.pointers == _brute_force_pointers(history, modes)
        assert set(manifest.pointers.values()) <= on_disk
        if keep_last is not None:
            newest = sorted(e.step for e in history)[-keep_last:]
            assert set(newest) <= on_disk
            extra = on_disk - set(newest) - set(manifest.pointers.values())
            if keep_every:
                assert all(s % keep_every == 0 for s in extra)
                assert {e.step for e in history if e.step % keep_every == 0} <= on_disk
            else:
                assert not extra, "retention kept more than last N + pointed-to"
        else:
            assert on_disk == {e.step for e in history}
    # and the manifest survives serialisation unchanged
    assert mf.loads(mf.dumps(manifest)).pointers == manifest.pointers
