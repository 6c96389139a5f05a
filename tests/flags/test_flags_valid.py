"""Each valid combination of the resume flags behaves as the README's table says, in a real
script (tests/flags/_flags_job.py: add_checkpoint_args + mgr.start) run as a subprocess.

Run A is made once by the first row (no flags on an empty root: a fresh start) and trains
steps 0-5, saving each: last = 5, best:score = 3. Rows that would write to A work on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flags_support import (
    checkpoint_params,
    committed_steps,
    distinct_weights,
    initial_params,
    ok,
    run_job,
    snapshot,
)
from safetensors.torch import save_file

from dist_ckpt.cli import main as cli_main


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run_a")
    report = ok(run_job(tmp, "--ckpt", str(tmp / "a"), train_steps=6))
    # row "no flags / --resume auto, no checkpoints yet": a fresh start
    assert report["resumed_step"] is None and report["first_step"] == 0
    assert report["params"] == initial_params() and not report["optimizer_state"]
    assert report["counters"] == {"examples": 0} and report["best"] == {}
    assert committed_steps(tmp / "a") == [0, 1, 2, 3, 4, 5]
    return tmp / "a"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def _resumed(report: dict, step: int, checkpoint: Path) -> None:
    """The job continued from ``checkpoint`` (step ``step``) with its whole training state."""
    assert report["resumed_step"] == step and report["first_step"] == step + 1
    assert report["params"] == checkpoint_params(checkpoint)  # bit for bit
    assert report["optimizer_state"]
    assert report["counters"] == {"examples": 8 * (step + 1)}
    assert report["best"] == {"score": float(-abs(min(step, 3) - 3))}


def test_auto_with_checkpoints_resumes_the_latest(run_a: Path, tmp_path: Path) -> None:
    run = _copy(run_a, tmp_path)
    report = ok(run_job(tmp_path, "--ckpt", str(run), train_steps=2))  # --resume auto is the default
    _resumed(report, 5, run / "step_000000005")
    assert committed_steps(run) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_resume_last(run_a: Path, tmp_path: Path) -> None:
    run = _copy(run_a, tmp_path)
    report = ok(run_job(tmp_path, "--ckpt", str(run), "--resume", "last", train_steps=1))
    _resumed(report, 5, run / "step_000000005")
    assert committed_steps(run) == [0, 1, 2, 3, 4, 5, 6]


def test_resume_best_metric(run_a: Path, tmp_path: Path) -> None:
    before = snapshot(run_a)
    report = ok(run_job(tmp_path, "--ckpt", str(run_a), "--resume", "best:score"))
    _resumed(report, 3, run_a / "step_000000003")
    assert snapshot(run_a) == before  # nothing trained, nothing saved, the lock released


def test_resume_step(run_a: Path, tmp_path: Path) -> None:
    report = ok(run_job(tmp_path, "--ckpt", str(run_a), "--resume", "2"))
    _resumed(report, 2, run_a / "step_000000002")


def test_resume_uri_of_another_run_branches_into_a_new_root(run_a: Path, tmp_path: Path) -> None:
    source = run_a / "step_000000004"
    report = ok(run_job(tmp_path, "--ckpt", str(tmp_path / "b"), "--resume", str(source), train_steps=2))
    _resumed(report, 4, source)
    assert report["resumed_uri"] == str(source)
    assert committed_steps(tmp_path / "b") == [5, 6]  # the branch continues in its own root
    assert committed_steps(run_a) == [0, 1, 2, 3, 4, 5]


def test_resume_none_on_a_new_root_starts_fresh(tmp_path: Path) -> None:
    report = ok(run_job(tmp_path, "--ckpt", str(tmp_path / "n"), "--resume", "none", train_steps=1))
    assert report["resumed_step"] is None and report["first_step"] == 0
    assert report["params"] == initial_params() and not report["optimizer_state"]
    assert committed_steps(tmp_path / "n") == [0]


def _fresh_from(report: dict, params: dict) -> None:
    """Weights from the source; optimizer, progress, counters and best values new."""
    assert report["resumed_step"] is None and report["first_step"] == 0
    assert report["params"] == params
    assert report["params"] != initial_params()
    assert not report["optimizer_state"] and report["counters"] == {"examples": 0} and report["best"] == {}


def test_init_from_a_checkpoint(run_a: Path, tmp_path: Path) -> None:
    source = run_a / "step_000000005"
    report = ok(run_job(tmp_path, "--ckpt", str(tmp_path / "c"), "--init-from", str(source), train_steps=1))
    _fresh_from(report, checkpoint_params(source))
    assert committed_steps(tmp_path / "c") == [0]


def test_init_from_a_safetensors_file(tmp_path: Path) -> None:
    weights = distinct_weights(1)
    save_file(weights, str(tmp_path / "weights.safetensors"))
    report = ok(run_job(tmp_path, "--ckpt", str(tmp_path / "c"), "--init-from", str(tmp_path / "weights.safetensors")))
    _fresh_from(report, {k: v.tolist() for k, v in weights.items()})


def _hf_config(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "linear", "in_features": 4, "out_features": 3}))


def test_init_from_a_hugging_face_folder(tmp_path: Path) -> None:
    weights = distinct_weights(2)
    folder = tmp_path / "hf"
    _hf_config(folder)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    report = ok(run_job(tmp_path, "--ckpt", str(tmp_path / "c"), "--init-from", str(folder), train_steps=1))
    _fresh_from(report, {k: v.tolist() for k, v in weights.items()})
    assert committed_steps(tmp_path / "c") == [0]


def test_init_from_a_sharded_hugging_face_folder(tmp_path: Path) -> None:
    weights = distinct_weights(3)
    folder = tmp_path / "hf"
    _hf_config(folder)
    save_file(
        {"weight": weights["weight"]}, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"}
    )
    save_file({"bias": weights["bias"]}, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": 60},
        "weight_map": {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    report = ok(run_job(tmp_path, "--ckpt", str(tmp_path / "c"), "--resume", "none", "--init-from", str(folder)))
    _fresh_from(report, {k: v.tolist() for k, v in weights.items()})


def test_init_from_with_explicit_auto_resumes_once_the_run_has_checkpoints(run_a: Path, tmp_path: Path) -> None:
    weights = distinct_weights(4)
    save_file(weights, str(tmp_path / "w.safetensors"))
    flags = ["--resume", "auto", "--init-from", str(tmp_path / "w.safetensors")]
    first = ok(run_job(tmp_path, "--ckpt", str(tmp_path / "d"), *flags, train_steps=2))  # first start: the weights
    _fresh_from(first, {k: v.tolist() for k, v in weights.items()})
    again = ok(
        run_job(tmp_path, "--ckpt", str(tmp_path / "d"), *flags, train_steps=1)
    )  # the restarted job: its own run
    assert again["resumed_step"] == 1 and again["first_step"] == 2 and again["optimizer_state"]
    assert again["params"] == checkpoint_params(tmp_path / "d" / "step_000000001")
    assert committed_steps(tmp_path / "d") == [0, 1, 2]


def test_list_checkpoints_prints_what_dist_ckpt_list_prints(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(run_a)
    listed = run_job(tmp_path, "--ckpt", str(run_a), "--list-checkpoints")
    assert cli_main(["list", str(run_a)]) == 0
    expected = capsys.readouterr().out
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == expected and "best:score" in listed.stdout and "last" in listed.stdout
    assert listed.report is None  # it exited before training
    assert snapshot(run_a) == before


def test_fsdp_example_starts_from_exported_weights_on_two_ranks(tmp_path: Path) -> None:
    """--init-from a safetensors file under torchrun: every rank reads it and FSDP2 shards it."""
    from flags_support import EXAMPLES, run_script
    from safetensors.torch import load_file
    from support.dist import run_torchrun

    from dist_ckpt.checkpoint_view import CheckpointView
    from dist_ckpt.export import export_checkpoint
    from storage_backends import open_backend

    source = tmp_path / "source"
    trained = run_script(EXAMPLES / "train_ddp.py", ["--ckpt", str(source), "--steps", "2", "--save-every", "1"])
    assert trained.returncode == 0, trained.stderr
    export_checkpoint(CheckpointView.open(str(source / "step_000000001")), open_backend(str(tmp_path / "export")))
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    run_torchrun(
        EXAMPLES / "train_fsdp.py",
        2,
        "--ckpt",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--init-from",
        str(tmp_path / "export" / "model.safetensors"),
        "--loaded-out",
        str(tmp_path / "loaded.safetensors"),
    )
    loaded = load_file(str(tmp_path / "loaded.safetensors"))
    assert sorted(weights) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    for key, tensor in weights.items():
        assert torch.equal(loaded[f"model.{key}"], tensor), key
    assert committed_steps(tmp_path / "run") == [0]
