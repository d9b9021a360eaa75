"""Where one training step's GPU time goes: TTT models against the Llama of the first one's size.

    python kernels/profile_ttt_model.py [--models ttt-125m-linear-mamba,ttt-125m-mlp-mamba] [--group 16]
        [--train-len 8192] [--batch 1] [--top 28]

Prints each model's kernels and ops by GPU time (torch profiler, one step after two warm-up steps); `--group` is
`scan_checkpoint_group_size` (1: every start state kept).
"""

from __future__ import annotations

import argparse

import torch
from bench_common import ROOT, ttt_model
from bench_ttt_model import llama_like

from ttt_hf import TTTConfig


def profile_step(model, name: str, batch: int, length: int, top: int) -> None:
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device="cuda")
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        torch.cuda.synchronize()
    events = sorted(
        (e for e in profiler.key_averages() if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total
    )
    # Autograd nodes and aten ops are listed beside the kernels they launch: the column does not sum to a total.
    print(f"## {name}, batch {batch} x {length}: GPU ms per entry (self time), launches")
    for event in events[:top]:
        print(f"{event.self_device_time_total / 1e3:8.2f} {event.count:6d}  {event.key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ttt-125m-linear-mamba", help="configs/<name>.json, comma-separated")
    parser.add_argument("--group", type=int, default=16, help="scan_checkpoint_group_size")
    parser.add_argument("--train-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=28)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    names = args.models.split(",")
    for name in names:
        ttt = ttt_model(name, "triton", torch.bfloat16, scan_checkpoint_group_size=args.group)
        profile_step(ttt, f"{name}, groups of {args.group}", args.batch, args.train_len, args.top)
        del ttt
        torch.cuda.empty_cache()
    config = TTTConfig.from_json_file(ROOT / "configs" / f"{names[0]}.json")
    profile_step(
        llama_like(config, torch.bfloat16), f"Llama like {names[0]} (SDPA)", args.batch, args.train_len, args.top
    )


if __name__ == "__main__":
    main()
