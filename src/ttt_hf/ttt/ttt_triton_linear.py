"""Triton kernels of TTT-Linear's chunked dual form (prefill and training, forward and backward); the decode
step is in `ttt_triton_decode`, TTT-MLP's chunk kernels in `ttt_triton_mlp`.

The forward is two kernels: a sequential one per (row, head) that keeps the inner state W [f, f], c [f] and
its accumulator on chip in fp32 and does only what the next state needs (the key pass and the update), and a
parallel one per (mini-batch, row, head) that computes the outputs from the start states and key gradients the
first one wrote, so the serial chain of mini-batches carries two small products instead of six. The backward
splits the same way (see `_chunk_backward`): a parallel pass does all that depends on a mini-batch's own
output gradient, then a sequential one chains the state adjoints (dW, dc; two small products per mini-batch
on the chain) and completes each mini-batch's gradients on the side. The torch reference
`ttt_ops.ttt_chunk_reference` is the numerical definition; `ttt_ops.ttt_chunk` dispatches here.

Shapes: B rows, H heads, f head dim (padded to a power of two F_PAD inside the kernels), b mini-batch, M
mini-batches of the slot layout, G mini-batches per checkpoint group.

Per mini-batch, from its start state (W, c) and accumulator (A, a), the chunk forward computes
    z = k W + c,  g = LN-L2 gradient at z (target v - k),  E = tril(tau_i lr_j),  P = q k^T
    z_q = q W - tau (q A) - (E * (P + 1)) g + c - tau a,  out = q + LN(z_q)
    A' = A + k^T (lr g),  a' = a + sum_j lr_j g_j,  and on commit W -= tau_{b-1} A', c -= tau_{b-1} a', A' = a' = 0.
The backward runs that in reverse (`_ttt_linear_chunk_bwd_local_kernel`, then `_ttt_linear_chunk_bwd_state_kernel`);
it needs each mini-batch's start state, which the forward stores every G mini-batches and the backward
recomputes from there (with G = 1 the forward keeps them all). The key gradient's reverse mode is linear in
its cotangent, so dW_before = dW_after + (a part that depends on the mini-batch's own output gradient only) +
k^T J(lr (k dA_end + da_end)): the first part is computed in parallel, the chain in the sequential pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ttt_triton_common import (
    _chunk_kernel_inputs,
    _commit_one,
    _dot,
    _key_grad_backward,
    _layer_norm,
    _layer_norm_l2_grad,
    _layer_norm_stats,
    _load_mini_batch,
    _load_row,
    _load_tokens,
    _mini_batch_constants,
    _precision,
    _project,
    _token_offsets,
)


@triton.jit
def _tile_indices(MB: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr):
    """Token and column indices of a mini-batch tile [MB, F_PAD], and offsets and mask of an [F, F] state tile."""
    tokens = tl.arange(0, MB)
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    return tokens, cols, col_mask, cols[:, None] * F + cols[None, :], col_mask[:, None] & col_mask[None, :]


@triton.jit
def _load_square(ptr, index, square, square_mask, F: tl.constexpr):
    return tl.load(ptr + index * F * F + square, mask=square_mask, other=0.0)


@triton.jit
def _store_state(
    w_ptr, c_ptr, acc_w_ptr, acc_c_ptr, index, w, c, acc_w, acc_c, square, square_mask, cols, col_mask, F: tl.constexpr
):
    tl.store(w_ptr + index * F * F + square, w, mask=square_mask)
    tl.store(c_ptr + index * F + cols, c, mask=col_mask)
    tl.store(acc_w_ptr + index * F * F + square, acc_w, mask=square_mask)
    tl.store(acc_c_ptr + index * F + cols, acc_c, mask=col_mask)


@triton.jit
def _dual_output(w, c, acc_w, acc_c, q, k, grad, lr, tau, causal, PRECISION: tl.constexpr, HAS_ACC: tl.constexpr):
    """z_q before the output LayerNorm, with eta and the scores q k^T. Token i sees W - tau_i * (A + sum_{j<=i}
    k_j^T lr_j g_j); the bias term is the same sum without k_j, hence eta * (q k^T + 1). Without HAS_ACC the
    mini-batch starts with no accumulator (acc_w, acc_c unused)."""
    eta = tl.where(causal, tau[:, None] * lr[None, :], 0.0)
    scores = _dot(q, tl.trans(k), PRECISION)
    z_q = _dot(q, w, PRECISION) - _dot(eta * (scores + 1.0), grad, PRECISION) + c[None, :]
    if HAS_ACC:
        z_q -= tau[:, None] * (_dot(q, acc_w, PRECISION) + acc_c[None, :])
    return z_q, eta, scores


@triton.jit
def _accumulate(acc_w, acc_c, k, grad, lr, PRECISION: tl.constexpr):
    weighted = lr[:, None] * grad
    return acc_w + _dot(tl.trans(k), weighted, PRECISION), acc_c + tl.sum(weighted, axis=0)


@triton.jit
def _commit(w, c, acc_w, acc_c, commit, tau_last):
    w, acc_w = _commit_one(w, acc_w, commit, tau_last)
    c, acc_c = _commit_one(c, acc_c, commit, tau_last)
    return w, c, acc_w, acc_c


@triton.jit
def _ttt_linear_chunk_state_kernel(
    k_ptr,
    v_ptr,
    lr_ptr,
    tau_ptr,
    ln_w_ptr,
    ln_b_ptr,
    span_ptr,
    w_ptr,
    c_ptr,
    acc_w_ptr,
    acc_c_ptr,
    w_out_ptr,
    c_out_ptr,
    acc_w_out_ptr,
    acc_c_out_ptr,
    start_w_ptr,
    start_c_ptr,
    grad_out_ptr,
    z_out_ptr,
    ckpt_w_ptr,
    ckpt_c_ptr,
    ckpt_acc_w_ptr,
    ckpt_acc_c_ptr,
    H,
    M,
    FIRST,
    COUNT,
    GROUP,
    NUM_GROUPS,
    eps,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
    SAVE: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    STORE_Z: tl.constexpr,
):
    """The sequential half of the forward, one program per (row, head): mini-batches FIRST..FIRST+COUNT-1 of the
    slot layout [B, H, M, MB, F] in order, doing only what the next state needs (the key pass and the update).
    It writes each mini-batch's start state (W, c) [B*H, COUNT, ...] in start_w's dtype and, as asked, the key
    gradients g [B, H, M, MB, F] fp32 for `_ttt_linear_chunk_output_kernel` (STORE_GRAD) and their pre-
    activations z = k W + c for the backward (STORE_Z); with SAVE, the full state at the start of every GROUP-th
    mini-batch goes to the checkpoints [B*H, NUM_GROUPS, ...] of the backward."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    tokens, cols, col_mask, square, square_mask = _tile_indices(MB, F, F_PAD)

    w = _load_square(w_ptr, bh, square, square_mask, F)
    acc_w = _load_square(acc_w_ptr, bh, square, square_mask, F)
    c = _load_row(c_ptr, bh, cols, col_mask, F)
    acc_c = _load_row(acc_c_ptr, bh, cols, col_mask, F)
    ln_w = _load_row(ln_w_ptr, head, cols, col_mask, F)
    ln_b = _load_row(ln_b_ptr, head, cols, col_mask, F)
    tau_last = tl.load(tau_ptr + MB - 1)
    span = tl.load(span_ptr + row)

    # The next mini-batch's keys, values and rates load while this one computes (the loop is latency-bound).
    following = (bh * M + FIRST) * MB
    upcoming = _token_offsets(following, tokens, cols, F)
    k, v = _load_tokens(k_ptr, upcoming, col_mask), _load_tokens(v_ptr, upcoming, col_mask)
    lr = tl.load(lr_ptr + following + tokens)
    for m in range(FIRST, FIRST + COUNT):
        if SAVE:  # noqa: SIM102 (a constexpr: without SAVE the branch is not compiled)
            if m % GROUP == 0:
                _store_state(
                    ckpt_w_ptr,
                    ckpt_c_ptr,
                    ckpt_acc_w_ptr,
                    ckpt_acc_c_ptr,
                    bh * NUM_GROUPS + m // GROUP,
                    w,
                    c,
                    acc_w,
                    acc_c,
                    square,
                    square_mask,
                    cols,
                    col_mask,
                    F,
                )
        offsets = upcoming
        following = (bh * M + tl.minimum(m + 1, M - 1)) * MB
        upcoming = _token_offsets(following, tokens, cols, F)
        k_next, v_next = _load_tokens(k_ptr, upcoming, col_mask), _load_tokens(v_ptr, upcoming, col_mask)
        lr_next = tl.load(lr_ptr + following + tokens)
        start = bh * COUNT + m - FIRST
        tl.store(start_w_ptr + start * F * F + square, w.to(start_w_ptr.dtype.element_ty), mask=square_mask)
        tl.store(start_c_ptr + start * F + cols, c.to(start_c_ptr.dtype.element_ty), mask=col_mask)
        z = _dot(k, w, PRECISION) + c[None, :]  # every gradient of a mini-batch is taken at its start state
        grad, _, _, _ = _layer_norm_l2_grad(z, v - k, ln_w, ln_b, col_mask, F, eps)
        if STORE_GRAD:
            tl.store(grad_out_ptr + offsets, grad, mask=col_mask[None, :])
        if STORE_Z:
            tl.store(z_out_ptr + offsets, z, mask=col_mask[None, :])
        acc_w, acc_c = _accumulate(acc_w, acc_c, k, grad, lr, PRECISION)
        w, c, acc_w, acc_c = _commit(w, c, acc_w, acc_c, ((m + 1) * MB <= span).to(tl.float32), tau_last)
        k, v, lr = k_next, v_next, lr_next

    _store_state(
        w_out_ptr,
        c_out_ptr,
        acc_w_out_ptr,
        acc_c_out_ptr,
        bh,
        w,
        c,
        acc_w,
        acc_c,
        square,
        square_mask,
        cols,
        col_mask,
        F,
    )


@triton.jit
def _program_mini_batch(i, row, FIRST, COUNT, span_ptr, MB: tl.constexpr, EDGE: tl.constexpr):
    """The mini-batch of program i of a parallel pass over mini-batches FIRST..FIRST+COUNT-1, and whether it runs.
    Only the layout's first mini-batch starts with an accumulator (the cache's) and only a row's mini-batch at
    its span (the partial one) holds real tokens without committing; the ones after it are inert (zero inputs
    and learning rates), where neither matters. Those two take the general code in a launch of their own
    (EDGE: programs i = 0, 1); all others, the bulk, the lean one (no accumulator, a commit)."""
    at_span = tl.load(span_ptr + row) // MB
    if EDGE:
        m = tl.where(i == 0, 0, at_span)
        run = (m >= FIRST) & (m < FIRST + COUNT) & ((i == 0) | (at_span != 0))
    else:
        m = FIRST + i
        run = (m != 0) & (m != at_span)
    return m, run


@triton.jit
def _load_start_state(
    start_w_ptr,
    start_c_ptr,
    acc_w_ptr,
    acc_c_ptr,
    start,
    bh,
    m,
    square,
    square_mask,
    cols,
    col_mask,
    F: tl.constexpr,
    HAS_ACC: tl.constexpr,
):
    """A mini-batch's start state in fp32, with HAS_ACC the accumulator (the cache's at m = 0, else zero;
    without it W and c stand in for the accumulator, which the lean code never reads)."""
    w = _load_square(start_w_ptr, start, square, square_mask, F).to(tl.float32)
    c = _load_row(start_c_ptr, start, cols, col_mask, F).to(tl.float32)
    acc_w, acc_c = w, c
    if HAS_ACC:
        first = (cols * 0 + m) == 0
        acc_w = tl.load(acc_w_ptr + bh * F * F + square, mask=square_mask & first[None, :], other=0.0)
        acc_c = tl.load(acc_c_ptr + bh * F + cols, mask=col_mask & first, other=0.0)
    return w, c, acc_w, acc_c


@triton.jit
def _ttt_linear_chunk_output_kernel(
    q_ptr,
    k_ptr,
    lr_ptr,
    tau_ptr,
    ln_w_ptr,
    ln_b_ptr,
    start_w_ptr,
    start_c_ptr,
    grad_ptr,
    acc_w_ptr,
    acc_c_ptr,
    span_ptr,
    out_ptr,
    H,
    M,
    FIRST,
    COUNT,
    eps,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
    EDGE: tl.constexpr,
):
    """The parallel half of the forward, one program per (mini-batch, row and head) (see `_program_mini_batch`):
    the dual-form output from the mini-batch's start state and key gradients."""
    bh = tl.program_id(1)
    row, head = bh // H, bh % H
    tokens, cols, col_mask, square, square_mask = _tile_indices(MB, F, F_PAD)

    m, run = _program_mini_batch(tl.program_id(0), row, FIRST, COUNT, span_ptr, MB, EDGE)
    if run:
        start = bh * COUNT + m - FIRST
        w, c, acc_w, acc_c = _load_start_state(
            start_w_ptr, start_c_ptr, acc_w_ptr, acc_c_ptr, start, bh, m, square, square_mask, cols, col_mask, F, EDGE
        )
        ln_w, ln_b, tau, causal = _mini_batch_constants(ln_w_ptr, ln_b_ptr, tau_ptr, head, tokens, cols, col_mask, F)
        first_token = (bh * M + m) * MB
        offsets = _token_offsets(first_token, tokens, cols, F)
        q = _load_tokens(q_ptr, offsets, col_mask)
        k = _load_tokens(k_ptr, offsets, col_mask)
        grad = _load_tokens(grad_ptr, offsets, col_mask)
        lr = tl.load(lr_ptr + first_token + tokens)
        z_q, _, _ = _dual_output(w, c, acc_w, acc_c, q, k, grad, lr, tau, causal, PRECISION, EDGE)
        tl.store(out_ptr + offsets, q + _layer_norm(z_q, ln_w, ln_b, col_mask, F, eps), mask=col_mask[None, :])


@triton.jit
def _output_backward(
    w,
    c,
    acc_w,
    acc_c,
    q,
    k,
    grad,
    lr,
    d_out,
    tau,
    ln_w,
    causal,
    col_mask,
    F: tl.constexpr,
    eps,
    PRECISION: tl.constexpr,
    HAS_ACC: tl.constexpr,
):
    """Recomputes z_q and takes out = q + LN(z_q) back to dL/dz_q; returns it with z_hat_q, eta and q k^T."""
    z_q, eta, scores = _dual_output(w, c, acc_w, acc_c, q, k, grad, lr, tau, causal, PRECISION, HAS_ACC)
    z_hat_q, rstd_q = _layer_norm_stats(z_q, col_mask, F, eps)
    d_z_q = _project(d_out * ln_w[None, :], z_hat_q, col_mask, F) * rstd_q[:, None]
    return d_z_q, z_hat_q, eta, scores


@triton.jit
def _key_path_backward(
    d_grad, z_hat, rstd, grad_hat, target, w, ln_w, ln_b, col_mask, F: tl.constexpr, PRECISION: tl.constexpr
):
    """Reverse mode of the key gradient g(z = k W + c, target = v - k) for the cotangent d_grad: dL/dz and the
    shares of d_k, d_v, d_ln_w, d_ln_b. Linear in d_grad, so the local pass and the chain each take their part."""
    d_z, d_grad_hat = _key_grad_backward(d_grad, z_hat, rstd, grad_hat, ln_w, col_mask, F)
    d_target = -d_grad_hat * ln_w[None, :]  # grad_hat = (ln_w z_hat + ln_b - target) ln_w
    d_k = _dot(d_z, tl.trans(w), PRECISION) - d_target
    d_ln_w = tl.sum(d_grad_hat * (2.0 * ln_w[None, :] * z_hat + ln_b[None, :] - target), axis=0)
    return d_z, d_k, d_target, d_ln_w, -tl.sum(d_target, axis=0)


@triton.jit
def _sum_slot(i, bh, COUNT, EDGE: tl.constexpr):
    """Row of program (i, bh)'s partial sums in [COUNT + 3, B*H, ...]: the bulk's i, then the edge launch's (the
    last row is the sequential pass's)."""
    if EDGE:
        slot = (COUNT + i) * tl.num_programs(1) + bh
    else:
        slot = i * tl.num_programs(1) + bh
    return slot


@triton.jit
def _ttt_linear_chunk_bwd_local_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    z_ptr,
    lr_ptr,
    tau_ptr,
    ln_w_ptr,
    ln_b_ptr,
    span_ptr,
    start_w_ptr,
    start_c_ptr,
    acc_w_ptr,
    acc_c_ptr,
    d_out_ptr,
    local_w_ptr,
    local_c_ptr,
    d_q_ptr,
    d_k_ptr,
    d_v_ptr,
    d_lr_ptr,
    d_tau_ptr,
    d_ln_w_ptr,
    d_ln_b_ptr,
    d_acc_w_init_ptr,
    d_acc_c_init_ptr,
    H,
    M,
    FIRST,
    COUNT,
    START_M,
    START_FIRST,
    eps,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
    EDGE: tl.constexpr,
):
    """The parallel pass of the backward, one program per (mini-batch, row and head) (see `_program_mini_batch`):
    everything that depends on the mini-batch's own output gradient only. With dL/dz_q from the output LayerNorm, it
    writes d_q (final), its shares of d_k, d_v (in their dtype), d_lr [B, H, M, MB, ...] and, fp32, of the adjoint of
    the start (W, c), q^T dz_q + k^T J(-(eta * (q k^T + 1))^T dz_q) with J the key gradient's reverse mode [B*H, COUNT,
    ...], its partial sums of d_tau, d_ln_w, d_ln_b [COUNT + 3, B*H, ...] (zeros where it does not run) and, for the
    layout's first mini-batch, its share of the initial accumulator's adjoint. It reads the start states as the
    sequential pass does (START_M, START_FIRST)."""
    bh = tl.program_id(1)
    row, head = bh // H, bh % H
    tokens, cols, col_mask, square, square_mask = _tile_indices(MB, F, F_PAD)
    d_tau = tl.zeros([MB], dtype=tl.float32)
    d_ln_w = tl.zeros([F_PAD], dtype=tl.float32)
    d_ln_b = tl.zeros([F_PAD], dtype=tl.float32)

    m, run = _program_mini_batch(tl.program_id(0), row, FIRST, COUNT, span_ptr, MB, EDGE)
    if run:
        start = bh * START_M + m - START_FIRST
        w, c, acc_w, acc_c = _load_start_state(
            start_w_ptr, start_c_ptr, acc_w_ptr, acc_c_ptr, start, bh, m, square, square_mask, cols, col_mask, F, EDGE
        )
        ln_w, ln_b, tau, causal = _mini_batch_constants(ln_w_ptr, ln_b_ptr, tau_ptr, head, tokens, cols, col_mask, F)
        first_token = (bh * M + m) * MB
        offsets, q, k, v, lr = _load_mini_batch(q_ptr, k_ptr, v_ptr, lr_ptr, first_token, tokens, cols, col_mask, F)
        z = _load_tokens(z_ptr, offsets, col_mask)
        d_out = _load_tokens(d_out_ptr, offsets, col_mask)
        target = v - k
        grad, z_hat, rstd, grad_hat = _layer_norm_l2_grad(z, target, ln_w, ln_b, col_mask, F, eps)
        d_z_q, z_hat_q, eta, scores = _output_backward(
            w, c, acc_w, acc_c, q, k, grad, lr, d_out, tau, ln_w, causal, col_mask, F, eps, PRECISION, EDGE
        )
        d_ln_w += tl.sum(d_out * z_hat_q, axis=0)
        d_ln_b += tl.sum(d_out, axis=0)

        # z_q = q W - tau (q A) - (eta * (q k^T + 1)) g + c - tau a;  out = q + LN(z_q).
        d_q = d_out + _dot(d_z_q, tl.trans(w), PRECISION)
        tau_d_z_q = tau[:, None] * d_z_q
        if EDGE:
            d_q -= _dot(tau_d_z_q, tl.trans(acc_w), PRECISION)
            d_tau -= tl.sum(d_z_q * (_dot(q, acc_w, PRECISION) + acc_c[None, :]), axis=1)
        d_grad = -_dot(tl.trans(eta * (scores + 1.0)), d_z_q, PRECISION)
        d_mix = tl.where(causal, -_dot(d_z_q, tl.trans(grad), PRECISION), 0.0)
        d_eta = d_mix * (scores + 1.0)
        d_scores = d_mix * eta
        d_q += _dot(d_scores, k, PRECISION)
        d_tau += tl.sum(d_eta * lr[None, :], axis=1)
        d_z, d_k, d_v, d_ln_w_key, d_ln_b_key = _key_path_backward(
            d_grad, z_hat, rstd, grad_hat, target, w, ln_w, ln_b, col_mask, F, PRECISION
        )
        d_ln_w += d_ln_w_key
        d_ln_b += d_ln_b_key
        d_k += _dot(tl.trans(d_scores), q, PRECISION)

        local = bh * COUNT + m - FIRST
        tl.store(
            local_w_ptr + local * F * F + square,
            _dot(tl.trans(q), d_z_q, PRECISION) + _dot(tl.trans(k), d_z, PRECISION),
            mask=square_mask,
        )
        tl.store(local_c_ptr + local * F + cols, tl.sum(d_z_q + d_z, axis=0), mask=col_mask)
        tl.store(d_q_ptr + offsets, d_q.to(d_q_ptr.dtype.element_ty), mask=col_mask[None, :])
        tl.store(d_k_ptr + offsets, d_k.to(d_k_ptr.dtype.element_ty), mask=col_mask[None, :])
        tl.store(d_v_ptr + offsets, d_v.to(d_v_ptr.dtype.element_ty), mask=col_mask[None, :])
        tl.store(d_lr_ptr + first_token + tokens, tl.sum(d_eta * tau[:, None], axis=0))
        if EDGE:  # noqa: SIM102 (a constexpr: the runtime test is compiled into the edge launch only)
            if m == 0:
                tl.store(
                    d_acc_w_init_ptr + bh * F * F + square, -_dot(tl.trans(q), tau_d_z_q, PRECISION), mask=square_mask
                )
                tl.store(d_acc_c_init_ptr + bh * F + cols, -tl.sum(tau_d_z_q, axis=0), mask=col_mask)
    slot = _sum_slot(tl.program_id(0), bh, COUNT, EDGE)
    tl.store(d_tau_ptr + slot * MB + tokens, d_tau)
    tl.store(d_ln_w_ptr + slot * F + cols, d_ln_w, mask=col_mask)
    tl.store(d_ln_b_ptr + slot * F + cols, d_ln_b, mask=col_mask)


@triton.jit
def _ttt_linear_chunk_bwd_state_kernel(
    k_ptr,
    v_ptr,
    z_ptr,
    lr_ptr,
    tau_ptr,
    ln_w_ptr,
    ln_b_ptr,
    span_ptr,
    start_w_ptr,
    acc_w_ptr,
    acc_c_ptr,
    local_w_ptr,
    local_c_ptr,
    d_w_ptr,
    d_c_ptr,
    d_acc_w_ptr,
    d_acc_c_ptr,
    d_k_ptr,
    d_v_ptr,
    d_lr_ptr,
    d_tau_ptr,
    d_ln_w_ptr,
    d_ln_b_ptr,
    d_acc_w_init_ptr,
    d_acc_c_init_ptr,
    H,
    M,
    FIRST,
    COUNT,
    START_M,
    START_FIRST,
    eps,
    F: tl.constexpr,
    F_PAD: tl.constexpr,
    MB: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The sequential pass of the backward, one program per (row, head), mini-batches FIRST + COUNT - 1 down to FIRST:
    the chain of the state adjoints, dW_before = dW_after + local + k^T J(lr (k dA_end + da_end)), with dA_end =
    -tau_last dW_after at a commit and the final accumulator's adjoint past a row's last commit (the inert mini-batches
    after it pass it on unchanged), and on the side what the chain adds to each mini-batch's gradients: through the
    accumulation (d_k, d_lr), the key gradient (d_k, d_v, d_ln_w, d_ln_b) and the commit (d_tau at the last position).
    It completes d_k, d_v and d_lr in place from the local pass's shares, and the initial accumulator's adjoint. d_w,
    d_c hold the adjoints after the segment on entry and before it on exit. Mini-batch m's start state is row bh *
    START_M + m - START_FIRST of start_w (the segment's recomputed ones, or all that the forward kept), its local
    adjoint row bh * COUNT + m - FIRST."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    tokens, cols, col_mask, square, square_mask = _tile_indices(MB, F, F_PAD)

    ln_w = _load_row(ln_w_ptr, head, cols, col_mask, F)
    ln_b = _load_row(ln_b_ptr, head, cols, col_mask, F)
    tau_last = tl.load(tau_ptr + MB - 1)
    span = tl.load(span_ptr + row)
    d_w = _load_square(d_w_ptr, bh, square, square_mask, F)
    d_c = _load_row(d_c_ptr, bh, cols, col_mask, F)
    d_tau_last = tl.zeros([], dtype=tl.float32)
    d_ln_w = tl.zeros([F_PAD], dtype=tl.float32)
    d_ln_b = tl.zeros([F_PAD], dtype=tl.float32)

    # The previous mini-batch's inputs load while this one computes (the loop is latency-bound).
    last = (bh * M + FIRST + COUNT - 1) * MB
    upcoming = _token_offsets(last, tokens, cols, F)
    k, v, z = (
        _load_tokens(k_ptr, upcoming, col_mask),
        _load_tokens(v_ptr, upcoming, col_mask),
        _load_tokens(z_ptr, upcoming, col_mask),
    )
    d_k_local, d_v_local = _load_tokens(d_k_ptr, upcoming, col_mask), _load_tokens(d_v_ptr, upcoming, col_mask)
    lr, d_lr = tl.load(lr_ptr + last + tokens), tl.load(d_lr_ptr + last + tokens)
    start = bh * START_M + FIRST - START_FIRST  # the segment's first mini-batch in the start states
    w = _load_square(start_w_ptr, start + COUNT - 1, square, square_mask, F).to(tl.float32)
    local_w = _load_square(local_w_ptr, bh * COUNT + COUNT - 1, square, square_mask, F)
    local_c = _load_row(local_c_ptr, bh * COUNT + COUNT - 1, cols, col_mask, F)
    for i_back in range(COUNT):
        i = COUNT - 1 - i_back
        m = FIRST + i
        offsets = upcoming
        earlier = tl.maximum(i - 1, 0)
        previous = (bh * M + FIRST + earlier) * MB
        upcoming = _token_offsets(previous, tokens, cols, F)
        k_next, v_next = _load_tokens(k_ptr, upcoming, col_mask), _load_tokens(v_ptr, upcoming, col_mask)
        z_next = _load_tokens(z_ptr, upcoming, col_mask)
        d_k_local_next = _load_tokens(d_k_ptr, upcoming, col_mask)
        d_v_local_next = _load_tokens(d_v_ptr, upcoming, col_mask)
        lr_next, d_lr_next = tl.load(lr_ptr + previous + tokens), tl.load(d_lr_ptr + previous + tokens)
        w_next = _load_square(start_w_ptr, start + earlier, square, square_mask, F).to(tl.float32)
        local_w_next = _load_square(local_w_ptr, bh * COUNT + earlier, square, square_mask, F)
        local_c_next = _load_row(local_c_ptr, bh * COUNT + earlier, cols, col_mask, F)

        target = v - k
        grad, z_hat, rstd, grad_hat = _layer_norm_l2_grad(z, target, ln_w, ln_b, col_mask, F, eps)
        weighted = lr[:, None] * grad
        # Accumulation A_end = A + k^T (lr g): d_weighted = k dA_end + da_end, d_k = (lr g) dA_end^T.
        if (m + 1) * MB <= span:  # a commit, W' = W - tau_last A_end: dA_end = -tau_last dW'
            k_d_w = _dot(k, d_w, PRECISION)
            d_weighted = -tau_last * (k_d_w + d_c[None, :])
            d_k = -tau_last * _dot(weighted, tl.trans(d_w), PRECISION)
            d_tau_last -= tl.sum(tl.sum(k_d_w * weighted, axis=1), axis=0) + tl.sum(
                d_c * tl.sum(weighted, axis=0), axis=0
            )
            d_acc_w_end, d_acc_c_end = -tau_last * d_w, -tau_last * d_c
        else:  # the accumulator reaches the end (the final accumulator's adjoint, from cache)
            d_acc_w_end = _load_square(d_acc_w_ptr, bh, square, square_mask, F)
            d_acc_c_end = _load_row(d_acc_c_ptr, bh, cols, col_mask, F)
            d_weighted = _dot(k, d_acc_w_end, PRECISION) + d_acc_c_end[None, :]
            d_k = _dot(weighted, tl.trans(d_acc_w_end), PRECISION)
        if m == 0:  # the layout's first mini-batch starts from the cache's accumulator
            commit = ((m + 1) * MB <= span).to(tl.float32)
            acc_w = _load_square(acc_w_ptr, bh, square, square_mask, F)
            acc_c = _load_row(acc_c_ptr, bh, cols, col_mask, F)
            d_tau_last -= commit * (tl.sum(tl.sum(d_w * acc_w, axis=1), axis=0) + tl.sum(d_c * acc_c, axis=0))
            d_init_w = d_acc_w_init_ptr + bh * F * F + square
            d_init_c = d_acc_c_init_ptr + bh * F + cols
            tl.store(d_init_w, tl.load(d_init_w, mask=square_mask, other=0.0) + d_acc_w_end, mask=square_mask)
            tl.store(d_init_c, tl.load(d_init_c, mask=col_mask, other=0.0) + d_acc_c_end, mask=col_mask)
        d_z, d_k_key, d_v, d_ln_w_key, d_ln_b_key = _key_path_backward(
            lr[:, None] * d_weighted, z_hat, rstd, grad_hat, target, w, ln_w, ln_b, col_mask, F, PRECISION
        )
        d_ln_w += d_ln_w_key
        d_ln_b += d_ln_b_key
        tl.store(d_k_ptr + offsets, (d_k_local + d_k + d_k_key).to(d_k_ptr.dtype.element_ty), mask=col_mask[None, :])
        tl.store(d_v_ptr + offsets, (d_v_local + d_v).to(d_v_ptr.dtype.element_ty), mask=col_mask[None, :])
        tl.store(d_lr_ptr + (bh * M + m) * MB + tokens, d_lr + tl.sum(d_weighted * grad, axis=1))
        d_w += local_w + _dot(tl.trans(k), d_z, PRECISION)
        d_c += local_c + tl.sum(d_z, axis=0)
        k, v, z, lr, d_lr, w = k_next, v_next, z_next, lr_next, d_lr_next, w_next
        local_w, local_c, d_k_local, d_v_local = local_w_next, local_c_next, d_k_local_next, d_v_local_next

    tl.store(d_w_ptr + bh * F * F + square, d_w, mask=square_mask)
    tl.store(d_c_ptr + bh * F + cols, d_c, mask=col_mask)
    slot = (COUNT + 2) * tl.num_programs(0) + bh
    tl.store(d_tau_ptr + slot * MB + tokens, tl.where(tokens == MB - 1, d_tau_last, 0.0))
    tl.store(d_ln_w_ptr + slot * F + cols, d_ln_w, mask=col_mask)
    tl.store(d_ln_b_ptr + slot * F + cols, d_ln_b, mask=col_mask)


def _state_views(state: list[torch.Tensor], acc: list[torch.Tensor]) -> list[torch.Tensor]:
    """W [B,H,f,f], c [B,H,1,f] and their accumulators as contiguous fp32 tensors."""
    return [t.float().contiguous() for t in (*state, *acc)]


# Launch parameters of each kernel for head dims up to 64 and above, from kernels/tune_ttt.py on the H200
# (results/ttt_tune.md: at 64, 4 warps for the parallel backward pass (2: +3.1 ms, 8: +2.1 ms for the whole op)
# and 8 for the sequential one (4: +2.6 ms, 16: +2.9 ms)) and ptxas' resource report (bf16 products, sm_90,
# triton 3.6; spills per thread): at head dim 64 the state kernel 216 registers, the parallel backward pass 228
# (two blocks per multiprocessor), none spilling, the sequential backward pass 296 B; at 128 the sequential
# backward pass spills 1.4 KB with 16 warps (2.0 KB with 8), the parallel one (bulk) none with 8 warps (576 B with 4).
LAUNCH = {
    "state": ({"num_warps": 4}, {"num_warps": 8}),
    "output": ({"num_warps": 2}, {"num_warps": 4}),
    "bwd_local": ({"num_warps": 4}, {"num_warps": 8}),
    "bwd_state": ({"num_warps": 8}, {"num_warps": 16}),
}


def _launch(kernel: str, head_dim: int) -> dict:
    return LAUNCH[kernel][head_dim > 64]


# What the kernels hand between passes per mini-batch (the start states, from the sequential pass to the
# parallel ones; in the backward also the local state adjoints, from the parallel pass to the sequential one)
# is held for at most this many bytes at a time: longer inputs run in segments of mini-batches (except the
# forward's start states with checkpoint group 1, which the backward keeps whole).
SEGMENT_BYTES = 1 << 29


def _start_dtype(x: torch.Tensor) -> torch.dtype:
    # Half-precision inputs meet the start states in half-precision products anyway: bf16 halves their traffic.
    return torch.float32 if x.dtype == torch.float32 else torch.bfloat16


def _segment(num_mb: int, rows: int, bytes_per_mini_batch: int, multiple: int = 1) -> int:
    """Mini-batches per segment: a multiple of `multiple` (the backward starts segments at checkpoints)."""
    fits = SEGMENT_BYTES // (rows * bytes_per_mini_batch * multiple)
    return min(max(1, fits) * multiple, num_mb)


def _meta(q: torch.Tensor) -> dict:
    head_dim, mini_batch = q.shape[-1], q.shape[-2]
    return dict(F=head_dim, F_PAD=triton.next_power_of_2(head_dim), MB=mini_batch, PRECISION=_precision(q))


def _parallel_pass(kernel, count: int, rows: int, *args, **meta) -> None:
    """A parallel pass over `count` mini-batches: the bulk with the lean code, then the two edge mini-batches
    of each row with the general one (see `_program_mini_batch`)."""
    kernel[(count, rows)](*args, EDGE=False, **meta)
    kernel[(2, rows)](*args, EDGE=True, **meta)


def _chunk_forward(q, k, v, lr, tau, ln_weight, ln_bias, span, w, c, acc_w, acc_c, eps, group):
    """Launches the forward kernels. For the backward, `group > 1` also returns the state every `group`
    mini-batches; `group == 1` every mini-batch's start state and pre-activations with the initial accumulator."""
    batch, heads, num_mb, mini_batch, head_dim = q.shape
    rows = batch * heads
    keep, save = group == 1, group > 1
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    grad = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    pre_activations = torch.empty_like(grad) if keep else grad
    state = [w, c, acc_w, acc_c]
    new = [torch.empty_like(t) for t in state]
    num_groups = triton.cdiv(num_mb, group) if save else 1
    checkpoints = [t.new_empty(rows, num_groups, *t.shape[2:]) for t in state] if save else new
    start_dtype = _start_dtype(q)
    segment = num_mb if keep else _segment(num_mb, rows, (head_dim * head_dim + head_dim) * start_dtype.itemsize)
    start_w = torch.empty(rows, segment, head_dim, head_dim, dtype=start_dtype, device=q.device)
    start_c = torch.empty(rows, segment, head_dim, dtype=start_dtype, device=q.device)
    meta = _meta(q)
    for first in range(0, num_mb, segment):
        count = min(segment, num_mb - first)
        if first:  # this segment continues from the last one's final state
            state, new = new, [torch.empty_like(t) for t in new]
        _ttt_linear_chunk_state_kernel[(rows,)](
            k,
            v,
            lr,
            tau,
            ln_weight,
            ln_bias,
            span,
            *state,
            *new,
            start_w,
            start_c,
            grad,
            pre_activations,
            *checkpoints,
            heads,
            num_mb,
            first,
            count,
            max(group, 1),
            num_groups,
            eps,
            SAVE=save,
            STORE_GRAD=True,
            STORE_Z=keep,
            **meta,
            **_launch("state", head_dim),
        )
        _parallel_pass(
            _ttt_linear_chunk_output_kernel,
            count,
            rows,
            q,
            k,
            lr,
            tau,
            ln_weight,
            ln_bias,
            start_w,
            start_c,
            grad,
            acc_w,
            acc_c,
            span,
            out,
            heads,
            num_mb,
            first,
            count,
            eps,
            **meta,
            **_launch("output", head_dim),
        )
    saved = [start_w, start_c, pre_activations, acc_w, acc_c] if keep else checkpoints
    return out, new, saved


def _chunk_backward(q, k, v, lr, tau, ln_weight, ln_bias, span, saved, group, eps, d_out, d_state):
    """Launches the backward kernels over segments of mini-batches from the last (whole checkpoint groups).
    Per segment: with checkpoints (`group > 1`), the start states and pre-activations are recomputed from the
    segment's checkpoint (the forward's sequential kernel; `group == 1` kept them all), a parallel pass computes
    each mini-batch's local share of its gradients and of its state adjoint, and a sequential pass chains the
    adjoints through the segment and completes the gradients.
    d_state (the final state's adjoints) comes back as the initial state's (dW, dc) and accumulator adjoints."""
    batch, heads, num_mb, mini_batch, head_dim = q.shape
    rows, square = batch * heads, head_dim * head_dim
    keep = group == 1
    start_dtype = _start_dtype(q)
    if keep:  # segments bound the local adjoints only
        start_w, start_c, pre_activations, *acc_init = saved
        segment = _segment(num_mb, rows, (square + head_dim) * 4)
    else:
        segment = _segment(num_mb, rows, (square + head_dim) * (start_dtype.itemsize + 4), multiple=group)
        start_w = q.new_empty(rows, segment, head_dim, head_dim, dtype=start_dtype)
        start_c = q.new_empty(rows, segment, head_dim, dtype=start_dtype)
        pre_activations = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        recomputed_end = [torch.empty_like(ckpt[:, 0]) for ckpt in saved]  # the state kernel's end state: unused
    local_w = q.new_empty(rows, segment, head_dim, head_dim, dtype=torch.float32)
    local_c = q.new_empty(rows, segment, head_dim, dtype=torch.float32)
    # The local pass writes its shares of d_k and d_v here; the sequential pass completes them in place.
    d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_lr = torch.empty_like(lr)
    d_acc_init = [torch.zeros_like(d) for d in d_state[2:]]
    d_tau = tau.new_empty(segment + 3, rows, mini_batch)  # partial sums: bulk, edge and sequential programs
    d_ln = ln_weight.new_empty(2, segment + 3, rows, head_dim)
    sums = [tau.new_zeros(mini_batch), ln_weight.new_zeros(2, heads, head_dim)]
    meta = _meta(q)
    for first in reversed(range(0, num_mb, segment)):
        count = min(segment, num_mb - first)
        if keep:
            start_m, start_first = num_mb, 0
        else:
            state = [ckpt[:, first // group].contiguous() for ckpt in saved]
            acc_init = state[2:]  # read at the layout's first mini-batch only, where it is the initial one
            _ttt_linear_chunk_state_kernel[(rows,)](
                k,
                v,
                lr,
                tau,
                ln_weight,
                ln_bias,
                span,
                *state,
                *recomputed_end,
                start_w,
                start_c,
                pre_activations,
                pre_activations,
                *saved,
                heads,
                num_mb,
                first,
                count,
                group,
                saved[0].shape[1],
                eps,
                SAVE=False,
                STORE_GRAD=False,
                STORE_Z=True,
                **meta,
                **_launch("state", head_dim),
            )
            start_m, start_first = count, first
        _parallel_pass(
            _ttt_linear_chunk_bwd_local_kernel,
            count,
            rows,
            q,
            k,
            v,
            pre_activations,
            lr,
            tau,
            ln_weight,
            ln_bias,
            span,
            start_w,
            start_c,
            *acc_init,
            d_out,
            local_w,
            local_c,
            d_q,
            d_k,
            d_v,
            d_lr,
            d_tau,
            *d_ln,
            *d_acc_init,
            heads,
            num_mb,
            first,
            count,
            start_m,
            start_first,
            eps,
            **meta,
            **_launch("bwd_local", head_dim),
        )
        _ttt_linear_chunk_bwd_state_kernel[(rows,)](
            k,
            v,
            pre_activations,
            lr,
            tau,
            ln_weight,
            ln_bias,
            span,
            start_w,
            *acc_init,
            local_w,
            local_c,
            *d_state,
            d_k,
            d_v,
            d_lr,
            d_tau,
            *d_ln,
            *d_acc_init,
            heads,
            num_mb,
            first,
            count,
            start_m,
            start_first,
            eps,
            **meta,
            **_launch("bwd_state", head_dim),
        )
        sums[0] += d_tau[: count + 3].sum((0, 1))
        sums[1] += d_ln[:, : count + 3].reshape(2, count + 3, batch, heads, head_dim).sum((1, 2))
    d_ln_w, d_ln_b = (d.view_as(ln_weight) for d in sums[1])
    return d_q, d_k, d_v, d_lr, sums[0], d_ln_w, d_ln_b, [*d_state[:2], *d_acc_init]


class TTTLinearChunk(torch.autograd.Function):
    """The chunk kernels with their backward. Memory: for `group > 1` the forward keeps the state every `group`
    mini-batches (2 (f^2 + f) fp32 per row and head each: W, c and their accumulators) and the backward
    recomputes one segment of whole groups at a time (start states and state adjoints of about `SEGMENT_BYTES`,
    or of one group where that is more); `group == 1` keeps every mini-batch's start state (f^2 + f, bf16 for
    half-precision inputs) and pre-activations (b f fp32) instead, which saves the backward one sequential pass."""

    @staticmethod
    def forward(ctx, q, k, v, lr, tau, ln_weight, ln_bias, span, w, c, acc_w, acc_c, eps, group):
        group = min(group, q.shape[2])
        out, new, saved = _chunk_forward(q, k, v, lr, tau, ln_weight, ln_bias, span, w, c, acc_w, acc_c, eps, group)
        ctx.save_for_backward(q, k, v, lr, tau, ln_weight, ln_bias, span, *saved)
        ctx.eps, ctx.group = eps, group
        return out, *new

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, d_out, d_w, d_c, d_acc_w, d_acc_c):
        q, k, v, lr, tau, ln_weight, ln_bias, span, *saved = ctx.saved_tensors
        # The kernels update the (W, c) adjoints in place: copies (unused outputs arrive as zeros).
        d_state = [
            d.to(torch.float32, memory_format=torch.contiguous_format, copy=True) for d in (d_w, d_c, d_acc_w, d_acc_c)
        ]
        d_out = d_out.float().contiguous()
        d_q, d_k, d_v, d_lr, d_tau, d_ln_w, d_ln_b, d_init = _chunk_backward(
            q, k, v, lr, tau, ln_weight, ln_bias, span, saved, ctx.group, ctx.eps, d_out, d_state
        )
        return d_q, d_k, d_v, d_lr, d_tau, d_ln_w, d_ln_b, None, *d_init, None, None


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
    checkpoint_group: int = 16,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """TTT-Linear over mini-batch slots. q, k, v: [B, H, M, b, f] (fp32 or half precision); lr: [B, H, M, b];
    span: [B] slots up to each row's last token (its mini-batch m commits when (m + 1) * b <= span); the slots
    after it must be inert (zero inputs and learning rates, as `MiniBatchSlots` makes them): outputs and learning-
    rate gradients there are undefined.
    Returns the output [B, H, M, b, f] fp32, the new state [W, c] and accumulator. Differentiable in every
    tensor but span; the backward recomputes groups of `checkpoint_group` mini-batches, or with 1 reads every
    mini-batch's start state, which the forward keeps (see `TTTLinearChunk`)."""
    args = (
        *_chunk_kernel_inputs(q, k, v, lr, tau, ln_weight, ln_bias, span, checkpoint_group),
        *_state_views(state, acc),
        eps,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in args if isinstance(t, torch.Tensor)):
        out, *new = TTTLinearChunk.apply(*args, checkpoint_group)
    else:
        out, new, _ = _chunk_forward(*args, group=0)
    return out, new[:2], new[2:]
