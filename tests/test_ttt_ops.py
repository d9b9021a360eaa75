"""The TTT PyTorch reference ops against a token-by-token definition written with autograd, in fp64."""

import pytest
import torch
import torch.nn.functional as F

from ttt_hf.ttt.ttt_ops import (
    MiniBatchSlots,
    learning_rate_logits,
    ln_forward,
    ttt_chunk_reference,
    ttt_step_reference,
)

B, H, F_DIM, MB = 2, 3, 8, 4


def _inputs(layer_type, seq_len, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(dtype)  # noqa: E731
    q, k, v = (rand(B, H, seq_len, F_DIM) for _ in range(3))
    lr = (torch.rand(B, H, seq_len, generator=g) * 0.5).to(dtype)
    tau = (1.0 / torch.arange(1, MB + 1) + 0.1 * torch.randn(MB, generator=g)).clamp_min(0).to(dtype)
    ln_w, ln_b = 1 + rand(H, 1, F_DIM, scale=0.1), rand(H, 1, F_DIM, scale=0.1)
    width = 4 * F_DIM if layer_type == "mlp" else F_DIM
    if layer_type == "mlp":
        params = [
            rand(H, F_DIM, width, scale=0.3),
            rand(H, 1, width, scale=0.1),
            rand(H, width, F_DIM, scale=0.3),
            rand(H, 1, F_DIM, scale=0.1),
        ]
    else:
        params = [rand(H, F_DIM, F_DIM, scale=0.3), rand(H, 1, F_DIM, scale=0.1)]
    return q, k, v, lr, tau, ln_w, ln_b, params


def _inner(params, x):
    for i in range(0, len(params), 2):
        x = x @ params[i] + params[i + 1]
        if i + 2 < len(params):
            x = F.gelu(x, approximate="tanh")
    return x


def naive_ttt(q, k, v, lr, tau, ln_w, ln_b, params, start=0):
    """Token by token: gradients by autograd at the mini-batch start state, W_i = W - tau_i * sum(lr_j grad_j)."""
    outs = torch.zeros_like(q)
    for r in range(q.shape[0]):
        for h in range(q.shape[1]):
            state = [p[h].clone() for p in params]
            acc = [torch.zeros_like(s) for s in state]
            for t in range(q.shape[2]):
                i = (start + t) % MB
                weights = [s.clone().requires_grad_(True) for s in state]
                z = _inner(weights, k[r, h, t])
                loss = 0.5 * ((ln_forward(z, ln_w[h, 0], ln_b[h, 0]) - (v[r, h, t] - k[r, h, t])) ** 2).sum()
                grads = torch.autograd.grad(loss, weights)
                acc = [a + lr[r, h, t] * g for a, g in zip(acc, grads)]
                current = [s - tau[i] * a for s, a in zip(state, acc)]
                outs[r, h, t] = q[r, h, t] + ln_forward(_inner(current, q[r, h, t]), ln_w[h, 0], ln_b[h, 0])
                if i == MB - 1:
                    state, acc = current, [torch.zeros_like(a) for a in acc]
    return outs


@pytest.mark.parametrize("seq_len", [1, 2 * MB, 2 * MB + 3])
def test_aligned_slot_layout_reads_nothing_from_the_device(seq_len):
    # Meta tensors hold no values: reading one back (a host sync on CUDA) raises.
    start, length = torch.zeros(B, dtype=torch.long), torch.full((B,), seq_len)
    aligned = MiniBatchSlots(start.to("meta"), length.to("meta"), MB, seq_len, aligned=True)
    read = MiniBatchSlots(start, length, MB, seq_len)
    assert (aligned.num_mini_batches, aligned.dense) == (read.num_mini_batches, read.dense)
    with pytest.raises(NotImplementedError, match="meta"):
        MiniBatchSlots(start.to("meta"), length.to("meta"), MB, seq_len)


def _batched(params):
    return [p.unsqueeze(0).expand(B, *p.shape).clone() for p in params]


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("seq_len", [1, 3, MB, 2 * MB + 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_chunk_matches_token_by_token_definition(layer_type, seq_len, aligned):
    q, k, v, lr, tau, ln_w, ln_b, params = _inputs(layer_type, seq_len)
    state = _batched(params)
    acc = [torch.zeros_like(s) for s in state]
    zeros, full = torch.zeros(B, dtype=torch.long), torch.full((B,), seq_len)
    out, _, _ = ttt_chunk_reference(state, acc, q, k, v, lr, tau, ln_w, ln_b, zeros, full, aligned=aligned)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_ttt(q, k, v, lr, tau, ln_w, ln_b, params), rtol=0, atol=1e-8)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_any_split_and_step_continue_exactly(layer_type):
    """Chunks at offsets inside a mini-batch, rows at different positions, and single steps all agree."""
    seq_len = 3 * MB + 2
    q, k, v, lr, tau, ln_w, ln_b, params = _inputs(layer_type, seq_len, seed=1)
    reference = naive_ttt(q, k, v, lr, tau, ln_w, ln_b, params)
    state = _batched(params)
    acc = [torch.zeros_like(s) for s in state]
    pieces, position = [], 0
    for size in (3, 1, 6, 1, 1, 2):
        sl = slice(position, position + size)
        start = torch.full((B,), position)
        if size == 1:
            out, state, acc = ttt_step_reference(
                state,
                acc,
                q[:, :, position],
                k[:, :, position],
                v[:, :, position],
                lr[:, :, position],
                tau,
                ln_w,
                ln_b,
                start,
                torch.ones(B, dtype=torch.bool),
            )
            out = out[:, :, None]
        else:
            out, state, acc = ttt_chunk_reference(
                state,
                acc,
                q[:, :, sl],
                k[:, :, sl],
                v[:, :, sl],
                lr[:, :, sl],
                tau,
                ln_w,
                ln_b,
                start,
                torch.full((B,), size),
            )
        pieces.append(out)
        position += size
    torch.testing.assert_close(torch.cat(pieces, 2), reference, rtol=0, atol=1e-8)


def test_right_padding_and_inactive_rows_leave_state_untouched():
    q, k, v, lr, tau, ln_w, ln_b, params = _inputs("linear", 7, seed=2)
    state = _batched(params)
    acc = [torch.zeros_like(s) for s in state]
    length = torch.tensor([7, 5])
    start = torch.zeros(B, dtype=torch.long)
    out, new_state, new_acc = ttt_chunk_reference(state, acc, q, k, v, lr, tau, ln_w, ln_b, start, length)
    row1 = naive_ttt(q[1:, :, :5], k[1:, :, :5], v[1:, :, :5], lr[1:, :, :5], tau, ln_w, ln_b, params)
    torch.testing.assert_close(out[1:, :, :5], row1, rtol=0, atol=1e-8)
    # Row 1 stopped after 5 tokens: one committed mini-batch and one token in the accumulator.
    _, short_state, short_acc = ttt_chunk_reference(
        [s[1:] for s in state],
        [a[1:] for a in acc],
        q[1:, :, :5],
        k[1:, :, :5],
        v[1:, :, :5],
        lr[1:, :, :5],
        tau,
        ln_w,
        ln_b,
        start[1:],
        length[1:],
    )
    for got, want in zip(new_state + new_acc, short_state + short_acc):
        torch.testing.assert_close(got[1:], want, rtol=0, atol=1e-12)
    inactive = torch.tensor([True, False])
    _, stepped, stepped_acc = ttt_step_reference(
        new_state, new_acc, q[:, :, 0], k[:, :, 0], v[:, :, 0], lr[:, :, 0], tau, ln_w, ln_b, length, inactive
    )
    for got, want in zip(stepped + stepped_acc, new_state + new_acc):
        assert torch.equal(got[1], want[1])
        assert not torch.equal(got[0], want[0])


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_checkpointed_scan_has_the_same_gradients(layer_type):
    q, k, v, lr, tau, ln_w, ln_b, params = _inputs(layer_type, 3 * MB + 1, seed=3)
    leaves = [q, k, v, lr, tau, ln_w, ln_b, *params]
    grads = []
    for group in (0, 2):
        inputs = [x.clone().requires_grad_(True) for x in leaves]
        q_, k_, v_, lr_, tau_, w_, b_, *params_ = inputs
        state = [p.unsqueeze(0).expand(B, *p.shape) for p in params_]
        acc = [torch.zeros_like(s) for s in state]
        out, final, _ = ttt_chunk_reference(
            state,
            acc,
            q_,
            k_,
            v_,
            lr_,
            tau_,
            w_,
            b_,
            torch.zeros(B, dtype=torch.long),
            torch.full((B,), q.shape[2]),
            checkpoint_group=group,
        )
        (out.pow(2).sum() + sum(s.sum() for s in final)).backward()
        grads.append([x.grad for x in inputs])
    for without, with_checkpoint in zip(*grads):
        torch.testing.assert_close(with_checkpoint, without, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_learning_rate_logits_keep_no_fp32_copy_and_match_autograd(dtype):
    """The same fp32 logits and gradients as autograd through the fp32 product, without keeping the fp32 copy of a
    half-precision input for the backward."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, 16, 24, generator=g).to(dtype).requires_grad_(True)
    weight = (0.1 * torch.randn(H, 24, generator=g)).requires_grad_(True)  # fp32, as in mixed precision
    bias = torch.randn(H, 1, generator=g).requires_grad_(True)
    upstream = torch.randn(B, H, 16, generator=g)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = learning_rate_logits(hidden, weight, bias)
    assert logits.dtype == torch.float32
    assert all(t.dtype == dtype for t in saved if t.numel() == hidden.numel())
    grads = torch.autograd.grad(logits, (hidden, weight, bias), upstream)

    expected = torch.einsum("btd,hd->bht", hidden.float(), weight) + bias
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias), upstream)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
