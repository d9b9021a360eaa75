"""Triton kernels of the Block-State S4D layer, in fp32 (complex numbers as separate real/imaginary parts).

The torch references, which define the numbers, live next door in ssm_ops.py:
- `s4d_kernel_triton` == `ssm_ops.s4d_kernel_reference`: the Vandermonde sum
  `K[c, l] = 2 Re(sum_n W[c, n] exp(dtA[c, n] l))` with `W = C dB`, forward and backward;
- `s4d_step_triton` == `ssm_ops.s4d_decode_step_reference`: one decoding step of the recurrence with the
  discretization, the state update, the output and the skip term fused into one launch.
Channels `c` flatten (filter, feature); `n` runs over the N/2 complex modes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_C = 16
_BLOCK_L = 128
# Lags per program of the backward: the partial sums of the programs of one channel block are added in torch.
_BWD_SPLIT = 4096


# 2 pi = _TWO_PI_HI + _TWO_PI_LO, with _TWO_PI_HI = 201/32 short enough that k * _TWO_PI_HI is exact in fp32.
_TWO_PI_HI = tl.constexpr(6.28125)
_TWO_PI_LO = tl.constexpr(0.0019353071795864769)


@triton.jit
def _wrap_angle(angle):
    """angle - 2 pi k in [-pi, pi] (Cody-Waite): at 64k lags the angles reach 1e5 rad, beyond the range
    where hardware sin/cos approximations are accurate."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    return (angle - k * _TWO_PI_HI) - k * _TWO_PI_LO


@triton.jit
def _s4d_kernel_fwd(
    ar_ptr, ai_ptr, wr_ptr, wi_ptr, k_ptr, channels, length,
    MODES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rl = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mc = rc < channels
    lag = rl.to(tl.float32)[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for n in range(MODES):
        ar = tl.load(ar_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        ai = tl.load(ai_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        wr = tl.load(wr_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        wi = tl.load(wi_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
        angle = _wrap_angle(ai * lag)
        acc += tl.exp(ar * lag) * (wr * tl.cos(angle) - wi * tl.sin(angle))
    offsets = rc.to(tl.int64)[:, None] * length + rl[None, :]
    tl.store(k_ptr + offsets, 2 * acc, mask=mc[:, None] & (rl < length)[None, :])


@triton.jit
def _s4d_kernel_bwd(
    ar_ptr, ai_ptr, wr_ptr, wi_ptr, grad_ptr, d_ar_ptr, d_ai_ptr, d_wr_ptr, d_wi_ptr, channels, length,
    MODES: tl.constexpr, SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Program (channel block, mode, lag split): partial gradients of that mode over SPLIT lags."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1)
    split = tl.program_id(2)
    mc = rc < channels
    ar = tl.load(ar_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    ai = tl.load(ai_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    wr = tl.load(wr_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    wi = tl.load(wi_ptr + rc * MODES + n, mask=mc, other=0.0)[:, None]
    acc_ar = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    acc_ai = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    acc_wr = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    acc_wi = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for start in range(split * SPLIT, split * SPLIT + SPLIT, BLOCK_L):
        rl = start + tl.arange(0, BLOCK_L)
        mask = mc[:, None] & (rl < length)[None, :]
        grad = tl.load(grad_ptr + rc.to(tl.int64)[:, None] * length + rl[None, :], mask=mask, other=0.0)
        lag = rl.to(tl.float32)[None, :]
        angle = _wrap_angle(ai * lag)
        scaled = 2 * grad * tl.exp(ar * lag)
        g_cos = scaled * tl.cos(angle)  # dL/dWr
        g_sin = scaled * tl.sin(angle)  # -dL/dWi
        acc_wr += g_cos
        acc_wi -= g_sin
        acc_ar += lag * (wr * g_cos - wi * g_sin)
        acc_ai -= lag * (wr * g_sin + wi * g_cos)
    out = (split * channels + rc) * MODES + n
    tl.store(d_ar_ptr + out, tl.sum(acc_ar, axis=1), mask=mc)
    tl.store(d_ai_ptr + out, tl.sum(acc_ai, axis=1), mask=mc)
    tl.store(d_wr_ptr + out, tl.sum(acc_wr, axis=1), mask=mc)
    tl.store(d_wi_ptr + out, tl.sum(acc_wi, axis=1), mask=mc)


class S4DKernelFunction(torch.autograd.Function):
    """K [C, L] from dtA and W given as real/imaginary parts [C, n] (fp32, contiguous)."""

    @staticmethod
    def forward(ctx, ar, ai, wr, wi, length: int):
        channels, modes = ar.shape
        kernel = torch.empty(channels, length, device=ar.device, dtype=torch.float32)
        grid = (triton.cdiv(channels, _BLOCK_C), triton.cdiv(length, _BLOCK_L))
        _s4d_kernel_fwd[grid](ar, ai, wr, wi, kernel, channels, length, MODES=modes, BLOCK_C=_BLOCK_C, BLOCK_L=_BLOCK_L)
        ctx.save_for_backward(ar, ai, wr, wi)
        return kernel

    @staticmethod
    def backward(ctx, grad):
        ar, ai, wr, wi = ctx.saved_tensors
        channels, modes = ar.shape
        length = grad.shape[-1]
        splits = triton.cdiv(length, _BWD_SPLIT)
        partials = torch.empty(4, splits, channels, modes, device=ar.device, dtype=torch.float32)
        grid = (triton.cdiv(channels, _BLOCK_C), modes, splits)
        _s4d_kernel_bwd[grid](
            ar, ai, wr, wi, grad.float().contiguous(), *partials, channels, length,
            MODES=modes, SPLIT=_BWD_SPLIT, BLOCK_C=_BLOCK_C, BLOCK_L=_BLOCK_L,
        )
        d_ar, d_ai, d_wr, d_wi = partials.sum(1)
        return d_ar, d_ai, d_wr, d_wi, None


def s4d_kernel_triton(dt_a: torch.Tensor, c_db: torch.Tensor, length: int) -> torch.Tensor:
    """`K[l] = 2 Re(sum_n (C dB)[n] exp(dt A[n] l))`: dt_a, c_db complex64 [F, D, n] -> fp32 [F, D, length]."""
    shape, modes = dt_a.shape[:-1], dt_a.shape[-1]

    def parts(z):
        return z.real.reshape(-1, modes).contiguous(), z.imag.reshape(-1, modes).contiguous()

    kernel = S4DKernelFunction.apply(*parts(dt_a), *parts(c_db), length)
    return kernel.view(*shape, length)


@triton.jit
def _s4d_step_fwd(
    u_ptr, x_ptr, new_x_ptr, y_ptr, log_a_real_ptr, a_imag_ptr, log_dt_ptr, c_ptr, skip_ptr, active_ptr,
    channels, features, MODES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (row, channel block). x/new_x: [B, C, n, 2] (complex64 as pairs); c: [C, n, 2]; y: [B, C]."""
    row = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = tl.arange(0, MODES)
    mc = rc < channels
    mask = mc[:, None]
    params = rc[:, None] * MODES + rn[None, :]
    a_real = -tl.exp(tl.load(log_a_real_ptr + params, mask=mask, other=0.0))
    a_imag = tl.load(a_imag_ptr + params, mask=mask, other=0.0)
    dt = tl.exp(tl.load(log_dt_ptr + rc, mask=mc, other=0.0))[:, None]
    # Zero-order hold: z = exp(dt A), dB = (z - 1) / A; expm1 keeps dB accurate when dt A is tiny.
    ar, ai = dt * a_real, dt * a_imag
    magnitude = tl.exp(ar)
    z_r, z_i = magnitude * tl.cos(ai), magnitude * tl.sin(ai)
    # Re(exp(dt A) - 1) = expm1(ar) cos(ai) - 2 sin(ai/2)^2, with expm1 by its Taylor series near 0.
    expm1_ar = tl.where(tl.abs(ar) < 1e-2, ar * (1 + ar * (0.5 + ar * (1 / 6 + ar / 24))), magnitude - 1)
    half_sin = tl.sin(0.5 * ai)
    em1_r = expm1_ar * tl.cos(ai) - 2 * half_sin * half_sin
    em1_i = z_i
    denominator = a_real * a_real + a_imag * a_imag
    db_r = (em1_r * a_real + em1_i * a_imag) / denominator
    db_i = (em1_i * a_real - em1_r * a_imag) / denominator
    u_c = tl.load(u_ptr + row * features + rc % features, mask=mc, other=0.0)
    u = u_c[:, None]
    state = (row * channels + rc[:, None]).to(tl.int64) * MODES * 2 + rn[None, :] * 2
    x_r = tl.load(x_ptr + state, mask=mask, other=0.0)
    x_i = tl.load(x_ptr + state + 1, mask=mask, other=0.0)
    active = tl.load(active_ptr + row) != 0
    new_r = tl.where(active, z_r * x_r - z_i * x_i + db_r * u, x_r)
    new_i = tl.where(active, z_r * x_i + z_i * x_r + db_i * u, x_i)
    tl.store(new_x_ptr + state, new_r, mask=mask)
    tl.store(new_x_ptr + state + 1, new_i, mask=mask)
    c_r = tl.load(c_ptr + params * 2, mask=mask, other=0.0)
    c_i = tl.load(c_ptr + params * 2 + 1, mask=mask, other=0.0)
    y = 2 * tl.sum(c_r * new_r - c_i * new_i, axis=1) + tl.load(skip_ptr + rc, mask=mc, other=0.0) * u_c
    tl.store(y_ptr + row * channels + rc, y, mask=mc)


def s4d_step_triton(
    u: torch.Tensor, x: torch.Tensor, log_a_real: torch.Tensor, a_imag: torch.Tensor, log_dt: torch.Tensor,
    c: torch.Tensor, skip: torch.Tensor, active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step from the raw S4D parameters (no autograd). u: [B, D] fp32; x: [B, F, D, n] complex64;
    log_a_real, a_imag: [F, D, n]; log_dt, skip: [F, D]; c: [F, D, n, 2]; active: [B] bool.
    Returns y [B, F, D] fp32 (skip term included) and the new state."""
    batch, filters, features, modes = x.shape
    channels = filters * features
    new_x = torch.empty_like(x)
    y = torch.empty(batch, filters, features, device=u.device, dtype=torch.float32)
    grid = (batch, triton.cdiv(channels, _BLOCK_C))
    _s4d_step_fwd[grid](
        u.float().contiguous(), torch.view_as_real(x.contiguous()), torch.view_as_real(new_x), y,
        log_a_real.float().contiguous(), a_imag.float().contiguous(), log_dt.float().contiguous(),
        c.float().contiguous(), skip.float().contiguous(), active.to(torch.int8).contiguous(),
        channels, features, MODES=modes, BLOCK_C=_BLOCK_C,
    )
    return y, new_x
