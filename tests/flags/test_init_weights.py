"""--init-from weights that do not fit, or a Hugging Face folder that names files outside
itself: a clear error naming the file and keys, raised before any model is modified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dist_ckpt.errors import ConfigError, CorruptCheckpoint, IncompatibleCheckpoint
from dist_ckpt.init_weights import find_weight_files, load_weight_files


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"generator": nn.Linear(4, 3), "discriminator": nn.Linear(3, 1)}


def _state(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in models.items() for k, v in m.state_dict().items()}


def test_several_models_take_their_prefixed_keys(tmp_path: Path) -> None:
    weights = {
        f"{n}.{k}": torch.full_like(v, i + 1.0)
        for i, (n, m) in enumerate(_models().items())
        for k, v in m.state_dict().items()
    }
    save_file(weights, str(tmp_path / "w.safetensors"))
    models = _models()
    load_weight_files(find_weight_files(str(tmp_path / "w.safetensors")), models)  # type: ignore[arg-type]
    assert all(torch.equal(v, weights[k]) for k, v in _state(models).items())


@pytest.mark.parametrize(
    "change, error, fragments",
    [
        (lambda w: w.pop("discriminator.bias"), IncompatibleCheckpoint, ["'discriminator'", "discriminator.bias"]),
        (
            lambda w: w.update({"optimizer.state": torch.zeros(2)}),
            IncompatibleCheckpoint,
            ["optimizer.state", "no tracked model"],
        ),
        (
            lambda w: w.update({"generator.weight": torch.zeros(5, 4)}),
            IncompatibleCheckpoint,
            ["generator.weight", "(5, 4)", "(3, 4)"],
        ),
    ],
    ids=["missing-key", "unexpected-key", "wrong-shape"],
)
def test_weights_that_do_not_fit_change_nothing(tmp_path: Path, change, error, fragments) -> None:  # type: ignore[no-untyped-def]
    weights = {k: torch.ones_like(v) for k, v in _state(_models()).items()}
    change(weights)
    save_file(weights, str(tmp_path / "w.safetensors"))
    models = _models()
    before = _state(models)
    with pytest.raises(error) as info:
        load_weight_files(find_weight_files(str(tmp_path / "w.safetensors")), models)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(tmp_path / "w.safetensors") in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in _state(models).items())


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_an_index_naming_files_outside_the_folder_is_refused(tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"weight": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"weight": shard}}))
    with pytest.raises(CorruptCheckpoint, match="not a plain file name"):
        find_weight_files(str(folder))


def test_a_hugging_face_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model.safetensors"):
        find_weight_files(str(tmp_path))


def test_each_tracked_model_takes_its_own_weights_from_a_checkpoint(tmp_path: Path) -> None:
    import argparse

    from dist_ckpt import CheckpointManager

    trained = _models()
    for m in trained.values():
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
    opts = {n: torch.optim.Adam(m.parameters()) for n, m in trained.items()}
    with CheckpointManager(str(tmp_path / "gan")) as mgr:
        mgr.save(7, mgr.track(**trained, opt_g=opts["generator"], opt_d=opts["discriminator"]), force=True)
    fresh = _models()
    opt = torch.optim.Adam(fresh["generator"].parameters())
    args = argparse.Namespace(
        ckpt=str(tmp_path / "new"),
        resume=None,
        init_from=str(tmp_path / "gan" / "step_000000007"),
        list_checkpoints=False,
    )
    with CheckpointManager(str(tmp_path / "new")) as mgr:
        assert mgr.start(mgr.track(**fresh, opt_g=opt), args) is None
    assert all(torch.equal(v, _state(trained)[k]) for k, v in _state(fresh).items())
    assert not opt.state
