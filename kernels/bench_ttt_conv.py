"""Causal depthwise convolution benchmark on the GPU (the Mamba backbone's pre-conv and the shared q/k pair, width
4, bf16): the Triton chunk kernels against the torch path (`F.conv1d` on a transposed copy, one call per bank),
forward and forward + backward, one and two banks over the same input.

    python kernels/bench_ttt_conv.py [--channels 768] [--tokens 8192] [--batches 1,8]

Prints a markdown table and writes kernels/results/ttt_conv.json (and $OUT/ttt_conv.json when $OUT is set).
"""

from __future__ import annotations

import argparse

import torch
from bench_common import cuda_time, save_results

from ttt_hf.ttt.ttt_ops import causal_conv1d_banks

WIDTH = 4


def bench(batch: int, tokens: int, channels: int, banks: int, repeats: int) -> dict:
    x = torch.randn(batch, tokens, channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    state = torch.zeros(batch, WIDTH - 1, channels, device="cuda", dtype=torch.bfloat16)
    filters = [
        (
            torch.randn(channels, 1, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True),
            torch.randn(channels, device="cuda", dtype=torch.bfloat16, requires_grad=True),
        )
        for _ in range(banks)
    ]
    length = torch.full((batch,), tokens, device="cuda")
    d_ys = [torch.randn_like(x) for _ in range(banks)]
    row = {}
    for backend in ("triton", "torch"):
        forward = lambda: causal_conv1d_banks(x, filters, state, length, backend)[0]
        with torch.no_grad():
            row[f"{backend}_fwd_ms"] = cuda_time(forward, repeats, warmup=3) * 1e3
        row[f"{backend}_fwd_bwd_ms"] = cuda_time(lambda: torch.autograd.backward(forward(), d_ys), repeats, 3) * 1e3
    # Least HBM traffic: read x and write each bank's y; backward reads x and each dy and writes dx.
    element_bytes = batch * tokens * channels * 2
    row["triton_fwd_gb_per_s"] = (1 + banks) * element_bytes / row["triton_fwd_ms"] / 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    print(f"## Causal depthwise convolution, width {WIDTH}, bf16, {args.tokens} tokens x {args.channels} channels (ms)")
    print("| batch | banks | Triton fwd | torch fwd | Triton fwd+bwd | torch fwd+bwd | Triton fwd GB/s |")
    print("|---|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        for banks in (1, 2):
            row = bench(batch, args.tokens, args.channels, banks, args.repeats)
            results["rows"][f"{batch}x{banks}"] = row
            print(
                f"| {batch} | {banks} | {row['triton_fwd_ms']:.3f} | {row['torch_fwd_ms']:.3f} | "
                f"{row['triton_fwd_bwd_ms']:.3f} | {row['torch_fwd_bwd_ms']:.3f} | {row['triton_fwd_gb_per_s']:.0f} |"
            )
    save_results("ttt_conv.json", results)


if __name__ == "__main__":
    main()
