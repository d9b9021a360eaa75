"""Triton kernel of TTT-MLP's chunked dual form, forward only (prefill and inference; training runs the torch
reference, which autograd differentiates).

One program per (row, head) runs the mini-batches in order. The inner state W1 [f, N], c1 [N], W2 [N, f], c2 [f]
(N = 4f hidden units) and its accumulator are 8f^2 fp32 values per head, more than a program's registers, so they
live in the output state tensors (copies of the inputs, L2-resident) and every mini-batch streams them through
registers in blocks of BLOCK hidden units, twice:
1. the key pass: z1 = k W1 + c1, x2 = gelu(z1), z2 = x2 W2 + c2 summed over the blocks, then g2, the LN-L2
   gradient at z2 (target v - k);
2. per block again: g1 = (g2 W2^T) * gelu'(z1), the query's first layer (dual form) and its activation, their
   contributions to the query's second layer, and the accumulator update, written back (and on commit the new
   weights).
Per mini-batch, with E = tril(tau_i lr_j) and (A, a) the accumulator at its start,
    h = q W1 - tau (q A1) - (E * (q k^T + 1)) g1 + c1 - tau a1,  x_q = gelu(h)
    z_q = x_q W2 - tau (x_q A2) - (E * (x_q x2^T + 1)) g2 + c2 - tau a2,  out = q + LN(z_q)
    A1' = A1 + k^T (lr g1), A2' = A2 + x2^T (lr g2) (and the biases), on commit W -= tau_{b-1} A', A' = 0.
The torch reference `ttt_ops.ttt_chunk_torch` is the numerical definition; `ttt_ops.ttt_chunk` dispatches here.
Shapes as in `ttt_triton`: B rows, H heads, f head dim (padded to F_PAD), b = MB mini-batch, M mini-batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ttt_triton import (
    _commit_one,
    _dot,
    _layer_norm,
    _layer_norm_l2_grad,
    _load_mini_batch,
    _mini_batch_constants,
    _precision,
)
from .ttt_triton_decode import _gelu_tanh, _gelu_tanh_grad

# Elements of one [F_PAD, BLOCK] state tile (BLOCK >= 16 for the dots) and warps, from ptxas' report (sm_90, triton
# 3.6): at head dim 64 255 registers and 40 bytes of spills per thread (bf16 inputs; none in fp32), at 128 520 bytes
# (16 hidden units per block; 4 warps or 16 spill more, larger blocks too).
TILE_ELEMENTS = 1024
NUM_WARPS = 8


@triton.jit
def _hidden_block(w1_ptr, c1_ptr, w2_ptr, first, units, cols, col_mask, F: tl.constexpr, N: tl.constexpr):
    """Hidden units n = [first, first + BLOCK) and their mask; offsets and masks of their W1 [F_PAD, BLOCK] and
    W2 [BLOCK, F_PAD] tiles in the head's tensors; and W1, c1, W2 of those units."""
    n = first + units
    n_mask = n < N
    offsets1, mask1 = cols[:, None] * N + n[None, :], col_mask[:, None] & n_mask[None, :]
    offsets2, mask2 = n[:, None] * F + cols[None, :], n_mask[:, None] & col_mask[None, :]
    w1 = tl.load(w1_ptr + offsets1, mask=mask1, other=0.0)
    c1 = tl.load(c1_ptr + n, mask=n_mask, other=0.0)
    w2 = tl.load(w2_ptr + offsets2, mask=mask2, other=0.0)
    return n, n_mask, offsets1, mask1, offsets2, mask2, w1, c1, w2


@triton.jit
def _ttt_mlp_chunk_forward_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, ln_w_ptr, ln_b_ptr, span_ptr,
    w1_ptr, c1_ptr, w2_ptr, c2_ptr, acc_w1_ptr, acc_c1_ptr, acc_w2_ptr, acc_c2_ptr, out_ptr,
    H, M, eps,
    F: tl.constexpr, F_PAD: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr, MB: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (row, head): mini-batches 0..M-1 of the slot layout [B, H, M, MB, F]; the state tensors [B, H, ...]
    hold the start state and end with the final one; out [B, H, M, MB, F] fp32."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    tokens = tl.arange(0, MB)
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    units = tl.arange(0, BLOCK)
    ln_w, ln_b, tau, causal = _mini_batch_constants(ln_w_ptr, ln_b_ptr, tau_ptr, head, tokens, cols, col_mask, F)
    tau_last = tl.load(tau_ptr + MB - 1)
    span = tl.load(span_ptr + row)
    # This head's state: W1 [F, N], W2 [N, F] and the biases (int64: B*H*8F^2 may pass 2^31).
    matrix, bias1, bias2 = bh.to(tl.int64) * F * N, bh.to(tl.int64) * N, bh.to(tl.int64) * F
    w1_ptr, acc_w1_ptr, w2_ptr, acc_w2_ptr = w1_ptr + matrix, acc_w1_ptr + matrix, w2_ptr + matrix, acc_w2_ptr + matrix
    c1_ptr, acc_c1_ptr, c2_ptr, acc_c2_ptr = c1_ptr + bias1, acc_c1_ptr + bias1, c2_ptr + bias2, acc_c2_ptr + bias2

    for m in range(0, M):
        offsets, q, k, v, lr = _load_mini_batch(q_ptr, k_ptr, v_ptr, lr_ptr, (bh * M + m) * MB, tokens, cols,
                                                col_mask, F)
        commit = ((m + 1) * MB <= span).to(tl.float32)
        c2 = tl.load(c2_ptr + cols, mask=col_mask, other=0.0)
        acc_c2 = tl.load(acc_c2_ptr + cols, mask=col_mask, other=0.0)

        z2 = tl.zeros([MB, F_PAD], tl.float32) + c2[None, :]
        for first in range(0, N, BLOCK):
            n, n_mask, offsets1, mask1, offsets2, mask2, w1, c1, w2 = _hidden_block(
                w1_ptr, c1_ptr, w2_ptr, first, units, cols, col_mask, F, N)
            z2 += _dot(_gelu_tanh(_dot(k, w1, PRECISION) + c1[None, :])[0], w2, PRECISION)
        g2 = _layer_norm_l2_grad(z2, v - k, ln_w, ln_b, col_mask, F, eps)[0]
        weighted2 = lr[:, None] * g2
        eta = tl.where(causal, tau[:, None] * lr[None, :], 0.0)
        key_scores = eta * (_dot(q, tl.trans(k), PRECISION) + 1.0)

        z_q = c2[None, :] - tau[:, None] * acc_c2[None, :]
        hidden_scores = tl.zeros([MB, MB], tl.float32)  # x_q x2^T over all hidden units
        for first in range(0, N, BLOCK):
            n, n_mask, offsets1, mask1, offsets2, mask2, w1, c1, w2 = _hidden_block(
                w1_ptr, c1_ptr, w2_ptr, first, units, cols, col_mask, F, N)
            acc_w1 = tl.load(acc_w1_ptr + offsets1, mask=mask1, other=0.0)
            acc_c1 = tl.load(acc_c1_ptr + n, mask=n_mask, other=0.0)
            acc_w2 = tl.load(acc_w2_ptr + offsets2, mask=mask2, other=0.0)
            z1 = _dot(k, w1, PRECISION) + c1[None, :]
            x2, tanh = _gelu_tanh(z1)
            g1 = _dot(g2, tl.trans(w2), PRECISION) * _gelu_tanh_grad(z1, tanh)
            h = (_dot(q, w1, PRECISION) - tau[:, None] * (_dot(q, acc_w1, PRECISION) + acc_c1[None, :])
                 - _dot(key_scores, g1, PRECISION) + c1[None, :])
            x_q = _gelu_tanh(h)[0]
            z_q += _dot(x_q, w2, PRECISION) - tau[:, None] * _dot(x_q, acc_w2, PRECISION)
            hidden_scores += _dot(x_q, tl.trans(x2), PRECISION)

            weighted1 = lr[:, None] * g1
            w1, acc_w1 = _commit_one(w1, acc_w1 + _dot(tl.trans(k), weighted1, PRECISION), commit, tau_last)
            c1, acc_c1 = _commit_one(c1, acc_c1 + tl.sum(weighted1, axis=0), commit, tau_last)
            w2, acc_w2 = _commit_one(w2, acc_w2 + _dot(tl.trans(x2), weighted2, PRECISION), commit, tau_last)
            tl.store(w1_ptr + offsets1, w1, mask=mask1)
            tl.store(acc_w1_ptr + offsets1, acc_w1, mask=mask1)
            tl.store(c1_ptr + n, c1, mask=n_mask)
            tl.store(acc_c1_ptr + n, acc_c1, mask=n_mask)
            tl.store(w2_ptr + offsets2, w2, mask=mask2)
            tl.store(acc_w2_ptr + offsets2, acc_w2, mask=mask2)

        z_q -= _dot(eta * (hidden_scores + 1.0), g2, PRECISION)
        out = q + _layer_norm(z_q, ln_w, ln_b, col_mask, F, eps)
        tl.store(out_ptr + offsets, out, mask=col_mask[None, :])
        c2, acc_c2 = _commit_one(c2, acc_c2 + tl.sum(weighted2, axis=0), commit, tau_last)
        tl.store(c2_ptr + cols, c2, mask=col_mask)
        tl.store(acc_c2_ptr + cols, acc_c2, mask=col_mask)
        tl.debug_barrier()  # the next mini-batch's threads read what this one's wrote


def mlp_kernel_supported(state: list[torch.Tensor], q: torch.Tensor) -> bool:
    """Whether `ttt_mlp_chunk_forward_triton` handles this state [W1, c1, W2, c2] (hidden 4f) and q [.., f]:
    fp32, bf16 or fp16 inputs with head_dim 16..128."""
    head_dim = q.shape[-1]
    shapes = [tuple(t.shape[-2:]) for t in state]
    return (
        len(state) == 4
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and 16 <= head_dim <= 128
        and shapes == [(head_dim, 4 * head_dim), (1, 4 * head_dim), (4 * head_dim, head_dim), (1, head_dim)]
    )


def ttt_mlp_chunk_forward_triton(
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
    """TTT-MLP over mini-batch slots, without gradients. q, k, v: [B, H, M, b, f] (fp32 or half precision); lr:
    [B, H, M, b]; state [W1, c1, W2, c2] and acc: fp32-castable [B, H, ...] (broadcast views are fine); span: [B]
    slots up to each row's last token (its mini-batch m commits when (m + 1) * b <= span); the slots after it must
    be inert (zero inputs and learning rates, as `SlotLayout` makes them).
    Returns the output [B, H, M, b, f] fp32, the new state and accumulator (new tensors; the inputs are not
    modified)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*state, *acc, q, k, v, lr, tau, ln_weight, ln_bias)):
        raise RuntimeError("ttt_mlp_chunk_forward_triton has no backward: call it without gradients (torch.no_grad)")
    if not mlp_kernel_supported(state, q):
        raise ValueError(
            "state must be TTT-MLP's [W1, c1, W2, c2] with 4f hidden units, q fp32/bf16/fp16 with head_dim 16..128; "
            f"got state {[tuple(t.shape) for t in state]}, q {tuple(q.shape)} {q.dtype}"
        )
    batch, heads, num_mini_batches, mini_batch, head_dim = q.shape
    tensors = [t.expand(batch, heads, *t.shape[2:]).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
               for t in (*state, *acc)]
    f_pad = triton.next_power_of_2(head_dim)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    _ttt_mlp_chunk_forward_kernel[(batch * heads,)](
        q.contiguous(), k.contiguous(), v.contiguous(), lr.float().contiguous(), tau.float().contiguous(),
        ln_weight.float().contiguous(), ln_bias.float().contiguous(), span.to(torch.int32).contiguous(),
        *tensors, out, heads, num_mini_batches, eps,
        F=head_dim, F_PAD=f_pad, N=4 * head_dim, BLOCK=min(max(TILE_ELEMENTS // f_pad, 16), 4 * f_pad),
        MB=mini_batch, PRECISION=_precision(q), num_warps=NUM_WARPS,
    )
    return out, tensors[:4], tensors[4:]
