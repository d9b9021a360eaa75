"""Triton kernels of TTT-Linear: the chunked dual form (prefill) and the fused one-token decode step.

Both keep the inner state W [f, f], c [f] and its accumulator on chip in fp32 for one (row, head) per
program. The torch reference (`ttt_ops.ttt_chunk_torch`, `ttt_ops.ttt_step_torch`) is the numerical
definition; `ttt_ops` dispatches here (inference only: gradients go through the reference).

Shapes: B rows, H heads, f head dim (padded to a power of two F_PAD inside the kernels), b mini-batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_stats(z, col_mask, F: tl.constexpr, eps):
    """Centred `z` (0 in padded columns) and 1/std per row; z [R, F_PAD]."""
    mean = tl.sum(z, axis=1) / F
    centred = tl.where(col_mask[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / F + eps)
    return centred, rstd


@triton.jit
def _layer_norm(z, weight, bias, col_mask, F: tl.constexpr, eps):
    centred, rstd = _layer_norm_stats(z, col_mask, F, eps)
    return centred * rstd[:, None] * weight[None, :] + bias[None, :]


@triton.jit
def _layer_norm_l2_grad(z, target, weight, bias, col_mask, F: tl.constexpr, eps):
    """Gradient of 0.5 * ||LN(z) - target||^2 with respect to z (LayerNorm backward fused with the loss)."""
    centred, rstd = _layer_norm_stats(z, col_mask, F, eps)
    z_hat = centred * rstd[:, None]
    grad_hat = (weight[None, :] * z_hat + bias[None, :] - target) * weight[None, :]
    grad = (
        F * grad_hat
        - tl.sum(grad_hat, axis=1)[:, None]
        - z_hat * tl.sum(grad_hat * z_hat, axis=1)[:, None]
    ) * (rstd[:, None] / F)
    return tl.where(col_mask[None, :], grad, 0.0)


@triton.jit
def _ttt_linear_chunk_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, ln_w_ptr, ln_b_ptr,
    w_ptr, c_ptr, acc_w_ptr, acc_c_ptr, span_ptr,
    out_ptr, w_out_ptr, c_out_ptr, acc_w_out_ptr, acc_c_out_ptr,
    H, M, eps,
    F: tl.constexpr, F_PAD: tl.constexpr, MB: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (row, head): mini-batches 0..M-1 of the slot layout [B, H, M, MB, F] in order."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    tokens = tl.arange(0, MB)
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    square = bh * F * F + cols[:, None] * F + cols[None, :]
    square_mask = col_mask[:, None] & col_mask[None, :]

    w = tl.load(w_ptr + square, mask=square_mask, other=0.0)
    acc_w = tl.load(acc_w_ptr + square, mask=square_mask, other=0.0)
    c = tl.load(c_ptr + bh * F + cols, mask=col_mask, other=0.0)
    acc_c = tl.load(acc_c_ptr + bh * F + cols, mask=col_mask, other=0.0)
    ln_w = tl.load(ln_w_ptr + head * F + cols, mask=col_mask, other=0.0)
    ln_b = tl.load(ln_b_ptr + head * F + cols, mask=col_mask, other=0.0)
    tau = tl.load(tau_ptr + tokens)
    tau_last = tl.load(tau_ptr + MB - 1)
    span = tl.load(span_ptr + row)
    causal = tokens[:, None] >= tokens[None, :]

    for m in range(M):
        first = (bh * M + m) * MB
        offsets = (first + tokens)[:, None] * F + cols[None, :]
        mask = col_mask[None, :]
        q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        lr = tl.load(lr_ptr + first + tokens)

        # Every gradient of a mini-batch is taken at its start state (w, c).
        z = tl.dot(k, w, input_precision=PRECISION) + c[None, :]
        grad = _layer_norm_l2_grad(z, v - k, ln_w, ln_b, col_mask, F, eps)  # [MB, F_PAD]

        # Dual form: token i sees W - tau_i * (acc + sum_{j<=i} k_j^T lr_j g_j); the bias term is the
        # same sum without k_j, hence eta * (q k^T + 1).
        eta = tl.where(causal, tau[:, None] * lr[None, :], 0.0)
        mix = eta * (tl.dot(q, tl.trans(k), input_precision=PRECISION) + 1.0)
        z_q = (
            tl.dot(q, w, input_precision=PRECISION)
            - tau[:, None] * tl.dot(q, acc_w, input_precision=PRECISION)
            - tl.dot(mix, grad, input_precision=PRECISION)
            + c[None, :]
            - tau[:, None] * acc_c[None, :]
        )
        tl.store(out_ptr + offsets, q + _layer_norm(z_q, ln_w, ln_b, col_mask, F, eps), mask=mask)

        weighted = lr[:, None] * grad
        acc_w += tl.dot(tl.trans(k), weighted, input_precision=PRECISION)
        acc_c += tl.sum(weighted, axis=0)
        # A row's last mini-batch may be partial: it keeps its accumulator instead of committing.
        commit = ((m + 1) * MB <= span).to(tl.float32)
        w -= commit * tau_last * acc_w
        c -= commit * tau_last * acc_c
        acc_w *= 1.0 - commit
        acc_c *= 1.0 - commit

    tl.store(w_out_ptr + square, w, mask=square_mask)
    tl.store(acc_w_out_ptr + square, acc_w, mask=square_mask)
    tl.store(c_out_ptr + bh * F + cols, c, mask=col_mask)
    tl.store(acc_c_out_ptr + bh * F + cols, acc_c, mask=col_mask)


@triton.jit
def _ttt_linear_step_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, ln_w_ptr, ln_b_ptr, position_ptr, active_ptr,
    w_ptr, c_ptr, acc_w_ptr, acc_c_ptr,
    out_ptr, w_out_ptr, c_out_ptr, acc_w_out_ptr, acc_c_out_ptr,
    H, eps,
    F: tl.constexpr, F_PAD: tl.constexpr, MB: tl.constexpr,
):
    """One token per row, one program per (row, head); the out pointers may equal the in pointers."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    square = bh * F * F + cols[:, None] * F + cols[None, :]
    square_mask = col_mask[:, None] & col_mask[None, :]

    q = tl.load(q_ptr + bh * F + cols, mask=col_mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bh * F + cols, mask=col_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * F + cols, mask=col_mask, other=0.0).to(tl.float32)
    lr = tl.load(lr_ptr + bh)
    index = tl.load(position_ptr + row) % MB
    tau = tl.load(tau_ptr + index)
    tau_last = tl.load(tau_ptr + MB - 1)
    active = (tl.load(active_ptr + row) != 0).to(tl.float32)
    ln_w = tl.load(ln_w_ptr + head * F + cols, mask=col_mask, other=0.0)
    ln_b = tl.load(ln_b_ptr + head * F + cols, mask=col_mask, other=0.0)
    w = tl.load(w_ptr + square, mask=square_mask, other=0.0)
    c = tl.load(c_ptr + bh * F + cols, mask=col_mask, other=0.0)
    acc_w = tl.load(acc_w_ptr + square, mask=square_mask, other=0.0)
    acc_c = tl.load(acc_c_ptr + bh * F + cols, mask=col_mask, other=0.0)

    z = tl.sum(k[:, None] * w, axis=0) + c  # [F_PAD]
    grad = tl.sum(_layer_norm_l2_grad(z[None, :], (v - k)[None, :], ln_w, ln_b, col_mask, F, eps), axis=0)
    weighted = active * lr * grad
    acc_w += k[:, None] * weighted[None, :]
    acc_c += weighted
    z_q = tl.sum(q[:, None] * (w - tau * acc_w), axis=0) + c - tau * acc_c
    out = q + tl.sum(_layer_norm(z_q[None, :], ln_w, ln_b, col_mask, F, eps), axis=0)
    tl.store(out_ptr + bh * F + cols, out, mask=col_mask)

    commit = active * (index == MB - 1).to(tl.float32)
    tl.store(w_out_ptr + square, w - commit * tau_last * acc_w, mask=square_mask)
    tl.store(c_out_ptr + bh * F + cols, c - commit * tau_last * acc_c, mask=col_mask)
    tl.store(acc_w_out_ptr + square, acc_w * (1.0 - commit), mask=square_mask)
    tl.store(acc_c_out_ptr + bh * F + cols, acc_c * (1.0 - commit), mask=col_mask)


def _state_views(state: list[torch.Tensor], acc: list[torch.Tensor]) -> list[torch.Tensor]:
    """W [B,H,f,f], c [B,H,1,f] and their accumulators as contiguous fp32 tensors."""
    return [t.float().contiguous() for t in (*state, *acc)]


def ttt_linear_chunk_triton(
    state: list[torch.Tensor],
    acc: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    span: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """TTT-Linear over mini-batch slots. q, k, v: [B, H, M, b, f] (fp32 or half precision); lr: [B, H, M, b];
    span: [B] slots up to each row's last token (its mini-batch m commits when (m + 1) * b <= span).
    Returns the output [B, H, M, b, f] fp32, the new state [W, c] and accumulator."""
    batch, heads, num_mb, mini_batch, head_dim = q.shape
    w, c, acc_w, acc_c = _state_views(state, acc)
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    new = [torch.empty_like(t) for t in (w, c, acc_w, acc_c)]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _ttt_linear_chunk_kernel[(batch * heads,)](
        q, k, v, lr.float().contiguous(), tau.float().contiguous(), ln_weight.float().contiguous(),
        ln_bias.float().contiguous(), w, c, acc_w, acc_c, span.to(torch.int32).contiguous(), out, *new,
        heads, num_mb, eps, F=head_dim, F_PAD=triton.next_power_of_2(head_dim), MB=mini_batch, PRECISION=precision,
        num_warps=4,
    )
    return out, new[:2], new[2:]


def ttt_linear_step_triton(
    state: list[torch.Tensor],
    acc: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    position: torch.Tensor,
    active: torch.Tensor,
    eps: float,
    in_place: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One decoding step of TTT-Linear, same contract as `ttt_step_torch`. `in_place=True` overwrites the
    (contiguous, fp32) state and accumulator tensors, so that the step allocates nothing and can be
    captured in a CUDA graph; positions and the active mask stay on the device (no host sync)."""
    batch, heads, head_dim = q.shape
    tensors = list(state) + list(acc) if in_place else _state_views(state, acc)
    new = tensors if in_place else [torch.empty_like(t) for t in tensors]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    _ttt_linear_step_kernel[(batch * heads,)](
        q.contiguous(), k.contiguous(), v.contiguous(), lr.float().contiguous(), tau.float().contiguous(),
        ln_weight.float().contiguous(), ln_bias.float().contiguous(), position.contiguous(),
        active.to(torch.int8).contiguous(), *tensors, out, *new,
        heads, eps, F=head_dim, F_PAD=triton.next_power_of_2(head_dim), MB=tau.shape[0], num_warps=4,
    )
    return out, new[:2], new[2:]
