"""SSM operations of the Block-State Transformer: PyTorch reference (the numerical definition) and dispatch.

The S4D layer is a bank of diagonal state spaces: `F` filters per feature (1 for SH, H for MH, S for MF),
each with `n = N/2` complex modes. Shapes: B batch, L positions, D features, F filters, n modes.
Everything runs in fp32 / complex64 with autocast off, whatever the model dtype: `torch.fft.rfft`
rejects bf16, fp16 needs power-of-two sizes and overflows.

Dispatch points (kernel_backend "auto" | "triton" | "torch"): `s4d_kernel` (Triton Vandermonde sum),
`s4d_causal_conv` (the Triton scan of the recurrence instead of the FFT recursion) and `s4d_decode_step`
(fused Triton step); the attention's rotary embeddings (`modeling_block_state.rotary_heads`, through
`_use_triton`) and a decoding token's block attention (`BlockStateAttention._attend_own_blocks`, through
`_triton_applies`) dispatch here too. Triton on CUDA when applicable, the torch reference elsewhere.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .configuration_block_state import KERNEL_BACKENDS

try:
    from .block_state_triton import (
        rotary_concat_triton,
        s4d_kernel_triton,
        s4d_scan_triton,
        s4d_step_op,
        s4d_step_triton,
        slot_attention_step_op,
        slot_attention_step_triton,
    )
except ImportError:  # triton is optional: the torch reference runs everywhere
    rotary_concat_triton = s4d_kernel_triton = s4d_scan_triton = s4d_step_op = s4d_step_triton = None
    slot_attention_step_op = slot_attention_step_triton = None

logger = logging.getLogger(__name__)

# Upper bound on the elements of a temporary built by the reference ops (chunks are sized to fit it).
_ELEMENT_BUDGET = 1 << 25


def check_kernel_backend(kernel_backend: str) -> None:
    """Fail early for a backend this installation cannot run."""
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {kernel_backend!r}")
    if kernel_backend == "triton" and s4d_kernel_triton is None:
        raise ImportError("kernel_backend='triton' needs the triton package (pip install triton)")


def _use_triton(kernel_backend: str, device: torch.device, supported: bool, what: str) -> bool:
    """Triton on CUDA ("auto") or wherever it can run ("triton": CUDA, or the interpreter on CPU) when the
    kernel supports the call; the torch reference otherwise (logged once under "triton"), never a wrong result.
    Under `torch.compile` the references run: the compiler fuses them into the step's graph."""
    return not torch.compiler.is_compiling() and _triton_applies(kernel_backend, device, supported, what)


def _triton_applies(kernel_backend: str, device: torch.device, supported: bool, what: str) -> bool:
    check_kernel_backend(kernel_backend)
    if kernel_backend == "torch" or s4d_kernel_triton is None:
        return False
    if kernel_backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "kernel_backend='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "triton, or use kernel_backend='auto'"
        )
    if kernel_backend == "triton" and not supported:
        _log_fallback_once(what)
    return supported and (device.type == "cuda" or kernel_backend == "triton")


@functools.cache
def _log_fallback_once(what: str) -> None:
    logger.warning(f"kernel_backend='triton': no Block-State kernel for {what}; using the torch reference")


# Copied from ttt_hf.ttt.ttt_ops._needs_grad
def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _chunk(total: int, per_item: int) -> int:
    return max(1, min(total, _ELEMENT_BUDGET // max(per_item, 1)))


def s4d_discretize(
    log_a_real: torch.Tensor, a_imag: torch.Tensor, log_dt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold. Returns `dt*A` and `dB = (exp(dt*A) - 1) / A`, complex64 [F, D, n]."""
    a = torch.complex(-torch.exp(log_a_real.float()), a_imag.float())
    dt_a = torch.exp(log_dt.float())[..., None] * a
    return dt_a, torch.expm1(dt_a) / a


def s4d_kernel(dt_a: torch.Tensor, c_db: torch.Tensor, length: int, kernel_backend: str = "auto") -> torch.Tensor:
    """`K[l] = 2 Re(sum_n (C dB)[n] exp(dt A[n] l))` for l < length: fp32 [F, D, length]. Any length works.

    Dispatch point of the Vandermonde sum: the Triton kernel (forward and backward) or the reference below."""
    if _use_triton(kernel_backend, dt_a.device, True, "the S4D kernel"):
        return s4d_kernel_triton(dt_a, c_db, length)
    return s4d_kernel_reference(dt_a, c_db, length)


def s4d_kernel_reference(dt_a: torch.Tensor, c_db: torch.Tensor, length: int) -> torch.Tensor:
    """The torch definition of `s4d_kernel`: dt_a, c_db complex64 [F, D, n]."""
    filters, features, modes = dt_a.shape
    kernel = torch.zeros(filters, features, length, device=dt_a.device)
    lags = torch.arange(length, device=dt_a.device, dtype=torch.float32)
    step = _chunk(length, filters * features)
    for start in range(0, length, step):
        lag = lags[start : start + step]
        for mode in range(modes):
            decay = torch.exp(dt_a[..., mode, None].real * lag)
            angle = dt_a[..., mode, None].imag * lag
            weight = c_db[..., mode, None]
            kernel[..., start : start + step] += (
                2 * decay * (weight.real * torch.cos(angle) - weight.imag * torch.sin(angle))
            )
    return kernel


_DIRECT_CONV_LENGTH = 32


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """`y[t] = sum_{k<=t} K[k] u[t-k]`: u [B, L, D] fp32, kernel [F, D, L]; returns [B, L, F, D] fp32.

    One FFT over the whole sequence would put every input in the transform that yields every output, so
    rounding would leak the future into the past (gradients of y[t] wrt u[s > t] of ~1e-7 instead of 0).
    Instead the sequence is split in halves: the halves recurse, and the left half's effect on the right
    half is one zero-padded FFT convolution (no circular wrap-around). No input ever meets an earlier
    output, so causality is exact, at O(L log^2 L).
    """
    length = u.shape[1]
    if length <= _DIRECT_CONV_LENGTH:
        lag = torch.arange(length, device=u.device)
        lags = lag[:, None] - lag[None, :]  # [t, s]
        toeplitz = kernel.float()[..., lags.clamp(min=0)] * (lags >= 0)  # [F, D, t, s]
        return torch.einsum("fdts,bsd->btfd", toeplitz, u.float())
    half = length // 2
    left = fft_causal_conv(u[:, :half], kernel[..., :half])
    right = fft_causal_conv(u[:, half:], kernel[..., : length - half])
    size = half + length
    u_f = torch.fft.rfft(u[:, :half].transpose(1, 2).float(), n=size)  # [B, D, size/2+1]
    k_f = torch.fft.rfft(kernel.float(), n=size)  # [F, D, size/2+1]
    cross = torch.fft.irfft(u_f[:, None] * k_f[None], n=size)[..., half:length]  # [B, F, D, L-half]
    return torch.cat([left, right + cross.permute(0, 3, 1, 2)], dim=1)


def s4d_causal_conv(
    u: torch.Tensor,
    dt_a: torch.Tensor,
    db: torch.Tensor,
    c: torch.Tensor,
    skip: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    kernel_backend: str = "auto",
) -> torch.Tensor:
    """The S4D layer from a zero state, `y[t] = sum_{k<=t} K[k] u[t-k] + skip u[t]`: u [B, L, D] (any float
    dtype, read as fp32); dt_a, db, c complex64 [F, D, n]; skip [F, D]. Returns [B, L, F, D] in out_dtype.

    Dispatch point: the Triton scan (`s4d_scan_triton`: the recurrence swept once over the sequence with the
    state on chip, O(L n), exactly causal, forward and backward) or the reference below."""
    if _use_triton(kernel_backend, u.device, True, "the S4D convolution"):
        return s4d_scan_triton(u, dt_a, c * db, skip, out_dtype)
    return s4d_causal_conv_reference(u, dt_a, db, c, skip).to(out_dtype)


def s4d_causal_conv_reference(
    u: torch.Tensor, dt_a: torch.Tensor, db: torch.Tensor, c: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    """The torch definition of `s4d_causal_conv`: the exactly-causal FFT convolution of the reference kernel."""
    u = u.float()
    return fft_causal_conv(u, s4d_kernel_reference(dt_a, c * db, u.shape[1])) + skip.float() * u[:, :, None]


def s4d_state_output(x0: torch.Tensor, dt_a: torch.Tensor, c: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Contribution of an initial state to later outputs: `2 Re(sum_n C x0 exp(dt A * steps))`.

    x0: [B, F, D, n] complex; steps: [B, L] number of steps since x0 (>= 1 where used). Returns [B, L, F, D].
    """
    batch, length = steps.shape
    cx = (c * x0)[:, None]  # [B, 1, F, D, n]
    out = []
    step = _chunk(length, cx[0, 0].numel())
    for start in range(0, length, step):
        exponent = steps[:, start : start + step, None, None, None].float()  # [B, l, 1, 1, 1]
        out.append(2 * (cx * torch.exp(exponent * dt_a)).real.sum(-1))
    return torch.cat(out, dim=1)


def s4d_block_sums(u: torch.Tensor, dt_a: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Per block, the state a zero state reaches at the block's end: `dB * sum_k exp(dt A (W-1-k)) u_k`.

    u: [B, M, W, D] fp32 (M blocks of W positions). Returns [B, M, F, D, n] complex64.
    """
    width = u.shape[2]
    lags = torch.arange(width - 1, -1, -1, device=u.device, dtype=torch.float32)
    u = u.to(torch.complex64)
    sums = []
    step = _chunk(dt_a.shape[0], dt_a[0].numel() * width)
    for start in range(0, dt_a.shape[0], step):
        powers = torch.exp(dt_a[start : start + step, ..., None] * lags)  # [f, D, n, W]
        sums.append(torch.einsum("bmwd,fdnw->bmfdn", u, powers) * db[start : start + step])
    return torch.cat(sums, dim=2)


def s4d_block_end_states(
    u: torch.Tensor, x0: torch.Tensor, dt_a: torch.Tensor, db: torch.Tensor, first_steps: torch.Tensor
) -> torch.Tensor:
    """States at the end of each of M aligned blocks, continuing from x0.

    u: [B, M, W, D] (zeros where a row has no input); x0: [B, F, D, n], the state `first_steps[r]` positions
    before the end of block 0. Returns [B, M, F, D, n] complex64.
    """
    width = u.shape[2]
    sums = s4d_block_sums(u, dt_a, db)
    block_decay = torch.exp(width * dt_a)
    x = x0 * torch.exp(first_steps.float()[:, None, None, None] * dt_a)
    states = []
    for m in range(u.shape[1]):
        x = (x if m == 0 else block_decay * x) + sums[:, m]
        states.append(x)
    return torch.stack(states, dim=1)


def s4d_final_state(
    u_right: torch.Tensor, x0: torch.Tensor, dt_a: torch.Tensor, db: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """State after consuming `length[r]` inputs from x0. u_right: [B, L, D], each row's inputs aligned to the
    right end (zeros before them). Returns [B, F, D, n] complex64."""
    total = u_right.shape[1]
    width = _chunk(total, dt_a.numel())
    pad = (-total) % width
    u = torch.nn.functional.pad(u_right.float(), (0, 0, pad, 0)).view(u_right.shape[0], -1, width, u_right.shape[2])
    zero = torch.zeros_like(x0)
    ends = s4d_block_end_states(u, zero, dt_a, db, torch.zeros_like(length))
    return ends[:, -1] + x0 * torch.exp(length.float()[:, None, None, None] * dt_a)


def s4d_step(
    u: torch.Tensor, x: torch.Tensor, dt_a: torch.Tensor, db: torch.Tensor, c: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step: `x = exp(dt A) x + dB u; y = 2 Re(C . x)` (without the skip term).

    u: [B, D] fp32; x: [B, F, D, n]; active: [B] bool (inactive rows keep their state). Returns y [B, F, D], x.
    """
    new_x = torch.exp(dt_a) * x + db * u.float()[:, None, :, None]
    new_x = torch.where(active[:, None, None, None], new_x, x)
    return 2 * (c * new_x).real.sum(-1), new_x


def s4d_decode_step(
    u: torch.Tensor,
    x: torch.Tensor,
    log_a_real: torch.Tensor,
    a_imag: torch.Tensor,
    log_dt: torch.Tensor,
    c: torch.Tensor,
    skip: torch.Tensor,
    active: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    kernel_backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step from the raw S4D parameters: discretization, `s4d_step` and the skip term.

    u: [B, D]; x: [B, F, D, n] complex64; log_a_real, a_imag: [F, D, n]; c: [F, D, n, 2] (real pairs); log_dt,
    skip: [F, D]; active: [B] bool. Returns y [B, F, D] (computed in fp32, returned in `out_dtype`) and the new
    state. Dispatch point: the fused Triton step (one launch instead of a dozen small ops per layer) when no
    gradient is needed."""
    modes = x.shape[-1]
    supported = not _needs_grad(u, x, log_a_real, a_imag, log_dt, c, skip) and modes & (modes - 1) == 0
    if _triton_applies(kernel_backend, x.device, supported, "decoding with gradients or N/2 not a power of two"):
        # Compiled, the kernel is one opaque operator (its complex state stays out of the compiler).
        step = s4d_step_op if torch.compiler.is_compiling() else s4d_step_triton
        return step(u, x, log_a_real, a_imag, log_dt, c, skip, active, out_dtype)
    y, new_x = s4d_decode_step_reference(u, x, log_a_real, a_imag, log_dt, c, skip, active)
    return y.to(out_dtype), new_x


def s4d_decode_step_reference(
    u: torch.Tensor,
    x: torch.Tensor,
    log_a_real: torch.Tensor,
    a_imag: torch.Tensor,
    log_dt: torch.Tensor,
    c: torch.Tensor,
    skip: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch definition of `s4d_decode_step`."""
    dt_a, db = s4d_discretize(log_a_real, a_imag, log_dt)
    y, new_x = s4d_step(u, x, dt_a, db, torch.view_as_complex(c.float().contiguous()), active)
    return y + skip.float() * u.float()[:, None], new_x
