"""Triton kernels of TTT-MLP's chunked dual form (prefill and training, forward and backward).

One program per (row, head) runs the mini-batches in order. The inner state W1 [f, N], c1 [N], W2 [N, f], c2 [f]
(N = 4f hidden units) and its accumulator are 16f^2 + 10f fp32 values per head, more than a program's registers, so they
live in a state record per head (`_pack`: the four tensors, then the accumulator's, flat; L2-resident) and every
mini-batch streams them through registers in blocks of BLOCK hidden units, twice:
1. the key pass: z1 = k W1 + c1, x2 = gelu(z1), z2 = x2 W2 + c2 summed over the blocks, then g2, the LN-L2
   gradient at z2 (target v - k);
2. per block again: g1 = (g2 W2^T) * gelu'(z1), the query's first layer (dual form) and its activation, their
   contributions to the query's second layer, and the accumulator update, written back (and on commit the new
   weights).
Per mini-batch, with E = tril(tau_i lr_j) and (A, a) the accumulator at its start,
    h = q W1 - tau (q A1) - (E * (q k^T + 1)) g1 + c1 - tau a1,  x_q = gelu(h)
    z_q = x_q W2 - tau (x_q A2) - (E * (x_q x2^T + 1)) g2 + c2 - tau a2,  out = q + LN(z_q)
    A1' = A1 + k^T (lr g1), A2' = A2 + x2^T (lr g2) (and the biases), on commit W -= tau_{b-1} A', A' = 0.
The backward (`_ttt_mlp_chunk_backward_kernel`) runs each checkpoint group in reverse from the start records the
forward kernel rewrites for it, with the state adjoints in a record of their own.
The torch reference `ttt_ops.ttt_chunk_reference` is the numerical definition; `ttt_ops.ttt_chunk` dispatches here.
Shapes as in `ttt_triton`: B rows, H heads, f head dim (padded to F_PAD), b = MB mini-batch, M mini-batches, G
mini-batches per checkpoint group, R floats per state record.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ttt_triton_common import (
    _chunk_kernel_inputs,
    _commit_one,
    _dot,
    _gelu_tanh,
    _gelu_tanh_grad,
    _key_grad_backward,
    _layer_norm,
    _layer_norm_l2_grad,
    _layer_norm_stats,
    _load_mini_batch,
    _load_tokens,
    _mini_batch_constants,
    _precision,
    _project,
)

# Per kernel, the elements of one [F_PAD, BLOCK] state tile (BLOCK >= 16 for the dots), the warps, the software
# pipeline's stages and the products half-precision inputs take on the GPU (`_precision`), from kernels/tune_ttt.py
# on the H200 (results/ttt_tune_mlp.json, head dim 64, T=8192): the forward 16.5 ms with (2048, 8), 24.9 with
# (1024, 8), 18.8 with (2048, 4); forward + backward 240 ms with (2048, 8) for the backward, 278 with (1024, 8), 256
# with (1024, 4), 742 with (1024, 16), all with 3 stages and TF32 products. ptxas (sm_90, triton 3.6, bf16) reports
# spills for both (at head dim 64 the forward 40 B per thread, the backward 2.4 KB; 1.4 KB with 1024-element tiles):
# the timings, not the spills, chose.
LAUNCH = {
    "forward": {"tile_elements": 2048, "num_warps": 8, "num_stages": 3, "half_products": "tf32"},
    "backward": {"tile_elements": 2048, "num_warps": 8, "num_stages": 3, "half_products": "tf32"},
}


@triton.jit
def _gelu_tanh_grad2(x, tanh):
    """Second derivative of gelu_tanh (the key pass's g1 holds gelu'(z1), whose reverse mode needs it)."""
    slope = 0.79788456 + 0.1070322243 * x * x
    return (1.0 - tanh * tanh) * (slope + x * (0.1070322243 * x - tanh * slope * slope))


@triton.jit
def _block(first, units, cols, col_mask, F: tl.constexpr, N: tl.constexpr):
    """Hidden units n = [first, first + BLOCK), their mask, and the offsets and masks of their W1 [F_PAD, BLOCK] and
    W2 [BLOCK, F_PAD] tiles in a state record (W1 at 0, c1 at F N, W2 at F N + N, c2 at 2 F N + N)."""
    n = first + units
    n_mask = n < N
    offsets1, mask1 = cols[:, None] * N + n[None, :], col_mask[:, None] & n_mask[None, :]
    offsets2, mask2 = F * N + N + n[:, None] * F + cols[None, :], n_mask[:, None] & col_mask[None, :]
    return n, n_mask, offsets1, mask1, offsets2, mask2


@triton.jit
def _load_block(ptr, n, n_mask, offsets1, mask1, offsets2, mask2, F: tl.constexpr, N: tl.constexpr):
    """W1, c1, W2 of a block of hidden units from the record at ptr (or the same of its accumulator at ptr + half)."""
    w1 = tl.load(ptr + offsets1, mask=mask1, other=0.0)
    c1 = tl.load(ptr + F * N + n, mask=n_mask, other=0.0)
    w2 = tl.load(ptr + offsets2, mask=mask2, other=0.0)
    return w1, c1, w2


@triton.jit
def _store_block(ptr, w1, c1, w2, n, n_mask, offsets1, mask1, offsets2, mask2, F: tl.constexpr, N: tl.constexpr):
    tl.store(ptr + offsets1, w1, mask=mask1)
    tl.store(ptr + F * N + n, c1, mask=n_mask)
    tl.store(ptr + offsets2, w2, mask=mask2)


@triton.jit
def _key_output(
    k,
    s_ptr,
    c2,
    units,
    cols,
    col_mask,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """z2 = gelu(k W1 + c1) W2 + c2 of the keys at the state record s_ptr, summed over the blocks."""
    z2 = tl.zeros([MB, F_PAD], tl.float32) + c2[None, :]
    for first in range(0, N, BLOCK):
        n, n_mask, offsets1, mask1, offsets2, mask2 = _block(first, units, cols, col_mask, F, N)
        w1, c1, w2 = _load_block(s_ptr, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
        z2 += _dot(_gelu_tanh(_dot(k, w1, PRECISION) + c1[None, :])[0], w2, PRECISION)
    return z2


@triton.jit
def _query_block(q, k, g2, key_scores, tau, w1, c1, w2, acc_w1, acc_c1, PRECISION: tl.constexpr):
    """A block's key activations and gradient g1 (through gelu'(z1) = `gelu_grad`), and the query's first layer h
    (dual form) with its activation x_q and tanh."""
    z1 = _dot(k, w1, PRECISION) + c1[None, :]
    x2, tanh = _gelu_tanh(z1)
    back = _dot(g2, tl.trans(w2), PRECISION)  # g2 W2^T
    gelu_grad = _gelu_tanh_grad(z1, tanh)
    g1 = back * gelu_grad
    h = (
        _dot(q, w1, PRECISION)
        - tau[:, None] * (_dot(q, acc_w1, PRECISION) + acc_c1[None, :])
        - _dot(key_scores, g1, PRECISION)
        + c1[None, :]
    )
    x_q, tanh_h = _gelu_tanh(h)
    return z1, x2, tanh, back, gelu_grad, g1, h, x_q, tanh_h


@triton.jit
def _program_constants(
    ln_w_ptr,
    ln_b_ptr,
    tau_ptr,
    span_ptr,
    H,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    MB: tl.constexpr,
):
    """Program (row, head) = bh's index vectors, its head's LayerNorm parameters, tau (and its last entry), the
    causal mask of the dual form and its row's span."""
    bh = tl.program_id(0)
    tokens = tl.arange(0, MB)
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    ln_w, ln_b, tau, causal = _mini_batch_constants(ln_w_ptr, ln_b_ptr, tau_ptr, bh % H, tokens, cols, col_mask, F)
    return (
        bh,
        tokens,
        cols,
        col_mask,
        tl.arange(0, BLOCK),
        ln_w,
        ln_b,
        tau,
        causal,
        tl.load(tau_ptr + MB - 1),
        tl.load(span_ptr + bh // H),
    )


@triton.jit
def _query_sweep(
    q,
    k,
    g2,
    key_scores,
    lr,
    weighted2,
    tau,
    commit,
    tau_last,
    s_ptr,
    start_ptr,
    units,
    cols,
    col_mask,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
    OUTPUT: tl.constexpr,
    UPDATE: tl.constexpr,
    STARTS: tl.constexpr,
):
    """The second sweep over the blocks of the record at s_ptr. OUTPUT: returns the query's second-layer terms
    x_q W2 - tau (x_q A2) [MB, F_PAD] and the scores x_q x2^T [MB, MB] summed over the blocks (else zeros).
    UPDATE: writes the accumulator update and the commit back (STARTS: the start record to start_ptr first)."""
    HALF: tl.constexpr = 2 * F * N + N + F
    z_q = tl.zeros([MB, F_PAD], tl.float32)
    hidden_scores = tl.zeros([MB, MB], tl.float32)
    for first in range(0, N, BLOCK):
        n, n_mask, offsets1, mask1, offsets2, mask2 = _block(first, units, cols, col_mask, F, N)
        w1, c1, w2 = _load_block(s_ptr, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
        acc_w1, acc_c1, acc_w2 = _load_block(s_ptr + HALF, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
        if STARTS:
            _store_block(start_ptr, w1, c1, w2, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            _store_block(start_ptr + HALF, acc_w1, acc_c1, acc_w2, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
        z1, x2, tanh, back, gelu_grad, g1, h, x_q, tanh_h = _query_block(
            q, k, g2, key_scores, tau, w1, c1, w2, acc_w1, acc_c1, PRECISION
        )
        if OUTPUT:
            z_q += _dot(x_q, w2, PRECISION) - tau[:, None] * _dot(x_q, acc_w2, PRECISION)
            hidden_scores += _dot(x_q, tl.trans(x2), PRECISION)
        if UPDATE:
            weighted1 = lr[:, None] * g1
            w1, acc_w1 = _commit_one(w1, acc_w1 + _dot(tl.trans(k), weighted1, PRECISION), commit, tau_last)
            c1, acc_c1 = _commit_one(c1, acc_c1 + tl.sum(weighted1, axis=0), commit, tau_last)
            w2, acc_w2 = _commit_one(w2, acc_w2 + _dot(tl.trans(x2), weighted2, PRECISION), commit, tau_last)
            _store_block(s_ptr, w1, c1, w2, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            _store_block(s_ptr + HALF, acc_w1, acc_c1, acc_w2, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
    return z_q, hidden_scores


@triton.jit
def _ttt_mlp_chunk_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    tau_ptr,
    ln_w_ptr,
    ln_b_ptr,
    span_ptr,
    state_ptr,
    out_ptr,
    starts_ptr,
    H,
    M,
    FIRST,
    COUNT,
    SLOTS,
    eps,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
    STARTS: tl.constexpr,
):
    """Program (row, head): mini-batches FIRST..FIRST+COUNT-1 of the slot layout [B, H, M, MB, F]; the state records
    [B*H, R] hold the start state and end with the state after them; out [B, H, M, MB, F] fp32. With STARTS
    (the backward's recomputation) each mini-batch's start record goes to starts [B*H, SLOTS, R] instead of its
    outputs to out (the query's path is not computed)."""
    bh, tokens, cols, col_mask, units, ln_w, ln_b, tau, causal, tau_last, span = _program_constants(
        ln_w_ptr, ln_b_ptr, tau_ptr, span_ptr, H, F, F_PAD, BLOCK, MB
    )
    C2: tl.constexpr = 2 * F * N + N
    HALF: tl.constexpr = 2 * F * N + N + F  # the accumulator's offset in a record
    s_ptr = state_ptr + bh.to(tl.int64) * (2 * HALF)  # int64: B*H*R may pass 2^31

    for m in range(FIRST, FIRST + COUNT):
        offsets, q, k, v, lr = _load_mini_batch(
            q_ptr, k_ptr, v_ptr, lr_ptr, (bh * M + m) * MB, tokens, cols, col_mask, F
        )
        commit = ((m + 1) * MB <= span).to(tl.float32)
        start_ptr = starts_ptr + (bh.to(tl.int64) * SLOTS + m - FIRST) * (2 * HALF)
        c2 = tl.load(s_ptr + C2 + cols, mask=col_mask, other=0.0)
        acc_c2 = tl.load(s_ptr + HALF + C2 + cols, mask=col_mask, other=0.0)
        if STARTS:
            tl.store(start_ptr + C2 + cols, c2, mask=col_mask)
            tl.store(start_ptr + HALF + C2 + cols, acc_c2, mask=col_mask)

        z2 = _key_output(k, s_ptr, c2, units, cols, col_mask, F, F_PAD, N, BLOCK, MB, PRECISION)
        g2 = _layer_norm_l2_grad(z2, v - k, ln_w, ln_b, col_mask, F, eps)[0]
        weighted2 = lr[:, None] * g2
        eta = tl.where(causal, tau[:, None] * lr[None, :], 0.0)
        key_scores = eta * (_dot(q, tl.trans(k), PRECISION) + 1.0)

        z_q, hidden_scores = _query_sweep(
            q,
            k,
            g2,
            key_scores,
            lr,
            weighted2,
            tau,
            commit,
            tau_last,
            s_ptr,
            start_ptr,
            units,
            cols,
            col_mask,
            F,
            F_PAD,
            N,
            BLOCK,
            MB,
            PRECISION,
            OUTPUT=not STARTS,
            UPDATE=True,
            STARTS=STARTS,
        )
        if not STARTS:
            z_q += c2[None, :] - tau[:, None] * acc_c2[None, :] - _dot(eta * (hidden_scores + 1.0), g2, PRECISION)
            tl.store(out_ptr + offsets, q + _layer_norm(z_q, ln_w, ln_b, col_mask, F, eps), mask=col_mask[None, :])
        c2, acc_c2 = _commit_one(c2, acc_c2 + tl.sum(weighted2, axis=0), commit, tau_last)
        tl.store(s_ptr + C2 + cols, c2, mask=col_mask)
        tl.store(s_ptr + HALF + C2 + cols, acc_c2, mask=col_mask)
        tl.debug_barrier()  # the next mini-batch's threads read what this one's wrote


@triton.jit
def _ttt_mlp_chunk_backward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lr_ptr,
    tau_ptr,
    ln_w_ptr,
    ln_b_ptr,
    span_ptr,
    starts_ptr,
    d_state_ptr,
    d_out_ptr,
    scratch_ptr,
    d_q_ptr,
    d_k_ptr,
    d_v_ptr,
    d_lr_ptr,
    d_tau_ptr,
    d_ln_w_ptr,
    d_ln_b_ptr,
    H,
    M,
    FIRST,
    COUNT,
    SLOTS,
    eps,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (row, head): the reverse mode of mini-batches FIRST+COUNT-1 down to FIRST from their start records
    starts [B*H, SLOTS, R] (`_ttt_mlp_chunk_forward_kernel` with STARTS). The adjoint record d_state [B*H, R] holds
    the adjoints of the state after the mini-batches on entry and before them on exit; writes dL/dq, dk, dv
    [B, H, M, MB, F] and dL/dlr of their tokens, adds to d_tau [B*H, MB] and d_ln_w, d_ln_b [B*H, F].
    scratch [B*H, 2, MB, N] hands each block's partial dL/dx2 and dL/dz1 from the third sweep to the fourth.
    Per mini-batch four sweeps over the blocks: the keys' z2 (-> g2); the query's z_q (-> dL/dz_q); everything
    that needs dL/dz_q (the query's layers, the accumulation and the commit, g1's reverse mode); then, with the
    LN-L2 gradient's reverse mode done, the key pass's first layer."""
    bh, tokens, cols, col_mask, units, ln_w, ln_b, tau, causal, tau_last, span = _program_constants(
        ln_w_ptr, ln_b_ptr, tau_ptr, span_ptr, H, F, F_PAD, BLOCK, MB
    )
    C2: tl.constexpr = 2 * F * N + N
    HALF: tl.constexpr = 2 * F * N + N + F
    d_ptr = d_state_ptr + bh.to(tl.int64) * (2 * HALF)
    dx2_ptr = scratch_ptr + bh.to(tl.int64) * (2 * MB * N) + tokens[:, None] * N
    dz1_ptr = dx2_ptr + MB * N
    d_tau = tl.zeros([MB], tl.float32)
    d_ln_w = tl.zeros([F_PAD], tl.float32)
    d_ln_b = tl.zeros([F_PAD], tl.float32)

    for i_back in range(COUNT):
        m = FIRST + COUNT - 1 - i_back
        s_ptr = starts_ptr + (bh.to(tl.int64) * SLOTS + m - FIRST) * (2 * HALF)
        offsets, q, k, v, lr = _load_mini_batch(
            q_ptr, k_ptr, v_ptr, lr_ptr, (bh * M + m) * MB, tokens, cols, col_mask, F
        )
        d_out = _load_tokens(d_out_ptr, offsets, col_mask)
        commit = ((m + 1) * MB <= span).to(tl.float32)
        c2 = tl.load(s_ptr + C2 + cols, mask=col_mask, other=0.0)
        acc_c2 = tl.load(s_ptr + HALF + C2 + cols, mask=col_mask, other=0.0)

        # Sweep 1: the keys' output and its LN-L2 gradient g2.
        z2 = _key_output(k, s_ptr, c2, units, cols, col_mask, F, F_PAD, N, BLOCK, MB, PRECISION)
        g2, z_hat, rstd, grad_hat = _layer_norm_l2_grad(z2, v - k, ln_w, ln_b, col_mask, F, eps)
        weighted2 = lr[:, None] * g2
        eta = tl.where(causal, tau[:, None] * lr[None, :], 0.0)
        qk = _dot(q, tl.trans(k), PRECISION)
        key_scores = eta * (qk + 1.0)

        # Sweep 2: the query's z_q, then out = q + LN(z_q) back to dL/dz_q.
        z_q, hidden_scores = _query_sweep(
            q,
            k,
            g2,
            key_scores,
            lr,
            weighted2,
            tau,
            commit,
            tau_last,
            s_ptr,
            s_ptr,
            units,
            cols,
            col_mask,
            F,
            F_PAD,
            N,
            BLOCK,
            MB,
            PRECISION,
            OUTPUT=True,
            UPDATE=False,
            STARTS=False,
        )
        z_q += c2[None, :] - tau[:, None] * acc_c2[None, :]
        hidden_mix = eta * (hidden_scores + 1.0)
        z_q -= _dot(hidden_mix, g2, PRECISION)
        z_hat_q, rstd_q = _layer_norm_stats(z_q, col_mask, F, eps)
        d_z_q = _project(d_out * ln_w[None, :], z_hat_q, col_mask, F) * rstd_q[:, None]
        d_ln_w += tl.sum(d_out * z_hat_q, axis=0)
        d_ln_b += tl.sum(d_out, axis=0)
        tau_d_z_q = tau[:, None] * d_z_q
        d_hidden_mix = tl.where(causal, -_dot(d_z_q, tl.trans(g2), PRECISION), 0.0)
        d_eta = d_hidden_mix * (hidden_scores + 1.0)
        d_hidden_scores = d_hidden_mix * eta

        # Commit: W' = W - commit tau_last A_end, A' = (1 - commit) A_end, A_end = A + (this mini-batch's update).
        d_c2 = tl.load(d_ptr + C2 + cols, mask=col_mask, other=0.0)
        d_acc_c2_end = (1.0 - commit) * tl.load(d_ptr + HALF + C2 + cols, mask=col_mask, other=0.0) - commit * (
            tau_last * d_c2
        )
        d_tau_last = tl.sum(d_c2 * (acc_c2 + tl.sum(weighted2, axis=0)), axis=0)

        # Sweep 3: per block, the reverse mode of the query's two layers, of the accumulation and commit, and of
        # g1 = (g2 W2^T) * gelu'(z1) as far as it does not need dL/dz2.
        d_q = d_out
        d_k = tl.zeros([MB, F_PAD], tl.float32)
        d_g2 = tl.zeros([MB, F_PAD], tl.float32)
        d_weighted2 = tl.zeros([MB, F_PAD], tl.float32) + d_acc_c2_end[None, :]
        d_key_mix = tl.zeros([MB, MB], tl.float32)
        d_tau_h = tl.zeros([MB], tl.float32)  # tau's share through the accumulators in h and z_q
        d_lr = tl.zeros([MB], tl.float32)
        for first in range(0, N, BLOCK):
            n, n_mask, offsets1, mask1, offsets2, mask2 = _block(first, units, cols, col_mask, F, N)
            w1, c1, w2 = _load_block(s_ptr, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            acc_w1, acc_c1, acc_w2 = _load_block(s_ptr + HALF, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            z1, x2, tanh, back, gelu_grad, g1, h, x_q, tanh_h = _query_block(
                q, k, g2, key_scores, tau, w1, c1, w2, acc_w1, acc_c1, PRECISION
            )
            d_w1, d_c1, d_w2 = _load_block(d_ptr, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            d_acc_w1, d_acc_c1, d_acc_w2 = _load_block(d_ptr + HALF, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            weighted1 = lr[:, None] * g1
            d_tau_last += (
                tl.sum(tl.sum(d_w1 * (acc_w1 + _dot(tl.trans(k), weighted1, PRECISION)), axis=1), axis=0)
                + tl.sum(d_c1 * (acc_c1 + tl.sum(weighted1, axis=0)), axis=0)
                + tl.sum(tl.sum(d_w2 * (acc_w2 + _dot(tl.trans(x2), weighted2, PRECISION)), axis=1), axis=0)
            )
            d_acc_w1 = (1.0 - commit) * d_acc_w1 - commit * tau_last * d_w1
            d_acc_c1 = (1.0 - commit) * d_acc_c1 - commit * tau_last * d_c1
            d_acc_w2 = (1.0 - commit) * d_acc_w2 - commit * tau_last * d_w2

            # z_q = x_q W2 - tau (x_q A2) - (eta * (x_q x2^T + 1)) g2 + ...;  A2_end = A2 + x2^T (lr g2).
            d_z_q_acc_w2 = _dot(d_z_q, tl.trans(acc_w2), PRECISION)
            d_tau_h += tl.sum(x_q * d_z_q_acc_w2, axis=1)
            d_x_q = (
                _dot(d_z_q, tl.trans(w2), PRECISION)
                - tau[:, None] * d_z_q_acc_w2
                + _dot(d_hidden_scores, x2, PRECISION)
            )
            d_x2 = _dot(tl.trans(d_hidden_scores), x_q, PRECISION) + _dot(weighted2, tl.trans(d_acc_w2), PRECISION)
            d_weighted2 += _dot(x2, d_acc_w2, PRECISION)
            # h = q W1 - tau (q A1) - (eta * (q k^T + 1)) g1 + c1 - tau a1;  A1_end = A1 + k^T (lr g1).
            d_h = d_x_q * _gelu_tanh_grad(h, tanh_h)
            tau_d_h = tau[:, None] * d_h
            d_q += _dot(d_h, tl.trans(w1), PRECISION) - _dot(tau_d_h, tl.trans(acc_w1), PRECISION)
            d_tau_h += tl.sum(d_h * (_dot(q, acc_w1, PRECISION) + acc_c1[None, :]), axis=1)
            d_key_mix -= _dot(d_h, tl.trans(g1), PRECISION)
            d_weighted1 = _dot(k, d_acc_w1, PRECISION) + d_acc_c1[None, :]
            d_g1 = lr[:, None] * d_weighted1 - _dot(tl.trans(key_scores), d_h, PRECISION)
            d_lr += tl.sum(g1 * d_weighted1, axis=1)
            d_k += _dot(weighted1, tl.trans(d_acc_w1), PRECISION)
            # g1 = (g2 W2^T) * gelu'(z1)
            d_back = d_g1 * gelu_grad
            d_g2 += _dot(d_back, w2, PRECISION)

            d_w1 += _dot(tl.trans(q), d_h, PRECISION)
            d_c1 += tl.sum(d_h, axis=0)
            d_w2 += _dot(tl.trans(x_q), d_z_q, PRECISION) + _dot(tl.trans(d_back), g2, PRECISION)
            _store_block(d_ptr, d_w1, d_c1, d_w2, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            _store_block(
                d_ptr + HALF,
                d_acc_w1 - _dot(tl.trans(q), tau_d_h, PRECISION),
                d_acc_c1 - tl.sum(tau_d_h, axis=0),
                d_acc_w2 - _dot(tl.trans(x_q), tau_d_z_q, PRECISION),
                n,
                n_mask,
                offsets1,
                mask1,
                offsets2,
                mask2,
                F,
                N,
            )
            tl.store(dx2_ptr + n[None, :], d_x2, mask=n_mask[None, :])
            tl.store(dz1_ptr + n[None, :], d_g1 * back * _gelu_tanh_grad2(z1, tanh), mask=n_mask[None, :])

        # The mixing matrices' and the biases' reverse modes, then the LN-L2 gradient's.
        d_g2 += lr[:, None] * d_weighted2 - _dot(tl.trans(hidden_mix), d_z_q, PRECISION)
        d_lr += tl.sum(g2 * d_weighted2, axis=1)
        d_tau -= tl.sum(d_z_q * acc_c2[None, :], axis=1) + d_tau_h
        d_key_mix = tl.where(causal, d_key_mix, 0.0)
        d_eta += d_key_mix * (qk + 1.0)
        d_qk = d_key_mix * eta
        d_q += _dot(d_qk, k, PRECISION)
        d_k += _dot(tl.trans(d_qk), q, PRECISION)
        d_tau += tl.sum(d_eta * lr[None, :], axis=1) + tl.where(tokens == MB - 1, -commit * d_tau_last, 0.0)
        d_lr += tl.sum(d_eta * tau[:, None], axis=0)
        d_z2, d_grad_hat = _key_grad_backward(d_g2, z_hat, rstd, grad_hat, ln_w, col_mask, F)
        target = _load_tokens(v_ptr, offsets, col_mask) - k  # reloaded: v is not kept through the sweeps
        d_ln_w += tl.sum(d_grad_hat * (2.0 * ln_w[None, :] * z_hat + ln_b[None, :] - target), axis=0)
        d_ln_b += tl.sum(d_grad_hat * ln_w[None, :], axis=0)
        d_k += d_grad_hat * ln_w[None, :]
        tl.store(d_ptr + C2 + cols, d_c2 + tl.sum(d_z_q + d_z2, axis=0), mask=col_mask)
        tl.store(d_ptr + HALF + C2 + cols, d_acc_c2_end - tl.sum(tau_d_z_q, axis=0), mask=col_mask)
        tl.debug_barrier()  # sweep 4 reads the scratch and adjoints other threads wrote

        # Sweep 4: z2 = x2 W2 + c2, x2 = gelu(z1), z1 = k W1 + c1.
        for first in range(0, N, BLOCK):
            n, n_mask, offsets1, mask1, offsets2, mask2 = _block(first, units, cols, col_mask, F, N)
            w1, c1, w2 = _load_block(s_ptr, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            z1 = _dot(k, w1, PRECISION) + c1[None, :]
            x2, tanh = _gelu_tanh(z1)
            d_x2 = tl.load(dx2_ptr + n[None, :], mask=n_mask[None, :], other=0.0) + _dot(d_z2, tl.trans(w2), PRECISION)
            d_z1 = tl.load(dz1_ptr + n[None, :], mask=n_mask[None, :], other=0.0) + d_x2 * _gelu_tanh_grad(z1, tanh)
            d_w1, d_c1, d_w2 = _load_block(d_ptr, n, n_mask, offsets1, mask1, offsets2, mask2, F, N)
            _store_block(
                d_ptr,
                d_w1 + _dot(tl.trans(k), d_z1, PRECISION),
                d_c1 + tl.sum(d_z1, axis=0),
                d_w2 + _dot(tl.trans(x2), d_z2, PRECISION),
                n,
                n_mask,
                offsets1,
                mask1,
                offsets2,
                mask2,
                F,
                N,
            )
            d_k += _dot(d_z1, tl.trans(w1), PRECISION)
        tl.store(d_q_ptr + offsets, d_q, mask=col_mask[None, :])
        tl.store(d_k_ptr + offsets, d_k, mask=col_mask[None, :])
        tl.store(d_v_ptr + offsets, -d_grad_hat * ln_w[None, :], mask=col_mask[None, :])
        tl.store(d_lr_ptr + (bh * M + m) * MB + tokens, d_lr)
        tl.debug_barrier()  # the next (earlier) mini-batch reads the adjoints and scratch this one wrote

    tl.store(d_tau_ptr + bh * MB + tokens, tl.load(d_tau_ptr + bh * MB + tokens) + d_tau)
    ln_offsets = bh * F + cols
    tl.store(d_ln_w_ptr + ln_offsets, tl.load(d_ln_w_ptr + ln_offsets, mask=col_mask) + d_ln_w, mask=col_mask)
    tl.store(d_ln_b_ptr + ln_offsets, tl.load(d_ln_b_ptr + ln_offsets, mask=col_mask) + d_ln_b, mask=col_mask)


def mlp_kernel_supported(state: list[torch.Tensor], q: torch.Tensor) -> bool:
    """Whether `ttt_mlp_chunk_triton` handles this state [W1, c1, W2, c2] (hidden 4f) and q [.., f]: fp32, bf16
    or fp16 inputs with head_dim 16..128."""
    head_dim = q.shape[-1]
    shapes = [tuple(t.shape[-2:]) for t in state]
    return (
        len(state) == 4
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and 16 <= head_dim <= 128
        and shapes == [(head_dim, 4 * head_dim), (1, 4 * head_dim), (4 * head_dim, head_dim), (1, head_dim)]
    )


def _pack(tensors: list[torch.Tensor], batch: int, heads: int) -> torch.Tensor:
    """State and accumulator [W1, c1, W2, c2, A1, a1, A2, a2] -> one fp32 record per (row, head) [B*H, R] (a new
    tensor; broadcast views are fine)."""
    return torch.cat([t.expand(batch, heads, *t.shape[2:]).reshape(batch * heads, -1).float() for t in tensors], 1)


def _unpack(record: torch.Tensor, like: list[torch.Tensor], batch: int, heads: int) -> list[torch.Tensor]:
    """The inverse of `_pack`: contiguous fp32 tensors [B, H, ...] shaped like `like`."""
    parts = record.split([t.shape[-2] * t.shape[-1] for t in like], dim=1)
    return [p.reshape(batch, heads, *t.shape[-2:]).contiguous() for p, t in zip(parts, like)]


def _meta(q: torch.Tensor, kernel: str) -> dict:
    launch = LAUNCH[kernel]
    head_dim, f_pad = q.shape[-1], triton.next_power_of_2(q.shape[-1])
    return dict(
        F=head_dim,
        F_PAD=f_pad,
        N=4 * head_dim,
        BLOCK=min(max(launch["tile_elements"] // f_pad, 16), 4 * f_pad),
        MB=q.shape[-2],
        PRECISION=_precision(q, half=launch["half_products"]),
        num_warps=launch["num_warps"],
        num_stages=launch["num_stages"],
    )


def _forward(
    inputs: tuple,
    record: torch.Tensor,
    eps: float,
    first: int,
    count: int,
    out: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
) -> None:
    """Runs mini-batches [first, first + count) on `record` in place, writing their outputs to `out` or (the
    backward's recomputation) their start records to `starts`."""
    q = inputs[0]
    batch, heads, num_mini_batches = q.shape[:3]
    _ttt_mlp_chunk_forward_kernel[(batch * heads,)](
        *inputs,
        record,
        record if out is None else out,
        record if starts is None else starts,
        heads,
        num_mini_batches,
        first,
        count,
        1 if starts is None else starts.shape[1],
        eps,
        STARTS=starts is not None,
        **_meta(q, "forward"),
    )


class TTTMLPChunk(torch.autograd.Function):
    """The chunk kernels with their backward. Memory: the forward keeps the state record every `group`
    mini-batches (R = 16 f^2 + 10 f floats per row and head each); the backward rewrites one group's start
    records at a time (G R floats per row and head)."""

    @staticmethod
    def forward(ctx, q, k, v, lr, tau, ln_weight, ln_bias, span, record, eps, group):
        inputs = (q, k, v, lr, tau, ln_weight, ln_bias, span)
        num_mini_batches = q.shape[2]
        record = record.clone()
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        checkpoints = record.new_empty(triton.cdiv(num_mini_batches, group), *record.shape)
        for index, first in enumerate(range(0, num_mini_batches, group)):
            checkpoints[index].copy_(record)
            _forward(inputs, record, eps, first, min(group, num_mini_batches - first), out=out)
        ctx.save_for_backward(*inputs, checkpoints)
        ctx.eps, ctx.group = eps, group
        return out, record

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's backward is not itself differentiable
    def backward(ctx, d_out, d_record):
        *inputs, checkpoints = ctx.saved_tensors
        q, k, v, lr, tau, ln_weight, ln_bias, span = inputs
        batch, heads, num_mini_batches, mini_batch, head_dim = q.shape
        group, rows = ctx.group, batch * heads
        d_record = d_record.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # updated in place
        d_out = d_out.float().contiguous()
        d_q, d_k, d_v = (torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
        d_lr = torch.empty_like(lr)
        d_tau = tau.new_zeros(rows, mini_batch)
        d_ln_w, d_ln_b = ln_weight.new_zeros(2, rows, head_dim)
        record = torch.empty_like(checkpoints[0])
        starts = record.new_empty(rows, min(group, num_mini_batches), record.shape[1])
        scratch = record.new_empty(rows, 2, mini_batch, 4 * head_dim)
        for index in reversed(range(checkpoints.shape[0])):
            first = index * group
            count = min(group, num_mini_batches - first)
            record.copy_(checkpoints[index])
            _forward(inputs, record, ctx.eps, first, count, starts=starts)
            _ttt_mlp_chunk_backward_kernel[(rows,)](
                *inputs,
                starts,
                d_record,
                d_out,
                scratch,
                d_q,
                d_k,
                d_v,
                d_lr,
                d_tau,
                d_ln_w,
                d_ln_b,
                heads,
                num_mini_batches,
                first,
                count,
                starts.shape[1],
                ctx.eps,
                **_meta(q, "backward"),
            )
        d_ln = [d.view(batch, heads, 1, head_dim).sum(0) for d in (d_ln_w, d_ln_b)]
        return (
            d_q.to(q.dtype),
            d_k.to(k.dtype),
            d_v.to(v.dtype),
            d_lr,
            d_tau.sum(0),
            *d_ln,
            None,
            d_record,
            None,
            None,
        )


def ttt_mlp_chunk_triton(
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
    checkpoint_group: int = 16,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """TTT-MLP over mini-batch slots. q, k, v: [B, H, M, b, f] (fp32 or half precision); lr: [B, H, M, b]; state
    [W1, c1, W2, c2] and acc: fp32-castable [B, H, ...] (broadcast views are fine); span: [B] slots up to each
    row's last token (its mini-batch m commits when (m + 1) * b <= span); the slots after it must be inert (zero
    inputs and learning rates, as `MiniBatchSlots` makes them): outputs and learning-rate gradients there are undefined.
    Returns the output [B, H, M, b, f] fp32, the new state and accumulator (new contiguous tensors; the inputs are
    not modified). Differentiable in every tensor but span; the backward recomputes groups of `checkpoint_group`
    mini-batches."""
    if not mlp_kernel_supported(state, q):
        raise ValueError(
            "state must be TTT-MLP's [W1, c1, W2, c2] with 4f hidden units, q fp32/bf16/fp16 with head_dim 16..128; "
            f"got state {[tuple(t.shape) for t in state]}, q {tuple(q.shape)} {q.dtype}"
        )
    inputs = _chunk_kernel_inputs(q, k, v, lr, tau, ln_weight, ln_bias, span, checkpoint_group)
    batch, heads = q.shape[:2]
    record = _pack([*state, *acc], batch, heads)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, record)):
        out, record = TTTMLPChunk.apply(*inputs, record, eps, checkpoint_group)
    else:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        _forward(inputs, record, eps, 0, q.shape[2], out=out)
    new = _unpack(record, [*state, *acc], batch, heads)
    return out, new[:4], new[4:]
