"""Triton kernels of the TTT model's RMSNorm, forward and backward, one pass over the activations each.

`ttt_ops.rms_norm_reference` is the numerical definition (Llama's): y = weight * (x * rsqrt(mean(x^2) + eps)) with
the normalization in fp32, rounded to x's dtype before the weight multiplies it, y in the promoted dtype of x
and the weight. The torch path takes about eight passes over the activations forward (fp32 copies, the square,
the rounding) and more backward; here one program per row reads x once and writes y once, and the backward
reads x and dy once and writes dx, with the weight's gradient from per-program partial sums (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ttt_triton_common import _on_triton_device

BACKWARD_ROWS = 64  # rows per backward program: one partial sum of the weight's gradient each


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps, BLOCK_N: tl.constexpr):
    """Program (row): y = w * round(x * rstd) and rstd = rsqrt(mean(x^2) + eps), fp32 inside."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    normalized = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (normalized * w).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, M, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Program (ROWS rows): dx = rstd (g - x_hat mean(g x_hat)) with g = dy w and x_hat = x rstd, and its partial
    sum of dw = sum_rows dy round(x_hat) into row `program` of dw [programs, N] (fp32)."""
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = tl.program_id(0).to(tl.int64) * ROWS
    for i in range(ROWS):
        row = first + i
        if row < M:
            x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            dw += dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
            g = dy * w
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / N))
            tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + tl.program_id(0) * N + cols, dw, mask=ok)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim of x [..., N] (contiguous); saves x, the weight and each row's rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        rows = x.numel() // n
        y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        _rms_norm_fwd_kernel[(rows,)](x, weight, y, rstd, n, eps, BLOCK_N=block, num_warps=min(max(block // 256, 1), 8))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, d_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x.shape[-1]
        rows = x.numel() // n
        programs = triton.cdiv(rows, BACKWARD_ROWS)
        d_x = torch.empty_like(x)
        d_w = torch.empty(programs, n, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        _rms_norm_bwd_kernel[(programs,)](
            x,
            weight,
            d_y.contiguous(),
            rstd,
            d_x,
            d_w,
            rows,
            n,
            ROWS=BACKWARD_ROWS,
            BLOCK_N=block,
            num_warps=min(max(block // 256, 1), 8),
        )
        return d_x, d_w.sum(0).to(weight.dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`ttt_ops.rms_norm_reference` in one pass forward and one backward: x [..., N] fp32, bf16 or fp16, weight [N]
    (fp32, bf16 or fp16), N up to 65536."""
    if not _on_triton_device(x):
        raise RuntimeError(
            "rms_norm_triton on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before importing triton"
        )
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in dtypes or weight.dtype not in dtypes:
        raise ValueError(f"rms_norm_triton takes fp32, bf16 or fp16 inputs and weights, got {x.dtype}, {weight.dtype}")
    if weight.shape != (x.shape[-1],) or x.shape[-1] > 65536:
        raise ValueError(
            f"rms_norm_triton takes a weight [N] for x [..., N], N <= 65536; got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    return RMSNormFunction.apply(x.contiguous(), weight, eps)
