"""`dist-ckpt export RUN --which W OUT [--config FILE]` (issue 13): export the checkpoint a
pointer names, with a config.json beside the weights that `from_pretrained` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_support import Run, as_json, assert_one_line_error, cli, cli_in
from safetensors.torch import load_file

from dist_ckpt import CheckpointManager


def _same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(found[k], v), k


def test_export_by_pointer_and_step(run_dir: Run, tmp_path: Path) -> None:
    # run_dir: best:loss is step 5, best:acc step 2, last step 8
    config = tmp_path / "model_config.json"
    config.write_text(json.dumps({"model_type": "mlp", "hidden": 16}))
    best = cli("export", run_dir.root, "--which", "best:loss", tmp_path / "best", "--config", config, "--json")
    assert best.returncode == 0, best.stderr
    doc = as_json(best)
    assert doc["source"].endswith("step_000000005") and doc["files"] == ["model.safetensors", "config.json"]
    _same(load_file(str(tmp_path / "best" / "model.safetensors")), run_dir.models[5])
    assert json.loads((tmp_path / "best" / "config.json").read_text()) == {"model_type": "mlp", "hidden": 16}
    for which, step in (("last", 8), ("best:acc", 2), ("7", 7), ("step_000000007", 7)):
        out = tmp_path / f"out_{which.replace(':', '_')}"
        proc = cli_in("export", run_dir.root, "--which", which, out)
        assert proc.returncode == 0, proc.stderr
        _same(load_file(str(out / "model.safetensors")), run_dir.models[step])
        assert not (out / "config.json").exists()


def test_export_which_bad_input_is_one_line_and_writes_nothing(run_dir: Run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = assert_one_line_error(cli_in("export", run_dir.root, out), 2)
    assert "--which" in line  # a run root needs --which (or a checkpoint folder)
    line = assert_one_line_error(cli_in("export", run_dir.root, "--which", "best:los", out), 2)
    assert "Did you mean 'best:loss'?" in line and "'best:acc' (step 2)" in line
    assert_one_line_error(cli_in("export", run_dir.root, "--which", "3", out), 3)  # pruned step
    bad = tmp_path / "bad.json"
    for text, why in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        bad.write_text(text)
        line = assert_one_line_error(cli_in("export", run_dir.ckpt(8), out, "--config", bad), 2)
        assert str(bad) in line and why in line
    line = assert_one_line_error(cli_in("export", run_dir.ckpt(8), out, "--config", tmp_path / "missing.json"), 2)
    assert "missing.json" in line
    assert not out.exists()  # every refusal came before anything was written
    (out).mkdir()
    (out / "config.json").write_text("{}")
    bad.write_text("{}")
    line = assert_one_line_error(cli_in("export", run_dir.ckpt(8), out, "--config", bad), 2)
    assert "config.json" in line and "--overwrite" in line


def test_exported_bert_loads_with_from_pretrained(tmp_path: Path) -> None:
    try:
        import transformers
    except ImportError as e:  # declared in the `test` extra
        raise AssertionError("this test needs transformers (pip install -e '.[test]')") from e
    bert_config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(3)
    model = transformers.BertModel(bert_config)
    with CheckpointManager(str(tmp_path / "run"), best={"loss": "min"}) as mgr:
        state = mgr.track(model=model)
        mgr.save(1, state, metrics={"loss": 1.0})
    bert_config.to_json_file(str(tmp_path / "bert_config.json"))
    proc = cli_in(
        "export", tmp_path / "run", "--which", "best:loss", tmp_path / "hf", "--config", tmp_path / "bert_config.json"
    )
    assert proc.returncode == 0, proc.stderr
    loaded = transformers.BertModel.from_pretrained(str(tmp_path / "hf"))
    assert loaded.config.hidden_size == 8
    _same(dict(loaded.state_dict()), dict(model.state_dict()))
