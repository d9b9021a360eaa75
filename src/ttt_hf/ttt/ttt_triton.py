"""Triton kernels of TTT-Linear's chunked dual form (prefill and training, forward and backward); the decode
step is in `ttt_triton_decode`.

The forward is two kernels: a sequential one per (row, head) that keeps the inner state W [f, f], c [f] and
its accumulator on chip in fp32 and does only what the next state needs (the key pass and the update), and a
parallel one per (mini-batch, row, head) that computes the outputs from the start states and key gradients the
first one wrote, so the serial chain of mini-batches carries two small products instead of six. The backward
is one sequential kernel per (row, head). The torch reference `ttt_ops.ttt_chunk_torch` is the numerical
definition; `ttt_ops.ttt_chunk` dispatches here.

Shapes: B rows, H heads, f head dim (padded to a power of two F_PAD inside the kernels), b mini-batch, M
mini-batches of the slot layout, G mini-batches per checkpoint group.

Per mini-batch, from its start state (W, c) and accumulator (A, a), the chunk forward computes
    z = k W + c,  g = LN-L2 gradient at z (target v - k),  E = tril(tau_i lr_j),  P = q k^T
    z_q = q W - tau (q A) - (E * (P + 1)) g + c - tau a,  out = q + LN(z_q)
    A' = A + k^T (lr g),  a' = a + sum_j lr_j g_j,  and on commit W -= tau_{b-1} A', c -= tau_{b-1} a', A' = a' = 0.
The backward runs that in reverse (see `_chunk_mini_batch_backward`); it needs each mini-batch's start
state, which the forward stores every G mini-batches and the backward recomputes inside each group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _layer_norm_stats(z, col_mask, F: tl.constexpr, eps):
    """Normalised `z` (0 in padded columns) and 1/std per row; z [R, F_PAD]."""
    mean = tl.sum(z, axis=1) / F
    centred = tl.where(col_mask[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / F + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def _project(d, z_hat, col_mask, F: tl.constexpr):
    """`d - mean(d) - z_hat * mean(d * z_hat)` per row: the LayerNorm backward from z_hat to z, before the
    1/std factor. `d` must be 0 in padded columns."""
    d_mean = tl.sum(d, axis=1) / F
    d_z_hat_mean = tl.sum(d * z_hat, axis=1) / F
    return tl.where(col_mask[None, :], d - d_mean[:, None] - z_hat * d_z_hat_mean[:, None], 0.0)


@triton.jit
def _layer_norm(z, weight, bias, col_mask, F: tl.constexpr, eps):
    z_hat, _ = _layer_norm_stats(z, col_mask, F, eps)
    return z_hat * weight[None, :] + bias[None, :]


@triton.jit
def _layer_norm_l2_grad(z, target, weight, bias, col_mask, F: tl.constexpr, eps):
    """Gradient of 0.5 * ||LN(z) - target||^2 with respect to z (LayerNorm backward fused with the loss),
    with the intermediates its own backward reuses: z_hat, 1/std and the gradient with respect to z_hat."""
    z_hat, rstd = _layer_norm_stats(z, col_mask, F, eps)
    grad_hat = (weight[None, :] * z_hat + bias[None, :] - target) * weight[None, :]
    return _project(grad_hat, z_hat, col_mask, F) * rstd[:, None], z_hat, rstd, grad_hat


@triton.jit
def _load_square(ptr, index, square, square_mask, F: tl.constexpr):
    return tl.load(ptr + index * F * F + square, mask=square_mask, other=0.0)


@triton.jit
def _load_row(ptr, index, cols, col_mask, F: tl.constexpr):
    return tl.load(ptr + index * F + cols, mask=col_mask, other=0.0)


@triton.jit
def _store_state(w_ptr, c_ptr, acc_w_ptr, acc_c_ptr, index, w, c, acc_w, acc_c, square, square_mask, cols, col_mask,
                 F: tl.constexpr):
    tl.store(w_ptr + index * F * F + square, w, mask=square_mask)
    tl.store(c_ptr + index * F + cols, c, mask=col_mask)
    tl.store(acc_w_ptr + index * F * F + square, acc_w, mask=square_mask)
    tl.store(acc_c_ptr + index * F + cols, acc_c, mask=col_mask)


@triton.jit
def _token_offsets(first, tokens, cols, F: tl.constexpr):
    """Offsets of tokens [first, first + MB) of the slot layout into [.., F] tensors."""
    return (first + tokens)[:, None] * F + cols[None, :]


@triton.jit
def _load_tokens(ptr, offsets, col_mask):
    return tl.load(ptr + offsets, mask=col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_mini_batch(q_ptr, k_ptr, v_ptr, lr_ptr, first, tokens, cols, col_mask, F: tl.constexpr):
    """Tokens [first, first + MB) of the slot layout, in fp32, with their offsets into [.., F] tensors."""
    offsets = _token_offsets(first, tokens, cols, F)
    q = _load_tokens(q_ptr, offsets, col_mask)
    k = _load_tokens(k_ptr, offsets, col_mask)
    v = _load_tokens(v_ptr, offsets, col_mask)
    return offsets, q, k, v, tl.load(lr_ptr + first + tokens)


@triton.jit
def _key_pass(w, c, k, v, ln_w, ln_b, col_mask, F: tl.constexpr, eps, PRECISION: tl.constexpr):
    """Every gradient of a mini-batch is taken at its start state (w, c): g = dloss/dz at z = k w + c."""
    z = _dot(k, w, PRECISION) + c[None, :]
    return _layer_norm_l2_grad(z, v - k, ln_w, ln_b, col_mask, F, eps)


@triton.jit
def _dual_output(w, c, acc_w, acc_c, q, k, grad, lr, tau, causal, PRECISION: tl.constexpr):
    """z_q before the output LayerNorm, with eta and the scores q k^T. Token i sees W - tau_i * (A + sum_{j<=i}
    k_j^T lr_j g_j); the bias term is the same sum without k_j, hence eta * (q k^T + 1)."""
    eta = tl.where(causal, tau[:, None] * lr[None, :], 0.0)
    scores = _dot(q, tl.trans(k), PRECISION)
    z_q = (
        _dot(q, w, PRECISION)
        - tau[:, None] * _dot(q, acc_w, PRECISION)
        - _dot(eta * (scores + 1.0), grad, PRECISION)
        + c[None, :]
        - tau[:, None] * acc_c[None, :]
    )
    return z_q, eta, scores


@triton.jit
def _accumulate(acc_w, acc_c, k, grad, lr, PRECISION: tl.constexpr):
    weighted = lr[:, None] * grad
    return acc_w + _dot(tl.trans(k), weighted, PRECISION), acc_c + tl.sum(weighted, axis=0)


@triton.jit
def _commit(w, c, acc_w, acc_c, commit, tau_last):
    """`commit` is 1.0 when the mini-batch completes, 0.0 for a row's partial last one (it keeps accumulating)."""
    return w - commit * tau_last * acc_w, c - commit * tau_last * acc_c, acc_w * (1.0 - commit), acc_c * (1.0 - commit)


@triton.jit
def _ttt_linear_chunk_state_kernel(
    k_ptr, v_ptr, lr_ptr, tau_ptr, ln_w_ptr, ln_b_ptr, span_ptr,
    w_ptr, c_ptr, acc_w_ptr, acc_c_ptr,
    w_out_ptr, c_out_ptr, acc_w_out_ptr, acc_c_out_ptr,
    start_w_ptr, start_c_ptr, grad_ptr,
    ckpt_w_ptr, ckpt_c_ptr, ckpt_acc_w_ptr, ckpt_acc_c_ptr,
    H, M, FIRST, COUNT, GROUP, NUM_GROUPS, eps,
    F: tl.constexpr, F_PAD: tl.constexpr, MB: tl.constexpr, PRECISION: tl.constexpr, SAVE: tl.constexpr,
):
    """The sequential half of the forward, one program per (row, head): mini-batches FIRST..FIRST+COUNT-1 of the
    slot layout [B, H, M, MB, F] in order, doing only what the next state needs (the key pass and the update).
    It writes each mini-batch's start state (W, c) [B*H, COUNT, ...] in start_w's dtype and the key gradients g
    [B, H, M, MB, F] fp32 for `_ttt_linear_chunk_output_kernel`; with SAVE, the full state at the start of
    every GROUP-th mini-batch goes to the checkpoints [B*H, NUM_GROUPS, ...] of the backward."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    tokens = tl.arange(0, MB)
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    square = cols[:, None] * F + cols[None, :]
    square_mask = col_mask[:, None] & col_mask[None, :]

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
                _store_state(ckpt_w_ptr, ckpt_c_ptr, ckpt_acc_w_ptr, ckpt_acc_c_ptr, bh * NUM_GROUPS + m // GROUP,
                             w, c, acc_w, acc_c, square, square_mask, cols, col_mask, F)
        offsets = upcoming
        following = (bh * M + tl.minimum(m + 1, M - 1)) * MB
        upcoming = _token_offsets(following, tokens, cols, F)
        k_next, v_next = _load_tokens(k_ptr, upcoming, col_mask), _load_tokens(v_ptr, upcoming, col_mask)
        lr_next = tl.load(lr_ptr + following + tokens)
        start = bh * COUNT + m - FIRST
        tl.store(start_w_ptr + start * F * F + square, w.to(start_w_ptr.dtype.element_ty), mask=square_mask)
        tl.store(start_c_ptr + start * F + cols, c.to(start_c_ptr.dtype.element_ty), mask=col_mask)
        grad, _, _, _ = _key_pass(w, c, k, v, ln_w, ln_b, col_mask, F, eps, PRECISION)
        tl.store(grad_ptr + offsets, grad, mask=col_mask[None, :])
        acc_w, acc_c = _accumulate(acc_w, acc_c, k, grad, lr, PRECISION)
        w, c, acc_w, acc_c = _commit(w, c, acc_w, acc_c, ((m + 1) * MB <= span).to(tl.float32), tau_last)
        k, v, lr = k_next, v_next, lr_next

    _store_state(w_out_ptr, c_out_ptr, acc_w_out_ptr, acc_c_out_ptr, bh, w, c, acc_w, acc_c, square, square_mask,
                 cols, col_mask, F)


@triton.jit
def _ttt_linear_chunk_output_kernel(
    q_ptr, k_ptr, lr_ptr, tau_ptr, ln_w_ptr, ln_b_ptr, start_w_ptr, start_c_ptr, grad_ptr, acc_w_ptr, acc_c_ptr,
    out_ptr, H, M, FIRST, COUNT, eps,
    F: tl.constexpr, F_PAD: tl.constexpr, MB: tl.constexpr, PRECISION: tl.constexpr,
):
    """The parallel half of the forward, one program per (mini-batch FIRST + i, row and head): the dual-form
    output from the mini-batch's start state and key gradients. Only the first mini-batch of the layout starts
    with an accumulator (the cache's): any later one that holds real tokens follows a committed one."""
    i, bh = tl.program_id(0), tl.program_id(1)
    m = FIRST + i
    head = bh % H
    tokens = tl.arange(0, MB)
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    square = cols[:, None] * F + cols[None, :]
    square_mask = col_mask[:, None] & col_mask[None, :]

    start = bh * COUNT + i
    w = _load_square(start_w_ptr, start, square, square_mask, F).to(tl.float32)
    c = _load_row(start_c_ptr, start, cols, col_mask, F).to(tl.float32)
    first = (cols * 0 + m) == 0
    acc_w = tl.load(acc_w_ptr + bh * F * F + square, mask=square_mask & first[None, :], other=0.0)
    acc_c = tl.load(acc_c_ptr + bh * F + cols, mask=col_mask & first, other=0.0)
    ln_w = _load_row(ln_w_ptr, head, cols, col_mask, F)
    ln_b = _load_row(ln_b_ptr, head, cols, col_mask, F)
    tau = tl.load(tau_ptr + tokens)
    causal = tokens[:, None] >= tokens[None, :]
    first_token = (bh * M + m) * MB
    offsets = _token_offsets(first_token, tokens, cols, F)
    q = _load_tokens(q_ptr, offsets, col_mask)
    k = _load_tokens(k_ptr, offsets, col_mask)
    grad = _load_tokens(grad_ptr, offsets, col_mask)
    lr = tl.load(lr_ptr + first_token + tokens)
    z_q, _, _ = _dual_output(w, c, acc_w, acc_c, q, k, grad, lr, tau, causal, PRECISION)
    tl.store(out_ptr + offsets, q + _layer_norm(z_q, ln_w, ln_b, col_mask, F, eps), mask=col_mask[None, :])


@triton.jit
def _chunk_mini_batch_backward(
    q, k, v, lr, d_out, w, c, acc_w, acc_c, commit, tau, tau_last, ln_w, ln_b, causal, tokens, col_mask,
    d_w, d_c, d_acc_w, d_acc_c, d_tau, d_ln_w, d_ln_b,
    F: tl.constexpr, MB: tl.constexpr, eps, PRECISION: tl.constexpr,
):
    """Reverse mode of one mini-batch (the forward of `_ttt_linear_chunk_state_kernel` and
    `_ttt_linear_chunk_output_kernel`, recomputed from its start
    state). d_w .. d_acc_c are the adjoints of the state after the mini-batch and come back as those of the
    state before it; d_tau, d_ln_w, d_ln_b accumulate. Returns d_q, d_k, d_v, d_lr of its tokens as well."""
    grad, z_hat, rstd, grad_hat = _key_pass(w, c, k, v, ln_w, ln_b, col_mask, F, eps, PRECISION)
    z_q, eta, scores = _dual_output(w, c, acc_w, acc_c, q, k, grad, lr, tau, causal, PRECISION)
    weighted = lr[:, None] * grad
    acc_w_end = acc_w + _dot(tl.trans(k), weighted, PRECISION)
    acc_c_end = acc_c + tl.sum(weighted, axis=0)

    # Commit: W' = W - commit * tau_last * A_end (W and c pass their adjoints through unchanged).
    d_tau_last = -commit * (tl.sum(tl.sum(d_w * acc_w_end, axis=1), axis=0) + tl.sum(d_c * acc_c_end, axis=0))
    d_tau += tl.where(tokens == MB - 1, d_tau_last, 0.0)
    d_acc_w_end = (1.0 - commit) * d_acc_w - commit * tau_last * d_w
    d_acc_c_end = (1.0 - commit) * d_acc_c - commit * tau_last * d_c

    # Accumulation: A_end = A + k^T (lr g), a_end = a + sum_j lr_j g_j.
    d_weighted = _dot(k, d_acc_w_end, PRECISION) + d_acc_c_end[None, :]
    d_k = _dot(weighted, tl.trans(d_acc_w_end), PRECISION)
    d_grad = lr[:, None] * d_weighted
    d_lr = tl.sum(d_weighted * grad, axis=1)

    # Output: out = q + LN(z_q).
    z_hat_q, rstd_q = _layer_norm_stats(z_q, col_mask, F, eps)
    d_ln_w += tl.sum(d_out * z_hat_q, axis=0)
    d_ln_b += tl.sum(d_out, axis=0)
    d_z_q = _project(d_out * ln_w[None, :], z_hat_q, col_mask, F) * rstd_q[:, None]
    tau_d_z_q = tau[:, None] * d_z_q

    # z_q = q W - tau (q A) - (eta * (q k^T + 1)) g + c - tau a.
    d_q = d_out + _dot(d_z_q, tl.trans(w), PRECISION) - _dot(tau_d_z_q, tl.trans(acc_w), PRECISION)
    d_tau -= tl.sum(d_z_q * (_dot(q, acc_w, PRECISION) + acc_c[None, :]), axis=1)
    d_w += _dot(tl.trans(q), d_z_q, PRECISION)
    d_c += tl.sum(d_z_q, axis=0)
    d_acc_w = d_acc_w_end - _dot(tl.trans(q), tau_d_z_q, PRECISION)
    d_acc_c = d_acc_c_end - tl.sum(tau_d_z_q, axis=0)
    d_grad -= _dot(tl.trans(eta * (scores + 1.0)), d_z_q, PRECISION)
    d_mix = tl.where(causal, -_dot(d_z_q, tl.trans(grad), PRECISION), 0.0)
    d_eta = d_mix * (scores + 1.0)
    d_scores = d_mix * eta
    d_q += _dot(d_scores, k, PRECISION)
    d_k += _dot(tl.trans(d_scores), q, PRECISION)
    d_tau += tl.sum(d_eta * lr[None, :], axis=1)
    d_lr += tl.sum(d_eta * tau[:, None], axis=0)

    # Key gradient: g = rstd * u, u = project(grad_hat, z_hat), grad_hat = (ln_w z_hat + ln_b - (v - k)) ln_w.
    u = _project(grad_hat, z_hat, col_mask, F)
    d_rstd = tl.sum(d_grad * u, axis=1)
    d_u = rstd[:, None] * d_grad
    d_grad_hat = _project(d_u, z_hat, col_mask, F)
    d_z_hat = (
        d_grad_hat * ln_w[None, :] * ln_w[None, :]
        - (tl.sum(grad_hat * z_hat, axis=1) / F)[:, None] * d_u
        - (tl.sum(d_u * z_hat, axis=1) / F)[:, None] * grad_hat
    )
    d_ln_w += tl.sum(d_grad_hat * (2.0 * ln_w[None, :] * z_hat + ln_b[None, :] - (v - k)), axis=0)
    d_ln_b += tl.sum(d_grad_hat * ln_w[None, :], axis=0)
    d_v = -d_grad_hat * ln_w[None, :]
    # z = k W + c; rstd depends on z as well: d rstd / d z = -rstd^2 z_hat / F.
    d_z = rstd[:, None] * _project(d_z_hat, z_hat, col_mask, F) - (d_rstd * rstd * rstd / F)[:, None] * z_hat
    d_k += _dot(d_z, tl.trans(w), PRECISION) + d_grad_hat * ln_w[None, :]
    d_w += _dot(tl.trans(k), d_z, PRECISION)
    d_c += tl.sum(d_z, axis=0)
    return d_q, d_k, d_v, d_lr, d_w, d_c, d_acc_w, d_acc_c, d_tau, d_ln_w, d_ln_b


@triton.jit
def _ttt_linear_chunk_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lr_ptr, tau_ptr, ln_w_ptr, ln_b_ptr, span_ptr,
    ckpt_w_ptr, ckpt_c_ptr, ckpt_acc_w_ptr, ckpt_acc_c_ptr,
    scratch_w_ptr, scratch_c_ptr, scratch_acc_w_ptr, scratch_acc_c_ptr,
    d_out_ptr, d_w_ptr, d_c_ptr, d_acc_w_ptr, d_acc_c_ptr,
    d_q_ptr, d_k_ptr, d_v_ptr, d_lr_ptr, d_tau_ptr, d_ln_w_ptr, d_ln_b_ptr,
    H, M, GROUP, NUM_GROUPS, eps,
    F: tl.constexpr, F_PAD: tl.constexpr, MB: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (row, head), groups of GROUP mini-batches from the last: the group's start states are
    recomputed from its checkpoint into this program's scratch [B*H, GROUP, ...], then its mini-batches run
    backwards. d_w .. d_acc_c hold the adjoints of the final state on entry and of the initial one on exit;
    d_tau, d_ln_w and d_ln_b get this program's partial sums [B*H, ...]."""
    bh = tl.program_id(0)
    row, head = bh // H, bh % H
    tokens = tl.arange(0, MB)
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    square = cols[:, None] * F + cols[None, :]
    square_mask = col_mask[:, None] & col_mask[None, :]

    ln_w = _load_row(ln_w_ptr, head, cols, col_mask, F)
    ln_b = _load_row(ln_b_ptr, head, cols, col_mask, F)
    tau = tl.load(tau_ptr + tokens)
    tau_last = tl.load(tau_ptr + MB - 1)
    span = tl.load(span_ptr + row)
    causal = tokens[:, None] >= tokens[None, :]
    d_w = _load_square(d_w_ptr, bh, square, square_mask, F)
    d_acc_w = _load_square(d_acc_w_ptr, bh, square, square_mask, F)
    d_c = _load_row(d_c_ptr, bh, cols, col_mask, F)
    d_acc_c = _load_row(d_acc_c_ptr, bh, cols, col_mask, F)
    d_tau = tl.zeros([MB], dtype=tl.float32)
    d_ln_w = tl.zeros([F_PAD], dtype=tl.float32)
    d_ln_b = tl.zeros([F_PAD], dtype=tl.float32)

    for group_back in range(NUM_GROUPS):
        group = NUM_GROUPS - 1 - group_back
        first = group * GROUP
        count = tl.minimum(M - first, GROUP)
        w = _load_square(ckpt_w_ptr, bh * NUM_GROUPS + group, square, square_mask, F)
        c = _load_row(ckpt_c_ptr, bh * NUM_GROUPS + group, cols, col_mask, F)
        acc_w = _load_square(ckpt_acc_w_ptr, bh * NUM_GROUPS + group, square, square_mask, F)
        acc_c = _load_row(ckpt_acc_c_ptr, bh * NUM_GROUPS + group, cols, col_mask, F)
        for i in range(count):
            m = first + i
            _store_state(scratch_w_ptr, scratch_c_ptr, scratch_acc_w_ptr, scratch_acc_c_ptr, bh * GROUP + i,
                         w, c, acc_w, acc_c, square, square_mask, cols, col_mask, F)
            _, _, k, v, lr = _load_mini_batch(q_ptr, k_ptr, v_ptr, lr_ptr, (bh * M + m) * MB, tokens, cols, col_mask, F)
            grad, _, _, _ = _key_pass(w, c, k, v, ln_w, ln_b, col_mask, F, eps, PRECISION)
            acc_w, acc_c = _accumulate(acc_w, acc_c, k, grad, lr, PRECISION)
            w, c, acc_w, acc_c = _commit(w, c, acc_w, acc_c, ((m + 1) * MB <= span).to(tl.float32), tau_last)
        tl.debug_barrier()  # the scratch written above is read back by other threads of this program

        for i_back in range(count):
            i = count - 1 - i_back
            m = first + i
            w = _load_square(scratch_w_ptr, bh * GROUP + i, square, square_mask, F)
            c = _load_row(scratch_c_ptr, bh * GROUP + i, cols, col_mask, F)
            acc_w = _load_square(scratch_acc_w_ptr, bh * GROUP + i, square, square_mask, F)
            acc_c = _load_row(scratch_acc_c_ptr, bh * GROUP + i, cols, col_mask, F)
            first_token = (bh * M + m) * MB
            offsets, q, k, v, lr = _load_mini_batch(q_ptr, k_ptr, v_ptr, lr_ptr, first_token, tokens, cols, col_mask, F)
            d_out = tl.load(d_out_ptr + offsets, mask=col_mask[None, :], other=0.0)
            d_q, d_k, d_v, d_lr, d_w, d_c, d_acc_w, d_acc_c, d_tau, d_ln_w, d_ln_b = _chunk_mini_batch_backward(
                q, k, v, lr, d_out, w, c, acc_w, acc_c, ((m + 1) * MB <= span).to(tl.float32), tau, tau_last,
                ln_w, ln_b, causal, tokens, col_mask, d_w, d_c, d_acc_w, d_acc_c, d_tau, d_ln_w, d_ln_b,
                F, MB, eps, PRECISION,
            )
            tl.store(d_q_ptr + offsets, d_q, mask=col_mask[None, :])
            tl.store(d_k_ptr + offsets, d_k, mask=col_mask[None, :])
            tl.store(d_v_ptr + offsets, d_v, mask=col_mask[None, :])
            tl.store(d_lr_ptr + first_token + tokens, d_lr)
        tl.debug_barrier()  # the next group overwrites the scratch

    _store_state(d_w_ptr, d_c_ptr, d_acc_w_ptr, d_acc_c_ptr, bh, d_w, d_c, d_acc_w, d_acc_c, square, square_mask,
                 cols, col_mask, F)
    tl.store(d_tau_ptr + bh * MB + tokens, d_tau)
    tl.store(d_ln_w_ptr + bh * F + cols, d_ln_w, mask=col_mask)
    tl.store(d_ln_b_ptr + bh * F + cols, d_ln_b, mask=col_mask)


def _state_views(state: list[torch.Tensor], acc: list[torch.Tensor]) -> list[torch.Tensor]:
    """W [B,H,f,f], c [B,H,1,f] and their accumulators as contiguous fp32 tensors."""
    return [t.float().contiguous() for t in (*state, *acc)]


def _precision(x: torch.Tensor) -> str:
    # fp32 inputs get exact fp32 products; half-precision inputs are already rounded, TF32 loses nothing more.
    return "ieee" if x.dtype == torch.float32 else "tf32"


# Launch parameters of each kernel for head dims up to 64 and above, from kernels/tune_ttt.py on the H200
# (results/ttt_tune.md): the backward holds about six live [F, F] fp32 tiles, 8 warps spread them thinnest. At
# head dim 128 the state kernel spills 1.2 KB per thread with 4 warps, 128 B with 8 (ptxas resource report).
LAUNCH = {
    "state": ({"num_warps": 4}, {"num_warps": 8}),
    "output": ({"num_warps": 2}, {"num_warps": 4}),
    "backward": ({"num_warps": 8}, {"num_warps": 8}),
}


def _launch(kernel: str, head_dim: int) -> dict:
    return LAUNCH[kernel][head_dim > 64]


# The start states the forward hands from its sequential to its parallel kernel are held for at most this
# many bytes at a time: longer inputs run in segments of mini-batches.
START_STATE_BYTES = 1 << 29


def _chunk_forward(q, k, v, lr, tau, ln_weight, ln_bias, span, w, c, acc_w, acc_c, eps, group):
    """Launches the forward kernels; `group > 0` also returns the checkpoints the backward needs."""
    batch, heads, num_mb, mini_batch, head_dim = q.shape
    rows = batch * heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    grad = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    state = [w, c, acc_w, acc_c]
    new = [torch.empty_like(t) for t in state]
    num_groups = triton.cdiv(num_mb, group) if group > 0 else 1
    checkpoints = [t.new_empty(rows, num_groups, *t.shape[2:]) for t in state] if group > 0 else new
    # Half-precision inputs meet the start states in half-precision products anyway: bf16 halves their traffic.
    start_dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
    segment = max(1, min(num_mb, START_STATE_BYTES // (rows * head_dim * head_dim * start_dtype.itemsize)))
    start_w = torch.empty(rows, segment, head_dim, head_dim, dtype=start_dtype, device=q.device)
    start_c = torch.empty(rows, segment, head_dim, dtype=start_dtype, device=q.device)
    meta = dict(F=head_dim, F_PAD=triton.next_power_of_2(head_dim), MB=mini_batch, PRECISION=_precision(q))
    for first in range(0, num_mb, segment):
        count = min(segment, num_mb - first)
        if first:  # this segment continues from the last one's final state
            state, new = new, [torch.empty_like(t) for t in new]
        _ttt_linear_chunk_state_kernel[(rows,)](
            k, v, lr, tau, ln_weight, ln_bias, span, *state, *new, start_w, start_c, grad, *checkpoints,
            heads, num_mb, first, count, max(group, 1), num_groups, eps, SAVE=group > 0, **meta,
            **_launch("state", head_dim),
        )
        _ttt_linear_chunk_output_kernel[(count, rows)](
            q, k, lr, tau, ln_weight, ln_bias, start_w, start_c, grad, acc_w, acc_c, out,
            heads, num_mb, first, count, eps, **meta, **_launch("output", head_dim),
        )
    return out, new, checkpoints


class TTTLinearChunk(torch.autograd.Function):
    """The chunk kernel with its backward. Memory: the forward keeps the state every `group` mini-batches
    (4 (f^2 + f) floats per row and head each), the backward recomputes the states inside one group at a
    time into a scratch of `group` states per row and head."""

    @staticmethod
    def forward(ctx, q, k, v, lr, tau, ln_weight, ln_bias, span, w, c, acc_w, acc_c, eps, group):
        out, new, checkpoints = _chunk_forward(q, k, v, lr, tau, ln_weight, ln_bias, span, w, c, acc_w, acc_c, eps, group)
        ctx.save_for_backward(q, k, v, lr, tau, ln_weight, ln_bias, span, *checkpoints)
        ctx.eps, ctx.group = eps, group
        return out, *new

    @staticmethod
    def backward(ctx, d_out, d_w, d_c, d_acc_w, d_acc_c):
        q, k, v, lr, tau, ln_weight, ln_bias, span, *checkpoints = ctx.saved_tensors
        batch, heads, num_mb, mini_batch, head_dim = q.shape
        group = min(ctx.group, num_mb)
        # Unused outputs have no gradient; the kernel updates the state adjoints in place, so they are copies.
        d_state = [
            torch.zeros_like(ckpt[:, 0]).view(batch, heads, *ckpt.shape[2:]) if d is None else d.float().contiguous().clone()
            for d, ckpt in zip((d_w, d_c, d_acc_w, d_acc_c), checkpoints)
        ]
        d_out = torch.zeros_like(q, dtype=torch.float32) if d_out is None else d_out.float().contiguous()
        scratch = [ckpt.new_empty(batch * heads, group, *ckpt.shape[2:]) for ckpt in checkpoints]
        d_q, d_k, d_v = (torch.empty_like(x, dtype=torch.float32) for x in (q, k, v))
        d_lr = torch.empty_like(lr)
        d_tau = tau.new_empty(batch * heads, mini_batch)
        d_ln = [ln_weight.new_empty(batch * heads, head_dim) for _ in range(2)]
        _ttt_linear_chunk_bwd_kernel[(batch * heads,)](
            q, k, v, lr, tau, ln_weight, ln_bias, span, *checkpoints, *scratch, d_out, *d_state,
            d_q, d_k, d_v, d_lr, d_tau, *d_ln,
            heads, num_mb, group, checkpoints[0].shape[1], ctx.eps,
            F=head_dim, F_PAD=triton.next_power_of_2(head_dim), MB=mini_batch, PRECISION=_precision(q),
            **_launch("backward", head_dim),
        )
        d_ln_w, d_ln_b = (d.view(batch, heads, head_dim).sum(0).view_as(ln_weight) for d in d_ln)
        return (d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype), d_lr, d_tau.sum(0), d_ln_w, d_ln_b, None,
                *d_state, None, None)


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
    span: [B] slots up to each row's last token (its mini-batch m commits when (m + 1) * b <= span).
    Returns the output [B, H, M, b, f] fp32, the new state [W, c] and accumulator. Differentiable in every
    tensor but span; the backward recomputes groups of `checkpoint_group` mini-batches."""
    if checkpoint_group < 1:
        raise ValueError(f"checkpoint_group must be >= 1, got {checkpoint_group}")
    args = (
        q.contiguous(), k.contiguous(), v.contiguous(), lr.float().contiguous(), tau.float().contiguous(),
        ln_weight.float().contiguous(), ln_bias.float().contiguous(), span.to(torch.int32).contiguous(),
        *_state_views(state, acc), eps,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in args if isinstance(t, torch.Tensor)):
        out, *new = TTTLinearChunk.apply(*args, checkpoint_group)
    else:
        out, new, _ = _chunk_forward(*args, group=0)
    return out, new[:2], new[2:]
