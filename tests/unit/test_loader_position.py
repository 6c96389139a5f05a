"""Tracked data loaders in one process: every kind of sampler resumes mid-epoch (and right at an
epoch's end) with the same batches and the same global RNG as an uninterrupted run; tracking
changes nothing in a run that is not resumed; the arithmetic of continuing an epoch at another
world size; bad input. The multi-rank, SIGKILL and worker cases are in
tests/distributed/test_loader_resume.py."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from dist_ckpt import CheckpointManager
from dist_ckpt.data_position import spread_batches, step_sizes
from dist_ckpt.errors import ConfigError

N, EPOCHS = 22, 3


class Ids(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        return i


LOADERS: dict[str, Callable[[], DataLoader]] = {
    "shuffle": lambda: DataLoader(Ids(), batch_size=4, shuffle=True),
    "shuffle-generator": lambda: DataLoader(
        Ids(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
    ),
    "subset-random": lambda: DataLoader(Ids(), batch_size=3, sampler=SubsetRandomSampler(range(2, 20))),
    "weighted": lambda: DataLoader(
        Ids(),
        batch_size=4,
        sampler=WeightedRandomSampler(torch.rand(N, generator=torch.Generator().manual_seed(1)), 15),
    ),
    "with-replacement": lambda: DataLoader(
        Ids(), batch_size=5, sampler=RandomSampler(Ids(), replacement=True, num_samples=40)
    ),
    "batch-sampler": lambda: DataLoader(Ids(), batch_sampler=BatchSampler(RandomSampler(Ids()), 4, drop_last=True)),
    "sequential": lambda: DataLoader(Ids(), batch_size=4),
}


class Crash(Exception):
    pass


def _train(
    root: Path, make_loader: Callable[[], DataLoader], *, crash_at: int | None = None, track: bool = True
) -> dict[int, tuple]:
    """A script's life: seed, build, restore, loop over epochs; returns per step (batch, the
    step's random number, a hash of the global RNG state at the step's start)."""
    torch.manual_seed(11)
    loader = make_loader()
    counters = {"n": 0}
    mgr = CheckpointManager(str(root), save_every_n_steps=1)
    state = mgr.track(counters=counters, **({"loader": loader} if track else {}))
    resume = mgr.restore(state)
    step = resume.step + 1 if resume else 0
    seen: dict[int, tuple] = {}
    try:
        for epoch in range(resume.epoch if resume else 0, EPOCHS):
            for batch in loader:
                rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:12]
                seen[step] = (batch.tolist(), torch.rand(1).item(), rng)
                mgr.save(step, state, epoch=epoch)
                if step == crash_at:
                    raise Crash
                step += 1
    finally:
        mgr.close()
    return seen


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_resume_mid_epoch_and_at_epoch_end_is_identical(kind: str, tmp_path: Path) -> None:
    make = LOADERS[kind]
    whole = _train(tmp_path / "whole", make)
    per_epoch = len(make())
    assert len(whole) == EPOCHS * per_epoch
    for crash in (per_epoch + 1, 2 * per_epoch - 1):  # mid-epoch 1; its last batch
        root = tmp_path / f"crash{crash}"
        with pytest.raises(Crash):
            _train(root, make, crash_at=crash)
        resumed = _train(root, make)
        assert min(resumed) == crash + 1
        for step in resumed:
            assert resumed[step] == whole[step], f"{kind}: crash at {crash}, step {step}"


def test_tracking_changes_nothing_in_a_run_that_is_not_resumed(tmp_path: Path) -> None:
    for kind, make in LOADERS.items():
        assert _train(tmp_path / f"t-{kind}", make) == _train(tmp_path / f"u-{kind}", make, track=False), kind


def test_the_saved_position_is_json_per_rank(tmp_path: Path) -> None:
    loader = DataLoader(Ids(), batch_size=4, shuffle=True)
    mgr = CheckpointManager(str(tmp_path))
    state = mgr.track(loader=loader)
    it = iter(loader)
    next(it), next(it)
    (value,) = state.state_dict()["loader"].values()
    doc = json.loads(value)
    assert (doc["yielded"], doc["epoch"], doc["finished"], doc["rank"], doc["world"]) == (2, None, False, 0, 1)
    assert set(doc["start"]) == {"global"} and doc["base_source"] == "global"
    assert list(state.state_dict()["loader"]) == ["rank_0"]
    mgr.close()


def test_an_iterable_dataset_is_refused_by_name(tmp_path: Path) -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(ConfigError, match=r"track\(train=\.\.\.\).*iterable-style.*StatefulDataLoader"):
        mgr.track(train=DataLoader(Stream(), batch_size=2))
    mgr.close()


@pytest.mark.parametrize("remaining", [0, 1, 2, 5, 11, 12, 13, 23, 24, 25, 47])
@pytest.mark.parametrize(("world", "batch"), [(1, 4), (3, 4), (4, 1), (3, 2), (2, 5)])
def test_the_rest_of_an_epoch_is_spread_once_over_equal_step_counts(remaining: int, world: int, batch: int) -> None:
    rest = list(range(100, 100 + remaining))
    per_rank = [spread_batches(rest, world, r, batch) for r in range(world)]
    sizes = step_sizes(remaining, world, batch)
    assert sum(sizes) == remaining
    assert all(len(batches) == len(sizes) for batches, _ in per_rank), "every rank takes every step"
    assert all(1 <= len(b) <= batch for batches, _ in per_rank for b in batches)
    trained = Counter(i for batches, _ in per_rank for b in batches for i in b)
    repeated = any(rep for _, rep in per_rank)
    assert set(trained) == set(rest)
    if not repeated:
        assert all(c == 1 for c in trained.values())
    else:  # only when a step has fewer samples than ranks
        assert any(0 < s < world for s in sizes)
    # in the global order: step j trains the next sizes[j] samples of `rest`
    pos = 0
    for j, size in enumerate(sizes):
        step_ids = {i for r in range(world) for i in per_rank[r][0][j]}
        assert step_ids == set(rest[pos : pos + size])
        pos += size


def _ranks(world: int, records: dict[str, str] | None, epoch: int) -> list:
    """One DataLoader + DistributedSampler + LoaderPosition per rank of ``world`` (no process
    group needed: the sampler is told its rank), loaded from ``records`` if given."""
    from torch.utils.data import DistributedSampler

    from dist_ckpt.loader_tracking import LoaderPosition

    out = []
    for rank in range(world):
        sampler = DistributedSampler(Ids(), num_replicas=world, rank=rank, seed=9)
        loader = DataLoader(Ids(), batch_size=3, sampler=sampler)
        position = LoaderPosition(loader, "loader", rank, world)
        if records is not None:
            position.load_state_dict(records)
        sampler.set_epoch(epoch)
        out.append((iter(loader), position))
    return out


def _take(ranks: list, steps: int | None) -> list[int]:
    """``steps`` lockstep batches on every rank (None: to the end; ranks must end together)."""
    seen: list[int] = []
    while steps is None or steps > 0:
        batches = [next(it, None) for it, _ in ranks]
        if steps is None and all(b is None for b in batches):
            return seen
        assert all(b is not None for b in batches), "every rank takes the same number of steps"
        seen += [i for b in batches for i in b.tolist()]
        steps = None if steps is None else steps - 1
    return seen


def _records(ranks: list) -> dict[str, str]:
    return {k: v for _, position in ranks for k, v in position.state_dict().items()}


@pytest.mark.parametrize(
    "worlds", [[(2, 2), (3, 1), (1, None)], [(2, 1), (3, 1), (3, 1), (2, None)], [(2, 4), (3, None)]]
)
def test_an_epoch_goes_on_across_world_size_changes(worlds: list[tuple[int, int | None]]) -> None:
    """E.g. 2 ranks take 2 steps of epoch 4, 3 ranks 1 step, 1 rank the rest (a resume at the
    same world size in between replays the continued pass): every sample of the epoch exactly
    once (22 samples: the 2-rank order has no padding); the next epoch is the plain sampler's."""
    records, trained, ranks = None, [], []
    for world, steps in worlds:
        ranks = _ranks(world, records, 4)
        trained += _take(ranks, steps)
        records = _records(ranks)
    assert Counter(trained) == Counter(range(N))
    for _, position in ranks:
        sampler = position.loader.sampler
        sampler.set_epoch(5)
        assert [i for b in position.loader for i in b.tolist()] == list(sampler)


@pytest.mark.parametrize("damage", ["not json", '{"format": 1}', "state", "count"])
def test_a_damaged_position_is_refused_by_key_before_any_generator_is_set(damage: str, tmp_path: Path) -> None:
    from dist_ckpt.errors import CorruptCheckpoint
    from dist_ckpt.loader_tracking import LoaderPosition

    loader = DataLoader(Ids(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    position = LoaderPosition(loader, "train", 0, 1)
    next(iter(loader))
    doc = json.loads(position.state_dict()["rank_0"])
    if damage == "state":
        doc["current"]["loader"] = doc["current"]["loader"][:-8]
    elif damage == "count":
        doc["yielded"] = "3"
    text = damage if damage in ("not json", '{"format": 1}') else json.dumps(doc)
    before = loader.generator.get_state()
    with pytest.raises(CorruptCheckpoint, match=r"train\.rank_0"):
        position.load_state_dict({"rank_0": text})
    assert torch.equal(loader.generator.get_state(), before)


class Logged(Ids):
    def __init__(self) -> None:
        self.loaded: list[int] = []

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


def test_skipped_batches_are_never_loaded(tmp_path: Path) -> None:
    torch.manual_seed(11)
    loader = DataLoader(Logged(), batch_size=4, shuffle=True)
    mgr = CheckpointManager(str(tmp_path))
    state = mgr.track(loader=loader)
    it = iter(loader)
    done = [next(it).tolist() for _ in range(3)]
    mgr.save(0, state, epoch=0)
    rest = [b.tolist() for b in it]
    mgr.close()

    torch.manual_seed(99)  # a new process: the restore puts the RNG back
    dataset = Logged()
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    mgr = CheckpointManager(str(tmp_path))
    state = mgr.track(loader=loader)
    mgr.restore(state)
    assert [b.tolist() for b in loader] == rest
    assert sorted(dataset.loaded) == sorted(i for b in rest for i in b), "only the remaining samples were loaded"
    assert not set(dataset.loaded) & {i for b in done for i in b}
    mgr.close()
