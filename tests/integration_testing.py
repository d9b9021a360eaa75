"""Helpers shared by the integration tests of the model families (Trainer, PEFT, remote code, loading)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from model_testing import random_ids
from transformers import Trainer, TrainingArguments

import ttt_hf

# Masked label prefixes of very different lengths: the micro-batches (0, 1), (2, 3), (4, 5), (6, 7) hold very
# different numbers of target tokens, so a plain mean of micro-batch means differs from the token mean.
MASKED_PREFIX = [9, 8, 0, 1, 7, 0, 2, 10]


def uncached_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    # torch.max propagates NaN (Python's max() may skip it).
    return torch.stack([(a[name] - b[name]).abs().max() for name in a]).max().item()


def param_snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def sgd_steps(model, ids, steps, lr):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
    model.eval()


def lora_module_names(model) -> set:
    return {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}


class FixedDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.input_ids = random_ids(8, 12, seed=3)
        self.labels = self.input_ids.clone()
        for row, count in enumerate(MASKED_PREFIX):
            self.labels[row, :count] = -100

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def train(tmp_path, model, batch_size, accumulation, accepts_loss_kwargs=None) -> dict:
    """Two SGD steps of `Trainer` on `FixedDataset`; returns the parameters."""
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run_{batch_size}_{accumulation}_{accepts_loss_kwargs}"),
        report_to=[],
        use_cpu=True,
        seed=0,
        optim="sgd",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=2,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=FixedDataset())
    if accepts_loss_kwargs is None:
        assert trainer.model_accepts_loss_kwargs  # forward takes **kwargs
    trainer.train()
    assert trainer.state.global_step == 2
    return param_snapshot(model)


def env_without_ttt_hf(tmp_path) -> dict:
    """Environment of a fresh process that cannot find the package sources and never touches the network."""
    env = dict(os.environ)
    src_dir = str(Path(ttt_hf.__file__).resolve().parent.parent)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(src_dir)]
    env["PYTHONPATH"] = os.pathsep.join(kept)
    if not kept:
        env.pop("PYTHONPATH")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    assert src_dir not in env.get("PYTHONPATH", "")
    return env
