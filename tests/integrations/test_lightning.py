"""DistCkptIO and DistCkptModelCheckpoint in one process (fast; the 2-process DDP kill-and-
resume tests are in test_lightning_ddp.py): top-k retention and pointers, exact resume from
``ckpt_path="last"``, ``last`` while a save is in flight, unsupported values, the stored form."""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning_common import Regressor, final_state, loader
from support.faulty_backend import FaultyBackend, Rule

from dist_ckpt.errors import CheckpointNotFound, ConfigError, UnsupportedValue
from dist_ckpt.integrations.lightning import DistCkptIO, DistCkptModelCheckpoint
from dist_ckpt.integrations.lightning_run import committed_names
from dist_ckpt.run_store import RunStore
from dist_ckpt.verify import verify_run
from storage_backends import open_backend

STEPS_PER_EPOCH = 4  # 32 samples, batch 8, one process


def _trainer(epochs: int, callback: L.Callback | None, io: DistCkptIO | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        plugins=[io or DistCkptIO()],
        callbacks=[callback] if callback else [],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=callback is not None,
    )


def _fit(
    run: Path, epochs: int, scores: list[float], top_k: int = 2
) -> tuple[DistCkptModelCheckpoint, Regressor, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = Regressor(scores=scores)
    cb = DistCkptModelCheckpoint(dirpath=run, save_last=True, save_top_k=top_k, monitor="score", every_n_epochs=1)
    trainer = _trainer(epochs, cb)
    trainer.fit(model, loader(32, shuffle=False), loader(32, shuffle=False), ckpt_path="last")
    return cb, model, trainer


def test_top_k_retention_keeps_the_best_and_last_as_manifest_pointers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    scores = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 0.5]
    cb, _, _ = _fit(run, 5, scores)
    backend = open_backend(str(run))
    manifest, _ = RunStore(backend).read_manifest()
    assert manifest is not None
    # top-2 by score: epochs 3 (1.0) and 4 (2.0); Lightning 2.6 saves `last` only at steps it
    # saves a top-k checkpoint, so `last` is epoch 4's step: a pointer, not another copy
    step = lambda epoch: STEPS_PER_EPOCH * (epoch + 1)  # noqa: E731
    assert committed_names(backend) == {step(3): "epoch=3-step=16.ckpt", step(4): "epoch=4-step=20.ckpt"}
    assert manifest.pointers == {"last": step(4), "best:score": step(3)}
    assert sorted(os.listdir(run)) == ["manifest.json", "step_000000016", "step_000000020"]
    assert not any(p.is_symlink() for p in run.rglob("*"))
    assert set(cb.best_k_models) == {str(run / "epoch=3-step=16.ckpt"), str(run / "epoch=4-step=20.ckpt")}
    assert cb.best_model_path == str(run / "epoch=3-step=16.ckpt") and cb.last_model_path == str(run / "last.ckpt")
    assert DistCkptIO().load_checkpoint(cb.best_model_path)["global_step"] == step(3)
    assert verify_run(backend).ok

    # resumed from last (epoch 4) for two more epochs: epoch 5 (6.0) is not saved, epoch 6
    # (0.5) enters the top 2 and epoch 4 leaves it, once `last` no longer names it
    cb, _, _ = _fit(run, 7, scores)
    manifest, _ = RunStore(backend).read_manifest()
    assert committed_names(backend) == {step(3): "epoch=3-step=16.ckpt", step(6): "epoch=6-step=28.ckpt"}
    assert manifest is not None and manifest.pointers == {"last": step(6), "best:score": step(6)}
    assert cb.best_model_path == str(run / "epoch=6-step=28.ckpt")
    assert verify_run(backend).ok


@pytest.mark.slow  # ~10 s; the DDP kill-and-resume tests cover exactness too
def test_fit_resumed_from_last_is_bit_identical(tmp_path: Path) -> None:
    scores = [3.0, 2.0, 1.0, 0.5]
    _, model_a, trainer_a = _fit(tmp_path / "a", 4, scores)
    _fit(tmp_path / "b", 2, scores)
    _, model_b, trainer_b = _fit(tmp_path / "b", 4, scores)  # ckpt_path="last": continues at epoch 2
    a, b = final_state(model_a, trainer_a.optimizers[0]), final_state(model_b, trainer_b.optimizers[0])
    assert sorted(a) == sorted(b) and any(k.endswith("exp_avg") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _lightning_like(step: int) -> dict[str, Any]:
    return {
        "epoch": 0,
        "global_step": step,
        "state_dict": OrderedDict([("net.weight", torch.full((4, 3), float(step))), ("net.bias", torch.arange(4.0))]),
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 3)}},
                "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
            }
        ],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'x'}": {
                "best_k_models": {"/r/a.ckpt": torch.tensor(1.5)},
                "kth_value": torch.tensor(float("inf")),
                "dirpath": "/r",
            }
        },
        "hyper_parameters": {"width": 32, "scores": None, "ratio": float("nan")},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1, "completed": 1}}}},
    }


def test_stored_form_round_trips_and_last_never_names_an_uncommitted_save(tmp_path: Path) -> None:
    run = tmp_path / "run"
    release, blocked = threading.Event(), threading.Event()

    def hold(op: str, key: str) -> None:  # the second save stops right before its COMMITTED marker
        blocked.set()
        assert release.wait(60)

    rule = Rule("create_if_absent", "*/COMMITTED", "call", nth=2, hook=hold)
    writer_io = DistCkptIO(async_save=True, backend_factory=lambda root: FaultyBackend(open_backend(root), [rule]))
    reader_io = DistCkptIO()
    with pytest.raises(CheckpointNotFound, match="no committed checkpoint yet"):
        reader_io.load_checkpoint(run / "last.ckpt")
    writer_io.save_checkpoint(_lightning_like(10), run / "epoch=0-step=10.ckpt")
    writer_io.save_checkpoint(_lightning_like(20), run / "epoch=1-step=20.ckpt")  # returns; held in the background
    try:
        assert blocked.wait(60)
        loaded = reader_io.load_checkpoint(run / "last.ckpt")
        assert loaded["global_step"] == 10  # the save in flight is not `last`
        manifest, _ = RunStore(open_backend(str(run))).read_manifest()
        assert manifest is not None and manifest.pointers["last"] == 10
    finally:
        release.set()
        writer_io.teardown()
    loaded = reader_io.load_checkpoint(run / "last.ckpt")
    expected = _lightning_like(20)
    assert loaded["global_step"] == 20 and loaded["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(loaded["optimizer_states"][0]["state"]) == [0]  # int keys stay ints
    assert math.isnan(loaded["hyper_parameters"]["ratio"])
    assert list(loaded["state_dict"]) == ["net.weight", "net.bias"]
    for k, v in expected["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v)
    ck = loaded["callbacks"]["ModelCheckpoint{'monitor': 'x'}"]
    assert torch.equal(ck["best_k_models"]["/r/a.ckpt"], torch.tensor(1.5)) and ck["kth_value"].item() == float("inf")
    assert reader_io.load_checkpoint(run / "epoch=0-step=10.ckpt")["global_step"] == 10
    assert reader_io.load_checkpoint(run / "step_000000020")["global_step"] == 20
    with pytest.raises(CheckpointNotFound, match="epoch=0-step=10.ckpt, epoch=1-step=20.ckpt"):
        reader_io.load_checkpoint(run / "nope.ckpt")

    # a save under a `last` name at a new step is kept while `last` names it, and deleted once a
    # newer step is committed; one at a step already saved writes nothing
    io = DistCkptIO(async_save=False)
    io.save_checkpoint(_lightning_like(30), run / "last.ckpt")
    io.save_checkpoint(_lightning_like(30), run / "last.ckpt")
    assert committed_names(open_backend(str(run))) == {10: "epoch=0-step=10.ckpt", 20: "epoch=1-step=20.ckpt", 30: None}
    io.save_checkpoint(_lightning_like(40), run / "epoch=3-step=40.ckpt")
    io.remove_checkpoint(run / "epoch=0-step=10.ckpt")
    io.teardown()
    assert committed_names(open_backend(str(run))) == {20: "epoch=1-step=20.ckpt", 40: "epoch=3-step=40.ckpt"}
    assert verify_run(open_backend(str(run))).ok


class _BadExtra(Regressor):
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["extras"] = {"loss_fn": torch.nn.MSELoss()}


def test_unsupported_value_is_refused_naming_its_key_and_nothing_is_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cb = DistCkptModelCheckpoint(dirpath=run, save_last=True, save_top_k=1, monitor="val_loss")
    L.seed_everything(0, verbose=False)
    with pytest.raises(UnsupportedValue, match=r"extras\.loss_fn.*torch\.nn\.modules\.loss\.MSELoss"):
        _trainer(2, cb).fit(_BadExtra(), loader(shuffle=False), loader(shuffle=False))
    assert not any(p.name.startswith("step_") for p in run.iterdir()) if run.exists() else True


def test_model_checkpoint_without_the_plugin_is_refused(tmp_path: Path) -> None:
    cb = DistCkptModelCheckpoint(dirpath=tmp_path / "run", save_top_k=1, monitor="val_loss")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ConfigError, match=r"Trainer\(plugins=\[DistCkptIO"):
        trainer.fit(Regressor(), loader(shuffle=False), loader(shuffle=False))
    assert not (tmp_path / "run").exists()


_KILLED_BETWEEN_COMMIT_AND_DELETE = """
import sys, torch
sys.path.insert(0, {tests!r})
from support.faulty_backend import FaultyBackend, Rule
from storage_backends import open_backend
from dist_ckpt.integrations.lightning import DistCkptIO, SaveOptions
# the process dies (os._exit) at the manifest update of its second save (the 3rd: the first
# writes the new run's manifest at start), after that save's COMMITTED
rule = Rule("compare_and_swap", "manifest.json", "exit", nth=3)
io = DistCkptIO(async_save=False, backend_factory=lambda root: FaultyBackend(open_backend(root), [rule]))
state = lambda step: {{"global_step": step, "state_dict": {{"w": torch.full((3,), float(step))}}}}
io.save_checkpoint(state(10), {run!r} + "/a.ckpt", SaveOptions(metrics={{"loss": 2.0}}, best_modes={{"loss": "min"}}))
io.save_checkpoint(state(20), {run!r} + "/b.ckpt", SaveOptions(metrics={{"loss": 1.0}}, best_modes={{"loss": "min"}},
                                                               retires=("a.ckpt",)))
"""


def test_top_k_drop_survives_a_kill_between_the_commit_and_the_delete(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = tmp_path / "run"
    script = _KILLED_BETWEEN_COMMIT_AND_DELETE.format(tests=str(Path(__file__).parents[1]), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, timeout=120)
    assert proc.returncode == 137, proc.stderr.decode()[-3000:]
    assert committed_names(open_backend(str(run))) == {10: "a.ckpt", 20: "b.ckpt"}  # step 10 left behind
    io = DistCkptIO(async_save=False)
    io.save_checkpoint(
        {"global_step": 30, "state_dict": {"w": torch.zeros(3)}}, run / "c.ckpt"
    )  # the next job's first save
    io.teardown()
    assert committed_names(open_backend(str(run))) == {20: "b.ckpt", 30: "c.ckpt"}  # b's commit retired a: gone
    manifest, _ = RunStore(open_backend(str(run))).read_manifest()
    assert manifest is not None and manifest.pointers == {"last": 30, "best:loss": 20}
    assert verify_run(open_backend(str(run))).ok
