"""Hugging Face Trainer through dist_ckpt (issue 18, item 2): a fine-tune checkpointed with
``DistCkptTrainer``, interrupted, and resumed with ``train(resume_from_checkpoint=...)`` ends
with weights and optimizer state bit-identical to an uninterrupted run.

The slow tests SIGKILL a real subprocess (``_hf_job.py``): BertForSequenceClassification on the
all-MiniLM-L6-v2 weights from a local run root, a small BERT from an ``s3://`` run on
SeaweedFS, and a small BERT under DDP on 2 ranks (torchrun, gloo). The fast test runs in this process and
stops training with an exception instead.
Determinism settings they rely on: ``seed``, ``data_seed``, ``dataloader_num_workers=0`` and
Trainer's defaults (seedable sampler, ``ignore_data_skip=False``); no ``full_determinism``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ckpt import CheckpointManager
from dist_ckpt.errors import CheckpointNotFound, ConfigError

JOB = Path(__file__).parent / "_hf_job.py"


def _job(tmp: Path, root: str, name: str, *extra: str, tiny: bool, nproc: int = 1) -> subprocess.CompletedProcess[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [
        sys.executable,
        *launcher,
        str(JOB),
        "--root",
        root,
        "--output-dir",
        str(tmp / f"hf-{name}"),
        "--out",
        str(tmp / f"{name}.safetensors"),
        "--steps",
        "10",
        "--save-steps",
        "4",
        *extra,
    ]
    if tiny:
        cmd.append("--tiny")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))


def _assert_same_final_state(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sorted(sa) == sorted(sb)
    assert any(k.startswith("optim.") for k in sa)  # optimizer moments compared too
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"


def _kill_and_resume(
    tmp: Path, root_a: str, root_b: str, *, tiny: bool, resume: str, nproc: int = 1, options: tuple[str, ...] = ()
) -> None:
    full = _job(tmp, root_a, "a", *options, tiny=tiny, nproc=nproc)
    assert full.returncode == 0, full.stderr[-4000:]
    # saved at 4: mid-epoch (6 steps per epoch, 3 on 2 ranks); killed at the end of step 7
    killed = _job(tmp, root_b, "b", "--kill-at", "7", *options, tiny=tiny, nproc=nproc)
    # every rank SIGKILLs itself; torchrun reports the failed workers with exit status 1
    assert killed.returncode == (-signal.SIGKILL if nproc == 1 else 1), killed.stderr[-4000:]
    assert nproc == 1 or "Signal 9 (SIGKILL)" in killed.stderr, killed.stderr[-4000:]
    assert not (tmp / "b.safetensors").exists()
    with CheckpointManager(root_b, read_only=True) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [4]
    resumed = _job(tmp, root_b, "b", "--resume", resume, *options, tiny=tiny, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    _assert_same_final_state(tmp / "a.safetensors", tmp / "b.safetensors")
    with CheckpointManager(root_b, read_only=True) as mgr:  # save_total_limit=2 -> keep_last=2
        assert [c.step for c in mgr.checkpoints()] == [8, 10]


@pytest.mark.slow
def test_minilm_fine_tune_sigkilled_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, str(tmp_path / "run-a"), str(tmp_path / "run-b"), tiny=False, resume="true")


@pytest.mark.slow
def test_resume_from_an_s3_run_after_sigkill(tmp_path: Path, s3_uri: str) -> None:
    # resume_from_checkpoint names the s3:// run root, as a path to checkpoint-N would be;
    # checkpoint_options={"async_save": True, "compression": "zstd"} in all three runs
    _kill_and_resume(tmp_path, str(tmp_path / "run-a"), s3_uri, tiny=True, resume=s3_uri, options=("--async-save",))


@pytest.mark.slow
def test_ddp_on_two_ranks_under_torchrun_sigkilled_and_resumed(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, str(tmp_path / "run-a"), str(tmp_path / "run-b"), tiny=True, resume="true", nproc=2)


# -- in process (default run) -------------------------------------------------------------------
class _Stop(Exception):
    pass


def _trainer(tmp: Path, root: Path, *, stop_at: int | None = None, **overrides):  # type: ignore[no-untyped-def]
    from _hf_job import Tokens, build_model
    from transformers import TrainerCallback, TrainingArguments, set_seed

    from dist_ckpt.integrations.hf import DistCkptTrainer

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == stop_at:
                raise _Stop

    set_seed(0)
    model = build_model(tiny=True)
    options = dict(
        output_dir=str(tmp / "hf"),
        max_steps=5,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    args = TrainingArguments(**options)
    data = Tokens(model.config.vocab_size)
    return DistCkptTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[StopAt()] if stop_at else [],
        checkpoint_root=str(root),
    )


def _final(trainer) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, st in enumerate(trainer.optimizer.optimizer.state.values()):
        out.update({f"optim.{i}.{k}": v.clone() for k, v in st.items()})
    return out


def test_trainer_interrupted_and_resumed_in_process_is_bit_identical(tmp_path: Path) -> None:
    full = _trainer(tmp_path, tmp_path / "a")
    full.train()
    ref = _final(full)
    with pytest.raises(CheckpointNotFound, match=f"{tmp_path}/b has no committed checkpoint"):
        _trainer(tmp_path, tmp_path / "b").train(resume_from_checkpoint=True)
    with pytest.raises(_Stop):
        _trainer(tmp_path, tmp_path / "b", stop_at=3).train()  # saved step 2, stopped at 3
    with CheckpointManager(str(tmp_path / "b"), read_only=True) as mgr:
        assert [c.step for c in mgr.checkpoints()] == [2]
    resumed = _trainer(tmp_path, tmp_path / "b")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 5
    got = _final(resumed)
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    # a fresh trainer resumed from the 2nd run's step 2 by path: the same end again
    again = _trainer(tmp_path, tmp_path / "c")
    again.train(resume_from_checkpoint=str(tmp_path / "b" / "step_000000002"))
    assert [k for k in ref if not torch.equal(ref[k], _final(again)[k])] == []


def test_load_best_model_at_end_is_refused_with_the_alternative(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"load_best_model_at_end is not supported.*load_weights"):
        _trainer(
            tmp_path,
            tmp_path / "a",
            load_best_model_at_end=True,
            eval_strategy="steps",
            eval_steps=2,
            metric_for_best_model="loss",
        )


@pytest.mark.slow
def test_save_total_limit_and_metric_for_best_model_become_keep_last_and_a_best_pointer(tmp_path: Path) -> None:
    trainer = _trainer(
        tmp_path,
        tmp_path / "run",
        max_steps=6,
        save_total_limit=1,
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="loss",
    )
    trainer.train()
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(evals) == [2, 4, 6]
    best = min(evals, key=lambda s: (evals[s], s))
    with CheckpointManager(str(tmp_path / "run"), read_only=True) as mgr:
        infos = mgr.checkpoints()
    kept = {c.step: c for c in infos}
    assert set(kept) == {6, best}  # keep_last=1, plus the best pointer's checkpoint
    assert "last" in kept[6].pointers and "best:eval_loss" in kept[best].pointers
    assert kept[best].metrics["eval_loss"] == pytest.approx(evals[best])
