"""TTT op benchmark on the GPU (TTT-Linear, and TTT-MLP's columns): our Triton kernels vs our torch reference vs
flash-linear-attention's `chunk_ttt_linear` vs SDPA (flash) causal attention at the same (B, H, T, D), forward and
forward+backward; TTT-MLP (our Triton kernels and the torch reference); the decode step.

    python kernels/bench_ttt.py [--lengths 2048,8192] [--batch 4 --heads 32 --head-dim 64]

Checks the kernels (outputs, final states and every gradient) against the reference on the benchmark shapes first,
then prints markdown tables and writes kernels/results/ttt_ops.json and kernels/results/ttt_ops.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import cuda_time, pyplot, result_paths, save_results
from triton.testing import do_bench

from ttt_hf.ttt.ttt_ops import ttt_chunk, ttt_chunk_reference, ttt_step, ttt_step_reference

MB = 16


def inputs(
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    requires_grad: bool = False,
    mlp: bool = False,
):
    """TTT inputs with the initial state of TTT-Linear (or TTT-MLP, inner width 4 * head_dim)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=g, device="cuda")  # noqa: E731
    q, k, v = (rand(batch, heads, seq_len, head_dim).to(dtype).requires_grad_(requires_grad) for _ in range(3))
    lr = (torch.rand(batch, heads, seq_len, generator=g, device="cuda") / head_dim).requires_grad_(requires_grad)
    tau = (1.0 / torch.arange(1, MB + 1, device="cuda")).requires_grad_(requires_grad)
    ln_w = (1 + rand(heads, 1, head_dim, scale=0.1)).requires_grad_(requires_grad)
    ln_b = rand(heads, 1, head_dim, scale=0.1).requires_grad_(requires_grad)
    widths = [head_dim, 4 * head_dim, head_dim] if mlp else [head_dim, head_dim]
    state = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        state += [rand(batch, heads, fan_in, fan_out, scale=fan_in**-0.5), rand(batch, heads, 1, fan_out, scale=0.02)]
    state = [s.requires_grad_(requires_grad) for s in state]
    acc = [torch.zeros_like(s) for s in state]
    start = torch.zeros(batch, dtype=torch.long, device="cuda")
    length = torch.full((batch,), seq_len, device="cuda")
    return state, acc, q, k, v, lr, tau, ln_w, ln_b, start, length


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """0 where both are 0 (an accumulator after whole mini-batches), inf for NaN: max() over several errors
    would silently drop a NaN, and a NaN passes no tolerance check either."""
    error = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)
    return torch.nan_to_num(error, nan=float("inf")).item()


def ms(fn, quick: bool = False) -> float:
    if quick:  # seconds-long reference runs: one warm-up, few repeats
        return cuda_time(fn, 2) * 1e3
    return do_bench(fn, warmup=25, rep=100)


def fwd_bwd(forward):
    def run():
        out = forward()
        out.float().sum().backward()

    return run


def extra_gib(run) -> float:
    """Peak memory of one call of `run` above what was allocated before it, in GiB."""
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def check(B: int, H: int, T: int, D: int, dtype: torch.dtype, mlp: bool = False) -> float:
    """Max relative error of the Triton path against the reference over the output, the final state and
    accumulator, and the gradient of every input (for random cotangents of all of them)."""
    args = inputs(B, H, T, D, dtype, requires_grad=True, mlp=mlp)
    leaves = [x for x in (*args[0], *args[2:9]) if x.requires_grad]
    results = {}
    for backend in ("torch", "triton"):
        out, state, acc = ttt_chunk(*args, checkpoint_group=4 if backend == "torch" else 0, kernel_backend=backend)
        outputs = [out, *state, *acc]
        g = torch.Generator(device="cuda").manual_seed(1)
        cotangents = [torch.randn(x.shape, generator=g, device="cuda") for x in outputs]
        grads = torch.autograd.grad(outputs, leaves, cotangents) if leaves else ()
        results[backend] = [x.detach() for x in (*outputs, *grads)]
        del out, state, acc, outputs, grads
    return max(rel_err(a, b) for a, b in zip(results["triton"], results["torch"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    B, H, D = args.batch, args.heads, args.head_dim
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": [B, H, D],
        "check": {},
        "ops": {},
        "decode": {},
    }
    try:
        from fla.ops.ttt import chunk_ttt_linear
    except ImportError as error:
        chunk_ttt_linear = None
        print(f"flash-linear-attention not importable ({error}): its column is skipped")

    # Correctness on the benchmark shapes first (fp32 with TF32 off, and bf16): no timing for a wrong kernel.
    torch.backends.cuda.matmul.allow_tf32 = False
    mlp_kernel = True
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        error = check(B, H, 2048, D, dtype)
        results["check"][str(dtype)] = error
        print(f"check {dtype}: max relative error (output, final state, every gradient) {error:.2e}")
        if error > tolerance:
            raise SystemExit(f"the Triton path is wrong for {dtype} (tolerance {tolerance:.0e}): no timings")
        error = check(B, H, 2048, D, dtype, mlp=True)
        results["check"][f"mlp {dtype}"] = error
        print(f"check TTT-MLP {dtype}: max relative error (output, final state, every gradient) {error:.2e}")
        mlp_kernel &= error <= tolerance  # a wrong TTT-MLP kernel is reported, not timed
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True

    print(f"\n## TTT op (TTT-Linear; TTT-MLP columns), B={B}, H={H}, D={D}, bf16 inputs (ms)")
    columns = {
        "triton_fwd": "ours Triton fwd",
        "torch_fwd": "torch ref fwd",
        "fla_fwd": "FLA fwd",
        "sdpa_fwd": "SDPA fwd",
        "triton_fwd_bwd": "ours Triton fwd+bwd",
        "triton_kept_fwd_bwd": "ours Triton fwd+bwd, kept states",
        "torch_fwd_bwd": "torch ref fwd+bwd",
        "fla_fwd_bwd": "FLA fwd+bwd",
        "sdpa_fwd_bwd": "SDPA fwd+bwd",
        "mlp_triton_fwd": "TTT-MLP Triton fwd",
        "mlp_torch_fwd": "TTT-MLP torch ref fwd",
        "mlp_triton_fwd_bwd": "TTT-MLP Triton fwd+bwd",
        "mlp_torch_fwd_bwd": "TTT-MLP torch ref fwd+bwd",
    }
    print("| T | " + " | ".join(columns.values()) + " |")
    print("|---|" + "---|" * len(columns))
    for T in map(int, args.lengths.split(",")):
        row = {}
        with torch.no_grad():
            a = inputs(B, H, T, D, torch.bfloat16)
            row["triton_fwd"] = ms(lambda: ttt_chunk(*a, kernel_backend="triton"))
            row["torch_fwd"] = ms(lambda: ttt_chunk_reference(*a), quick=True)
        g = inputs(B, H, T, D, torch.bfloat16, requires_grad=True)
        # The default recomputes groups of 16 mini-batches; checkpoint_group=1 keeps every start state instead.
        for key, group in (("triton_fwd_bwd", 0), ("triton_kept_fwd_bwd", 1)):
            run = fwd_bwd(lambda group=group: ttt_chunk(*g, checkpoint_group=group, kernel_backend="triton")[0])
            row[key] = ms(run)
            row[f"{key}_extra_gib"] = extra_gib(run)
        row["torch_fwd_bwd"] = ms(fwd_bwd(lambda: ttt_chunk_reference(*g)[0]), quick=True)
        with torch.no_grad():
            m = inputs(B, H, T, D, torch.bfloat16, mlp=True)
            if mlp_kernel:
                row["mlp_triton_fwd"] = ms(lambda: ttt_chunk(*m, kernel_backend="triton"))
            row["mlp_torch_fwd"] = ms(lambda: ttt_chunk_reference(*m), quick=True)
        m = inputs(B, H, T, D, torch.bfloat16, requires_grad=True, mlp=True)
        if mlp_kernel:
            mlp_triton = fwd_bwd(lambda: ttt_chunk(*m, kernel_backend="triton")[0])
            row["mlp_triton_fwd_bwd"] = ms(mlp_triton)
            row["mlp_triton_fwd_bwd_extra_gib"] = extra_gib(mlp_triton)
        # The reference recomputes groups of 16 mini-batches, as the model's training with it does.
        row["mlp_torch_fwd_bwd"] = ms(fwd_bwd(lambda: ttt_chunk_reference(*m, checkpoint_group=16)[0]), quick=True)
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        with torch.no_grad():
            row["sdpa_fwd"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        row["sdpa_fwd_bwd"] = ms(fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        if chunk_ttt_linear is not None:
            fq, fk, fv = (
                torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
            )
            fw = torch.ones(H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            fb = torch.zeros(H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            eta = torch.full((B, T, H, 1), 0.01, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            fla = lambda: chunk_ttt_linear(fq, fk, fv, fw, fb, eta, chunk_size=MB)[0]  # noqa: E731
            with torch.no_grad():
                row["fla_fwd"] = ms(fla)
            row["fla_fwd_bwd"] = ms(fwd_bwd(fla))
        results["ops"][T] = row
        cell = lambda key: f"{row[key]:.2f}" if key in row else "n/a"  # noqa: E731
        print(f"| {T} | " + " | ".join(cell(key) for key in columns) + " |")
        print(
            f"(ours Triton fwd+bwd at T={T}: {row['triton_fwd_bwd_extra_gib']:.2f} GiB above the inputs, kept states "
            f"{row['triton_kept_fwd_bwd_extra_gib']:.2f} GiB; TTT-MLP "
            f"{row.get('mlp_triton_fwd_bwd_extra_gib', float('nan')):.2f} GiB)"
        )
        torch.cuda.empty_cache()

    print(f"\n## TTT-Linear decode step, one layer, D={D} (microseconds per step)")
    print("| B x H | ours Triton | torch ref |\n|---|---|---|")
    for batch, heads in ((16, 12), (16, 32)):
        state, acc, q, k, v, lr, tau, ln_w, ln_b, _, _ = inputs(batch, heads, 1, D, torch.bfloat16)
        position = torch.full((batch,), 5, device="cuda")
        active = torch.ones(batch, dtype=torch.bool, device="cuda")
        step = (q[:, :, 0], k[:, :, 0], v[:, :, 0], lr[:, :, 0], tau, ln_w, ln_b, position, active)
        with torch.no_grad():
            row = {
                "triton_us": 1e3 * ms(lambda: ttt_step(state, acc, *step, kernel_backend="triton")),
                "torch_us": 1e3 * ms(lambda: ttt_step_reference(state, acc, *step)),
            }
        results["decode"][f"{batch}x{heads}"] = row
        print(f"| {batch} x {heads} | {row['triton_us']:.1f} | {row['torch_us']:.1f} |")

    save_results("ttt_ops.json", results)
    plot(results, result_paths("ttt_ops.png"))


def plot(results: dict, paths: list[Path]) -> None:
    plt = pyplot()
    if plt is None:
        return
    lengths = sorted(results["ops"], key=int)
    series = {
        "ours Triton fwd": "triton_fwd",
        "torch ref fwd": "torch_fwd",
        "FLA fwd": "fla_fwd",
        "SDPA fwd": "sdpa_fwd",
        "ours Triton fwd+bwd": "triton_fwd_bwd",
        "ours Triton fwd+bwd, kept states": "triton_kept_fwd_bwd",
        "torch ref fwd+bwd": "torch_fwd_bwd",
        "FLA fwd+bwd": "fla_fwd_bwd",
        "SDPA fwd+bwd": "sdpa_fwd_bwd",
        "TTT-MLP Triton fwd": "mlp_triton_fwd",
        "TTT-MLP torch fwd": "mlp_torch_fwd",
        "TTT-MLP Triton fwd+bwd": "mlp_triton_fwd_bwd",
        "TTT-MLP torch fwd+bwd": "mlp_torch_fwd_bwd",
    }
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.cm.tab20.colors  # more series than the default cycle's 10 colours
    for (label, key), color in zip(series.items(), colors):
        points = [(int(t), results["ops"][t][key]) for t in lengths if key in results["ops"][t]]
        if points:
            ax.plot(*zip(*points), marker="o", label=label, color=color, linestyle="--" if "bwd" in key else "-")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length T",
        ylabel="ms",
        title=f"TTT ops, B,H,D = {results['shape']}, bf16, {results['device']}",
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
