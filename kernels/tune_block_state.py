"""Tuning sweep of the S4D scan's launches (`block_state_triton._SCAN_LAUNCH`) on the GPU, with the alternatives a user
would pick for the same convolution side by side:

    python kernels/tune_block_state.py [--length 65536] [--batch 4] [--features 1024]

The op: the BST-SH layer's SSM, u [B, L, D] bf16 -> y [B, L, 1, D] bf16 (N = 16: 8 complex modes), forward and forward +
backward (gradients of u and of every S4D parameter). Rows: every (channels per program, steps per group, warps) launch
of each scan kernel and the segment counts (programs per SM), each checked against the defaults first; a plain torch.fft
convolution of size 2L in fp32 (not exactly causal; what a user would write). Our reference (the exactly-causal FFT
recursion) is timed by bench_block_state.py at the layer level. Prints a markdown table and writes
kernels/results/block_state_tune.json.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
from bench_common import save_results
from triton.testing import do_bench

from ttt_hf.block_state import block_state_triton, ssm_ops


def s4d_inputs(batch: int, length: int, features: int, modes: int = 8):
    torch.manual_seed(0)
    shape = (1, features, modes)
    params = {
        "log_a_real": torch.full(shape, math.log(0.5)),
        "a_imag": math.pi * torch.arange(modes).float().expand(shape).clone(),
        "log_dt": torch.empty(1, features).uniform_(math.log(1e-3), math.log(1e-1)),
        "c": torch.randn(*shape, 2) * 0.5**0.5,
        "skip": torch.randn(1, features),
    }
    params = {k: v.cuda().requires_grad_() for k, v in params.items()}
    u = torch.randn(batch, length, features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return u, params


def conv(u, params, backend):
    dt_a, db = ssm_ops.s4d_discretize(params["log_a_real"], params["a_imag"], params["log_dt"])
    return ssm_ops.s4d_causal_conv(u, dt_a, db, torch.view_as_complex(params["c"]), params["skip"], u.dtype, backend)


def plain_fft(u, params):
    """y = irfft(rfft(u, 2L) rfft(K, 2L))[:L] + skip u in fp32: what a user would write (leaks ~1e-7 of the
    future into the past through rounding)."""
    length = u.shape[1]
    dt_a, db = ssm_ops.s4d_discretize(params["log_a_real"], params["a_imag"], params["log_dt"])
    kernel = block_state_triton.s4d_kernel_triton(dt_a, torch.view_as_complex(params["c"]) * db, length)[0]  # [D, L]
    u32 = u.float().transpose(1, 2)  # [B, D, L]
    y = torch.fft.irfft(torch.fft.rfft(u32, n=2 * length) * torch.fft.rfft(kernel, n=2 * length), n=2 * length)
    return (y[..., :length].transpose(1, 2) + params["skip"][0] * u.float()).to(u.dtype)[:, :, None]


def timed(fn, u, params, weights):
    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        torch.autograd.grad((fn().float() * weights).sum(), [u, *params.values()])

    return round(do_bench(fwd), 3), round(do_bench(fwd_bwd), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--features", type=int, default=1024)
    args = parser.parse_args()
    u, params = s4d_inputs(args.batch, args.length, args.features)
    weights = torch.randn(args.batch, args.length, 1, args.features, device="cuda")
    default = dict(block_state_triton._SCAN_LAUNCH), block_state_triton._SCAN_PROGRAMS_PER_SM
    expected = conv(u, params, "auto").float()
    expected_grads = torch.autograd.grad((expected * weights).sum(), [u, *params.values()])
    variants = [
        (kind, launch, default[1])
        for kind, launch in itertools.product(("forward", "backward"), itertools.product((32, 64), (8, 16), (1, 2)))
        if launch[0] >= 32 * launch[2]
    ]
    variants += [("both", None, per_sm) for per_sm in (1, 2, 8, 16)]
    rows = []
    for kind, launch, per_sm in variants:
        block_state_triton._SCAN_LAUNCH = {**default[0], kind: launch} if launch else default[0]
        block_state_triton._SCAN_PROGRAMS_PER_SM = per_sm
        y = conv(u, params, "auto").float()
        grads = torch.autograd.grad((y * weights).sum(), [u, *params.values()])
        error = max(
            ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for a, b in zip((y, *grads), (expected, *expected_grads))
        )
        fwd, fwd_bwd = timed(lambda: conv(u, params, "auto"), u, params, weights)
        name = f"scan {kind} {launch}" if launch else f"scan, {per_sm} programs per SM"
        rows.append(
            dict(variant=name, forward_ms=fwd, forward_backward_ms=fwd_bwd, max_rel_error_vs_default=f"{error:.1e}")
        )
        print(rows[-1], flush=True)
    block_state_triton._SCAN_LAUNCH, block_state_triton._SCAN_PROGRAMS_PER_SM = default
    for name, fn in (("torch.fft size 2L (fp32)", lambda: plain_fft(u, params)),):
        try:
            fwd, fwd_bwd = timed(fn, u, params, weights)
        except torch.OutOfMemoryError:
            fwd = fwd_bwd = "OOM"
        torch.cuda.empty_cache()
        rows.append(dict(variant=name, forward_ms=fwd, forward_backward_ms=fwd_bwd, max_rel_error_vs_default="-"))
        print(rows[-1], flush=True)
    print(f"\n## S4D scan launches (B={args.batch}, L={args.length}, D={args.features}, N=16, bf16 in/out), ms\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    save_results(
        "block_state_tune.json", dict(args=vars(args), default_launch=default[0], programs_per_sm=default[1], rows=rows)
    )


if __name__ == "__main__":
    main()
