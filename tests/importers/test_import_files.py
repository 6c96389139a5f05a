"""Import of a ``torch.save`` state dict and of Hugging Face safetensors folders (issue 18, item 3),
and the errors bad input gets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from import_support import assert_bit_identical, minilm_folder
from safetensors.torch import load_file

import dist_ckpt
from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointNotFound, ConfigError, CorruptCheckpoint


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))


def test_torch_save_state_dict_imports_and_restores_bit_identical(tmp_path: Path) -> None:
    src = _model(0)
    src(torch.randn(4, 6))  # BatchNorm running stats and num_batches_tracked (int64) move
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / "model.pt"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)

    with pytest.raises(ConfigError, match=r"model.pt: expected a model state dict .* 'epoch' \(int\).*--key"):
        dist_ckpt.import_checkpoint(str(path), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    result = dist_ckpt.import_checkpoint(str(path), str(tmp_path / "run"), key="model", step=7)
    assert (result.format, result.objects, result.tensors) == ("torch", {"model": "model"}, len(ref))

    restored = _model(1)
    opt = torch.optim.SGD(restored.parameters(), lr=0.1)
    with CheckpointManager(str(tmp_path / "run"), read_only=True) as mgr:
        assert mgr.restore(mgr.track(model=restored)).step == 7
        fresh = _model(2)
        assert int(mgr.load_weights(fresh)) == 7
    assert_bit_identical(restored.state_dict(), ref)
    assert_bit_identical(fresh.state_dict(), ref)
    del opt


def test_torch_save_file_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    sentinel = tmp_path / "sentinel"
    torch.save({"w": torch.zeros(2), "x": _Touch(sentinel)}, path)
    with pytest.raises(CorruptCheckpoint, match="evil.pt: refused or unreadable by torch.load\\(weights_only=True\\)"):
        dist_ckpt.import_checkpoint(str(path), str(tmp_path / "run"))
    assert not sentinel.exists() and not (tmp_path / "run").exists()


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def test_hugging_face_minilm_folder_imports_and_loads_bit_identical(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = minilm_folder()
    ref = load_file(str(folder / "model.safetensors"))
    result = dist_ckpt.import_checkpoint(str(folder), str(tmp_path / "run"), compression="zstd")
    assert (result.format, result.step, result.tensors) == ("hf", 0, len(ref))
    from dist_ckpt.cli import main

    # and back out: dist-ckpt export gives the Hugging Face file it came from, tensor for tensor
    assert main(["export", result.uri, str(tmp_path / "exported")]) == 0
    assert_bit_identical(load_file(str(tmp_path / "exported" / "model.safetensors")), ref)
    model = BertModel(BertConfig.from_pretrained(str(folder)))
    with CheckpointManager(str(tmp_path / "run"), read_only=True) as mgr:
        loaded = mgr.load_weights(model, strict=False)
    # the file keeps the legacy position_ids buffer, which BertModel no longer saves
    assert loaded.unexpected_keys == ("embeddings.position_ids",) and loaded.missing_keys == ()
    assert_bit_identical(model.state_dict(), {k: v for k, v in ref.items() if k != "embeddings.position_ids"})


def test_sharded_hugging_face_folder_with_index_imports_and_restores(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    src = BertModel(config)
    src.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1  # really sharded
    dist_ckpt.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"), step=2)
    torch.manual_seed(1)
    dst = BertModel(config)
    with CheckpointManager(str(tmp_path / "run"), read_only=True) as mgr:
        assert mgr.restore(mgr.track(model=dst)).step == 2
    assert_bit_identical(dst.state_dict(), src.state_dict())


def test_bad_input_gets_errors_naming_the_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(CheckpointNotFound, match=f"{tmp_path}/missing: no such file or folder"):
        dist_ckpt.import_checkpoint(str(tmp_path / "missing"), str(run))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=f"{tmp_path}/notes.txt: unknown format"):
        dist_ckpt.import_checkpoint(str(tmp_path / "notes.txt"), str(run))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "weights.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match=f"{tmp_path}/folder: not a checkpoint import knows.*weights.npz"):
        dist_ckpt.import_checkpoint(str(tmp_path / "folder"), str(run))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"{tmp_path}/hf has a config.json but no weights"):
        dist_ckpt.import_checkpoint(str(tmp_path / "hf"), str(run))
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CorruptCheckpoint, match="garbage.pt: refused or unreadable"):
        dist_ckpt.import_checkpoint(str(tmp_path / "garbage.pt"), str(run))
    assert not run.exists()


def test_cli_import_and_its_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dist_ckpt.cli import main  # in process (the subprocess path is covered by the gadget test)

    src = _model(0)
    torch.save(src.state_dict(), tmp_path / "w.pth")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        code = main(["import", *args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    ok = cli(str(tmp_path / "w.pth"), str(tmp_path / "run"), "--step", "5")
    assert ok.returncode == 0, ok.stderr
    assert f"-> {tmp_path}/run/step_000000005" in ok.stdout
    again = cli(str(tmp_path / "w.pth"), str(tmp_path / "run"), "--step", "5")
    assert again.returncode == 6 and "step_000000005 is already committed" in again.stderr
    behind = cli(str(tmp_path / "w.pth"), str(tmp_path / "run"), "--step", "4")
    assert behind.returncode == 2 and "step 4 is behind the run's last checkpoint (step 5)" in behind.stderr
    missing = cli(str(tmp_path / "nope"), str(tmp_path / "run2"))
    assert missing.returncode == 3 and f"{tmp_path}/nope: no such file or folder" in missing.stderr
    fresh = _model(1)
    with CheckpointManager(str(tmp_path / "run"), read_only=True) as mgr:
        assert int(mgr.load_weights(fresh)) == 5
    assert_bit_identical(fresh.state_dict(), src.state_dict())


def test_import_into_an_s3_run_and_restore_from_it(tmp_path: Path, s3_uri: str) -> None:
    src = _model(0)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    result = dist_ckpt.import_checkpoint(str(tmp_path / "w.pt"), s3_uri, step=3)
    assert result.uri == f"{s3_uri}/step_000000003"
    restored = _model(1)
    with CheckpointManager(s3_uri, read_only=True) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [3]
        assert mgr.restore(mgr.track(model=restored)).step == 3
    assert_bit_identical(restored.state_dict(), src.state_dict())
