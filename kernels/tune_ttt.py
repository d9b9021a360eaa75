"""Tuning sweep of the TTT-Linear chunk kernels' launch parameters (`ttt_triton_linear.LAUNCH`) and of the backward's
checkpoint group, and of the TTT-MLP kernels' state tiles, warps, stages and products (`ttt_triton_mlp.LAUNCH`), on the
GPU:

    python kernels/tune_ttt.py [--length 8192] [--batch 4 --heads 32 --head-dims 64,128] [--out ttt_tune.json]
                               [--mlp-only | --linear-only]

For each head dim and kernel, times the op with every candidate launch of that kernel (the other kernels at
their defaults): the forward without gradients for the state and output kernels, forward + backward for the
backward's kernels and for the checkpoint groups. Every variant is first checked against the default launch.
Prints a markdown table and writes kernels/results/<--out> (default ttt_tune.json).
"""

from __future__ import annotations

import argparse

import torch
from bench_common import save_results
from bench_ttt import fwd_bwd, inputs, rel_err
from triton.testing import do_bench

from ttt_hf.ttt import ttt_triton_linear, ttt_triton_mlp
from ttt_hf.ttt.ttt_ops import ttt_chunk

CANDIDATES = {
    "state": [{"num_warps": w} for w in (1, 2, 8)] + [{"num_warps": 4, "num_stages": 1}],
    "output": [{"num_warps": w} for w in (2, 8)],
    "bwd_local": [{"num_warps": w} for w in (2, 4, 8)],
    "bwd_state": [{"num_warps": w} for w in (4, 8, 16)],
}
GROUPS = (4, 64)
# TTT-MLP: per kernel, changes to its default launch (`ttt_triton_mlp.LAUNCH`). Fewer elements per tile, one
# stage and bf16 products each cut the backward's spills (kernels/results/triton_registers.md).
MLP_CANDIDATES = {
    "forward": [{"tile_elements": 1024}, {"num_warps": 4}, {"tile_elements": 4096}, {"half_products": "bf16"}],
    "backward": [
        {"tile_elements": 1024},
        {"tile_elements": 1024, "num_warps": 4},
        {"num_stages": 1},
        {"tile_elements": 1024, "num_stages": 1},
        {"half_products": "bf16"},
        {"tile_elements": 1024, "half_products": "bf16"},
        {"tile_elements": 1024, "num_stages": 1, "half_products": "bf16"},
    ],
}


def kernel_breakdown(args: tuple) -> list[tuple[str, float]]:
    """GPU microseconds per kernel of one forward + backward at the default launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    run = fwd_bwd(lambda: ttt_chunk(*args, kernel_backend="triton")[0])
    run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = [(e.key, e.self_device_time_total) for e in prof.key_averages()]
    return sorted(events, key=lambda e: -e[1])[:8]


def run_variant(kernel: str, launch: dict, head_dim: int, forward_only: bool, args: tuple, group: int = 0):
    """(ms, outputs and gradients) of the op with `launch` for `kernel`; the default launch is restored after."""
    default = ttt_triton_linear.LAUNCH[kernel]
    ttt_triton_linear.LAUNCH[kernel] = tuple(
        launch if (i == 1) == (head_dim > 64) else d for i, d in enumerate(default)
    )
    try:
        op = lambda: ttt_chunk(*args, checkpoint_group=group, kernel_backend="triton")[0]  # noqa: E731
        if forward_only:
            with torch.no_grad():
                result = [op()]
                return do_bench(op, warmup=25, rep=100), result
        out = op()
        leaves = [x for x in args[2:5] if x.requires_grad]
        result = [out.detach(), *torch.autograd.grad(out.float().square().sum(), leaves)]
        return do_bench(fwd_bwd(op), warmup=25, rep=100), result
    finally:
        ttt_triton_linear.LAUNCH[kernel] = default


def mlp_rows(args, head_dim: int) -> list[dict]:
    """TTT-MLP's chunk kernels with each candidate launch: the forward timed without gradients, the backward as
    forward + backward; every variant checked against its kernel's default."""
    m = inputs(args.batch, args.heads, args.length, head_dim, torch.bfloat16, requires_grad=True, mlp=True)
    op = lambda: ttt_chunk(*m, kernel_backend="triton")[0]  # noqa: E731
    rows = []
    for kernel, candidates in MLP_CANDIDATES.items():
        default = ttt_triton_mlp.LAUNCH[kernel]
        reference = None
        try:
            for change in [{}, *candidates]:
                launch = {**default, **change}
                ttt_triton_mlp.LAUNCH[kernel] = launch
                row = dict(head_dim=head_dim, kernel=f"mlp_{kernel}", launch=launch)
                try:
                    if kernel == "forward":
                        with torch.no_grad():
                            result = [op()]
                            row["ms"] = do_bench(op, warmup=10, rep=50)
                    else:
                        out = op()
                        result = [out.detach(), *torch.autograd.grad(out.square().sum(), m[2:5])]
                        row["ms"] = do_bench(fwd_bwd(op), warmup=3, rep=20)
                except Exception as error:  # noqa: BLE001 (a launch that does not compile)
                    rows.append({**row, "ms": None, "error": type(error).__name__})
                    continue
                reference = result if reference is None else reference
                rows.append({**row, "max_rel_diff": max(rel_err(a, b) for a, b in zip(result, reference))})
                print(rows[-1], flush=True)
        finally:
            ttt_triton_mlp.LAUNCH[kernel] = default
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--out", default="ttt_tune.json", help="result file name in kernels/results/")
    kernels = parser.add_mutually_exclusive_group()
    kernels.add_argument("--mlp-only", action="store_true", help="only the TTT-MLP kernels' launches")
    kernels.add_argument("--linear-only", action="store_true", help="only the TTT-Linear kernels' launches")
    args = parser.parse_args()
    rows = []
    for head_dim in map(int, args.head_dims.split(",")):
        if not args.linear_only:
            rows += mlp_rows(args, head_dim)
        if args.mlp_only:
            continue
        a = inputs(args.batch, args.heads, args.length, head_dim, torch.bfloat16, requires_grad=True)
        print(f"\nD={head_dim}: GPU us per kernel, one forward + backward at the default launches")
        for name, us in kernel_breakdown(a):
            print(f"  {us:10.1f}  {name[:90]}")
        for kernel, launches in CANDIDATES.items():
            forward_only = not kernel.startswith("bwd")
            reference = None
            for launch in [ttt_triton_linear.LAUNCH[kernel][head_dim > 64], *launches]:
                try:
                    ms, result = run_variant(kernel, launch, head_dim, forward_only, a)
                except Exception as error:  # noqa: BLE001 (a launch that does not compile, e.g. out of resources)
                    rows.append(
                        dict(head_dim=head_dim, kernel=kernel, launch=launch, ms=None, error=type(error).__name__)
                    )
                    continue
                reference = reference or result
                err = max(rel_err(x, y) for x, y in zip(result, reference))
                rows.append(dict(head_dim=head_dim, kernel=kernel, launch=launch, ms=ms, max_rel_diff=err))
                print(rows[-1], flush=True)
        for group in GROUPS:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms, _ = run_variant(
                "bwd_state", ttt_triton_linear.LAUNCH["bwd_state"][head_dim > 64], head_dim, False, a, group
            )
            rows.append(
                dict(
                    head_dim=head_dim,
                    kernel=f"checkpoint_group={group} (whole op)",
                    launch={},
                    ms=ms,
                    extra_gib=(torch.cuda.max_memory_allocated() - base) / 2**30,
                )
            )
            print(rows[-1], flush=True)
        del a
        torch.cuda.empty_cache()

    print(f"\n## TTT kernel launches, B={args.batch}, H={args.heads}, T={args.length}, bf16 (ms)\n")
    print("| head dim | kernel | launch | ms | note |\n|---|---|---|---|---|")
    for row in rows:
        note = row.get("error") or (
            f"diff {row['max_rel_diff']:.1e}" if "max_rel_diff" in row else f"{row['extra_gib']:.2f} GiB"
        )
        ms = "n/a" if row["ms"] is None else f"{row['ms']:.2f}"
        print(f"| {row['head_dim']} | {row['kernel']} | {row['launch']} | {ms} | {note} |")
    save_results(args.out, {"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
