"""The TTT-MLP chunk kernels (forward and backward) against the torch reference: on CPU under TRITON_INTERPRET=1 (set by
conftest) at tiny sizes, on CUDA at real sizes (marked gpu)."""

import pytest
import torch
from ttt_testing import check_double_backward_is_refused, random_ids, rel_err, tiny_model

from ttt_hf.ttt import ttt_ops
from ttt_hf.ttt.ttt_ops import TTT_LN_EPS, MiniBatchSlots, ttt_chunk

pytest.importorskip("triton")
from ttt_hf.ttt import ttt_triton_mlp  # noqa: E402
from ttt_hf.ttt.ttt_triton_mlp import TTTMLPChunk, ttt_mlp_chunk_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MB = 16


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocks of 16 hidden units in both kernels: 4 blocks at head dim 16, so sums over blocks are exercised."""
    monkeypatch.setattr(
        ttt_triton_mlp, "LAUNCH", {k: {**v, "tile_elements": 256} for k, v in ttt_triton_mlp.LAUNCH.items()}
    )


def mlp_inputs(batch, heads, seq_len, head_dim, dtype=torch.float32, seed=0, mini_batch=MB):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(DEVICE)
    q, k, v = (rand(batch, heads, seq_len, head_dim).to(dtype) for _ in range(3))
    lr = (torch.rand(batch, heads, seq_len, generator=g) * 0.5 / head_dim**0.5).to(DEVICE)
    tau = (1.0 / torch.arange(1, mini_batch + 1) + 0.05 * torch.randn(mini_batch, generator=g)).clamp_min(0).to(DEVICE)
    ln_w, ln_b = 1 + rand(heads, 1, head_dim, scale=0.1), rand(heads, 1, head_dim, scale=0.1)
    hidden = 4 * head_dim
    shapes = [(head_dim, hidden), (1, hidden), (hidden, head_dim), (1, head_dim)]
    state = [rand(batch, heads, *shape, scale=0.3 if shape[0] > 1 else 0.1) for shape in shapes]
    acc = [rand(batch, heads, *shape, scale=0.01) for shape in shapes]
    return state, acc, q, k, v, lr, tau, ln_w, ln_b


def check_against_reference(
    batch,
    heads,
    seq_len,
    head_dim,
    start,
    length,
    dtype=torch.float32,
    tol=1e-4,
    mini_batch=MB,
    backward=True,
    checkpoint_group=0,
):
    """Output (real tokens), final state and accumulator of both backends and, with `backward`, the gradient of
    every input for random cotangents of all nine results."""
    state, acc, q, k, v, lr, tau, ln_w, ln_b = mlp_inputs(batch, heads, seq_len, head_dim, dtype, mini_batch=mini_batch)
    inputs = [q, k, v, lr, tau, ln_w, ln_b, *state, *acc]
    for x in inputs:
        x.requires_grad_(backward)
    start, length = torch.tensor(start, device=DEVICE), torch.tensor(length, device=DEVICE)
    real = (torch.arange(seq_len, device=DEVICE)[None, :] < length[:, None])[:, None, :, None]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    cotangents = None
    results = {}
    for backend in ("torch", "triton"):
        with torch.set_grad_enabled(backward):
            out, new_state, new_acc = ttt_chunk(
                state,
                acc,
                q,
                k,
                v,
                lr,
                tau,
                ln_w,
                ln_b,
                start,
                length,
                checkpoint_group=checkpoint_group,
                kernel_backend=backend,
            )
        outputs = [out * real, *new_state, *new_acc]
        if cotangents is None:
            cotangents = [torch.randn(x.shape, generator=g, device=DEVICE) for x in outputs]
        grads = torch.autograd.grad(outputs, inputs, cotangents) if backward else ()
        results[backend] = [x.detach() for x in outputs] + list(grads)
    names = ["out", "W1", "c1", "W2", "c2", "acc_W1", "acc_c1", "acc_W2", "acc_c2"]
    names += ["d_" + n for n in ["q", "k", "v", "lr", "tau", "ln_w", "ln_b", *names[1:]]]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, results["triton"], results["torch"])}
    assert max(errors.values()) <= tol, errors


# 24: a padded head dim (to 32); 16: one block of hidden units, 20 and 24: a full and a partial one (blocks of 64)
@pytest.mark.parametrize("head_dim", [16, 20, 24])
def test_kernels_match_reference_with_offsets_and_partial_mini_batches(head_dim):
    # Row 0 starts mid mini-batch and ends inside one (partial last mini-batch: no commit); row 1 is aligned.
    check_against_reference(2, 2, 37, head_dim, start=[5, 16], length=[37, 30])


@pytest.mark.parametrize("checkpoint_group", [1, 2])
def test_gradients_across_checkpoint_groups(checkpoint_group, small_tiles):
    # 4 mini-batches: groups of 1 and of 2; row 1 ends inside the third, so the fourth is inert for it.
    check_against_reference(2, 1, 64, 16, start=[0, 0], length=[64, 40], checkpoint_group=checkpoint_group)


def test_gradients_with_a_shorter_last_checkpoint_group(small_tiles):
    # 3 mini-batches in groups of 2 over 4 (row, head) programs: the last group's start records are indexed by the
    # group size, not by its own length.
    check_against_reference(2, 2, 48, 16, start=[0, 5], length=[48, 35], checkpoint_group=2)


def test_autograd_function_leaves_its_inputs_and_cotangents_untouched():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = mlp_inputs(1, 2, 32, 16)
    layout = MiniBatchSlots(
        torch.zeros(1, dtype=torch.long, device=DEVICE), torch.full((1,), 32, device=DEVICE), MB, 32
    )
    inputs = (
        *(layout.to_slots(x) for x in (q, k, v)),
        layout.to_slots(lr[..., None])[..., 0],
        tau,
        ln_w,
        ln_b,
        layout.span.to(torch.int32),
    )
    record = ttt_triton_mlp._pack([*state, *acc], 1, 2).requires_grad_()
    before = record.detach().clone()
    out, new_record = TTTMLPChunk.apply(*inputs, record, TTT_LN_EPS, 1)
    assert torch.equal(record.detach(), before)
    cotangents = [torch.randn_like(out), torch.randn_like(new_record)]
    saved = [c.clone() for c in cotangents]
    torch.autograd.grad([out, new_record], [record], cotangents)
    assert all(torch.equal(c, s) for c, s in zip(cotangents, saved))


def test_double_backward_is_refused():
    check_double_backward_is_refused(*mlp_inputs(1, 1, 32, 16))


def test_kernels_match_reference_with_mini_batches_of_32(small_tiles):
    check_against_reference(2, 1, 70, 16, start=[3, 0], length=[70, 64], mini_batch=32)


def test_kernels_match_reference_for_aligned_full_rows(small_tiles):
    check_against_reference(1, 3, 48, 16, start=[0], length=[48])


def test_forward_without_gradients_matches_reference():
    check_against_reference(2, 2, 37, 16, start=[5, 16], length=[37, 30], backward=False)


def test_inputs_stay_untouched_and_broadcast_states_work():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = mlp_inputs(2, 2, 32, 16)
    state = [t[:1].expand_as(t) for t in state]  # as the model's initial parameters reach the op
    before = [t.clone() for t in (*state, *acc)]
    start, length = torch.zeros(2, dtype=torch.long, device=DEVICE), torch.full((2,), 32, device=DEVICE)
    layout = MiniBatchSlots(start, length, MB, 32)
    slots = [layout.to_slots(x) for x in (q, k, v)]
    lr_s = layout.to_slots(lr[..., None])[..., 0]
    with torch.no_grad():
        out, new_state, new_acc = ttt_mlp_chunk_triton(
            state, acc, *slots, lr_s, tau, ln_w, ln_b, layout.span, TTT_LN_EPS
        )
        reference = ttt_ops.ttt_chunk_reference(state, acc, q, k, v, lr, tau, ln_w, ln_b, start, length)
    for tensor, saved in zip((*state, *acc), before):
        assert torch.equal(tensor, saved)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in (*new_state, *new_acc))
    for got, want in zip([layout.from_slots(out), *new_state, *new_acc], [reference[0], *reference[1], *reference[2]]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # whole mini-batches: the accumulators end at 0


def test_dispatch_rules():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = mlp_inputs(1, 1, 16, 16)
    assert ttt_ops._use_kernel("triton", state, q, MB)
    assert ttt_ops._use_kernel("triton", state, q, 32)  # the mini-batch size of the test above
    assert ttt_ops._use_kernel("auto", state, q, MB) == (DEVICE == "cuda")
    assert not ttt_ops._use_kernel("triton", state, q.double(), MB)
    assert not ttt_ops._use_kernel("triton", [state[0][..., :-1], *state[1:]], q, MB)  # not 4f units


def test_errors():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = mlp_inputs(1, 1, 16, 16)
    slots = [x.view(1, 1, 1, MB, 16) for x in (q, k, v)]
    span = torch.full((1,), 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[W1, c1, W2, c2\] with 4f hidden units"):
        ttt_mlp_chunk_triton(state[:2], acc[:2], *slots, lr.view(1, 1, 1, MB), tau, ln_w, ln_b, span, TTT_LN_EPS)
    with pytest.raises(ValueError, match="checkpoint_group must be >= 1"):
        ttt_mlp_chunk_triton(
            state, acc, *slots, lr.view(1, 1, 1, MB), tau, ln_w, ln_b, span, TTT_LN_EPS, checkpoint_group=0
        )


def test_model_with_triton_backend_matches_torch_backend(monkeypatch):  # logits, greedy decoding, gradients
    calls = []
    kernel = ttt_ops.ttt_mlp_chunk_triton
    monkeypatch.setattr(ttt_ops, "ttt_mlp_chunk_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    ids = random_ids(2, 37, vocab=96, seed=3)
    models = {
        b: tiny_model("mlp", hidden_size=64, mini_batch_size=MB, kernel_backend=b).to(DEVICE)
        for b in ("torch", "triton")
    }
    ids = ids.to(DEVICE)
    with torch.no_grad():
        full = {b: m(ids).logits for b, m in models.items()}
        assert rel_err(full["triton"], full["torch"]) <= 1e-4
        generated = {b: m.generate(ids[:, :20], max_new_tokens=12, do_sample=False) for b, m in models.items()}
    assert torch.equal(generated["triton"], generated["torch"])
    layers = models["triton"].config.num_hidden_layers
    assert len(calls) == 2 * layers  # the full forward and generate's prefill
    grads = {}
    for backend, model in models.items():
        model.train()(ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls) == 3 * layers  # training too
    assert grads["triton"].keys() == grads["torch"].keys()
    errors = {n: rel_err(grads["triton"][n], grads["torch"][n]) for n in grads["torch"]}
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_kernels_at_real_sizes(head_dim, dtype, tol, no_tf32):
    check_against_reference(2, 4, 2048 + 37, head_dim, start=[5, 0], length=[2048 + 37, 2048], dtype=dtype, tol=tol)
