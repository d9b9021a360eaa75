"""The fused TTT decode-step kernels (TTT-Linear and TTT-MLP) against the torch reference: on CPU under
TRITON_INTERPRET=1 (set by conftest before triton is imported) at tiny sizes, on CUDA at real sizes (marked gpu)."""

import pytest
import torch

pytest.importorskip("triton")

from ttt_testing import random_ids, rel_err, tiny_model

from ttt_hf.ttt import ttt_ops
from ttt_hf.ttt.ttt_ops import causal_conv1d, causal_conv1d_banks, ttt_chunk_reference, ttt_step_reference
from ttt_hf.ttt.ttt_triton_conv import causal_conv_step_triton
from ttt_hf.ttt.ttt_triton_decode import decode_kernel_supported, ttt_step_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MB = 4  # a mini-batch of 4 makes short sequences cross several commits


def state_shapes(layer_type, batch, heads, head_dim):
    if layer_type == "linear":
        return [(batch, heads, head_dim, head_dim), (batch, heads, 1, head_dim)]
    hidden = 4 * head_dim
    return [
        (batch, heads, head_dim, hidden),
        (batch, heads, 1, hidden),
        (batch, heads, hidden, head_dim),
        (batch, heads, 1, head_dim),
    ]


def step_inputs(layer_type, batch, heads, head_dim, tokens=1, dtype=torch.float32, mini_batch=MB, seed=0):
    """State, accumulator, q/k/v [B, H, T, f], lr [B, H, T], tau, LayerNorm; all random and non-trivial."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=g).to(DEVICE)
    shapes = state_shapes(layer_type, batch, heads, head_dim)
    state = [rand(*s, scale=0.1 if s[-2] == 1 else 0.3) for s in shapes]
    acc = [rand(*s, scale=0.01) for s in shapes]
    q, k, v = (rand(batch, heads, tokens, head_dim).to(dtype) for _ in range(3))
    lr = (torch.rand(batch, heads, tokens, generator=g) * 0.5 / head_dim**0.5).to(DEVICE)
    tau = (1.0 / torch.arange(1, mini_batch + 1) + 0.05 * torch.randn(mini_batch, generator=g)).clamp_min(0).to(DEVICE)
    ln_w, ln_b = 1 + rand(heads, 1, head_dim, scale=0.1), rand(heads, 1, head_dim, scale=0.1)
    # A half-precision model's learning rates and LayerNorm parameters come in its dtype; the kernels read them so.
    lr, tau, ln_w, ln_b = (t.to(dtype) for t in (lr, tau, ln_w, ln_b))
    return state, acc, q, k, v, lr, tau, ln_w, ln_b


def check_step(layer_type, batch, heads, head_dim, position, active, dtype=torch.float32, tol=1e-4, mini_batch=MB):
    """One step against the reference: output, state and accumulator, updated in the caller's tensors."""
    state, acc, q, k, v, lr, tau, ln_w, ln_b = step_inputs(
        layer_type, batch, heads, head_dim, dtype=dtype, mini_batch=mini_batch
    )
    args = (
        q[:, :, 0],
        k[:, :, 0],
        v[:, :, 0],
        lr[:, :, 0],
        tau,
        ln_w,
        ln_b,
        torch.tensor(position, device=DEVICE),
        torch.tensor(active, device=DEVICE),
    )
    want = ttt_step_reference(state, acc, *args)
    mine_state, mine_acc = [t.clone() for t in state], [t.clone() for t in acc]
    got = ttt_step_triton(mine_state, mine_acc, *args)
    assert all(a is b for a, b in zip(got[1] + got[2], mine_state + mine_acc)), "the state must be updated in place"
    names = ["out"] + [f"state{i}" for i in range(len(state))] + [f"acc{i}" for i in range(len(acc))]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, [got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]])}
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("head_dim, dtype", [(16, torch.float32), (24, torch.float32), (16, torch.bfloat16)])
def test_step_matches_reference(layer_type, head_dim, dtype):
    # Row 0 completes its mini-batch (commit), row 1 is padding at a commit position (untouched), row 2 is
    # mid mini-batch; head_dim 24 is padded to 32 inside the kernel.
    check_step(layer_type, 3, 2, head_dim, position=[3, 7, 6], active=[True, False, True], dtype=dtype)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_steps_equal_chunk_reference(layer_type):
    """Token by token with the kernel == the dual form over the same tokens, rows starting at different
    offsets inside a mini-batch and one row shorter (padding steps): every output, the final state and acc."""
    batch, heads, head_dim, tokens = 3, 2, 16, 7
    state, acc, q, k, v, lr, tau, ln_w, ln_b = step_inputs(layer_type, batch, heads, head_dim, tokens)
    start, length = torch.tensor([0, 3, 6], device=DEVICE), torch.tensor([7, 7, 4], device=DEVICE)
    want_out, want_state, want_acc = ttt_chunk_reference(state, acc, q, k, v, lr, tau, ln_w, ln_b, start, length)

    state, acc = [t.clone() for t in state], [t.clone() for t in acc]
    outs = []
    for t in range(tokens):
        out, state, acc = ttt_step_triton(
            state, acc, q[:, :, t], k[:, :, t], v[:, :, t], lr[:, :, t], tau, ln_w, ln_b, start + t, t < length
        )
        outs.append(out)
    real = (torch.arange(tokens, device=DEVICE)[None, :] < length[:, None])[:, None, :, None]
    assert rel_err(torch.stack(outs, 2) * real, want_out * real) <= 1e-4
    for got, want in zip(state + acc, want_state + want_acc):
        assert rel_err(got, want) <= 1e-4


def test_broadcast_initial_state_is_copied_not_written():
    """The model's first step passes the inner parameters broadcast over the batch: they must stay intact. One
    row is the risky case: the broadcast view is then contiguous."""
    state, acc, q, k, v, lr, tau, ln_w, ln_b = step_inputs("linear", 1, 2, 16)
    params = [t[0].clone() for t in state]
    initial = [p.unsqueeze(0).expand(1, *p.shape) for p in params]
    args = (
        q[:, :, 0],
        k[:, :, 0],
        v[:, :, 0],
        lr[:, :, 0],
        tau,
        ln_w,
        ln_b,
        torch.tensor([3], device=DEVICE),
        torch.tensor([True], device=DEVICE),
    )  # position 3 commits: W itself would be written
    want = ttt_step_reference(initial, acc, *args)
    out, new_state, new_acc = ttt_step_triton(initial, [a.clone() for a in acc], *args)
    assert all(torch.equal(p, t[0]) for p, t in zip(params, state))  # `state` holds an untouched copy
    assert all(new.data_ptr() != old.data_ptr() for new, old in zip(new_state, initial))
    for got, ref in zip([out, *new_state, *new_acc], [want[0], *want[1], *want[2]]):
        assert rel_err(got, ref) <= 1e-4


def test_supported_shapes_and_errors(monkeypatch):
    state, acc, q, k, v, lr, tau, ln_w, ln_b = step_inputs("mlp", 2, 2, 16)
    q, k, v, lr = q[:, :, 0], k[:, :, 0], v[:, :, 0], lr[:, :, 0]
    position, active = torch.zeros(2, dtype=torch.long, device=DEVICE), torch.ones(2, dtype=torch.bool, device=DEVICE)
    assert decode_kernel_supported(state, q) and decode_kernel_supported(state, q.bfloat16())
    assert not decode_kernel_supported(state[:2], q)  # an MLP's first layer is not a TTT-Linear state
    assert not decode_kernel_supported([t.double() for t in state], q)
    assert not decode_kernel_supported(state, q.double())
    big = torch.zeros(2, 2, 256, device=DEVICE)
    assert not decode_kernel_supported(
        [torch.zeros(2, 2, 256, 256, device=DEVICE), torch.zeros(2, 2, 1, 256, device=DEVICE)], big
    )
    with pytest.raises(ValueError, match="not supported by the decode kernel"):
        ttt_step_triton([t.double() for t in state], acc, q, k, v, lr, tau, ln_w, ln_b, position, active)
    with pytest.raises(ValueError, match="acc must"):
        ttt_step_triton(state, acc[:2], q, k, v, lr, tau, ln_w, ln_b, position, active)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not decode_kernel_supported(state, q)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ttt_step_triton(state, acc, q, k, v, lr, tau, ln_w, ln_b, position, active)


@pytest.mark.parametrize("banks", [1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("channels", [40, 300 if DEVICE == "cpu" else 2048])
def test_conv_step_matches_reference_and_moves_the_state_in_place(banks, dtype, tol, channels):
    # Row 1 is padding this step (length 0): its window must stay; 300 channels span two programs (one masked).
    g = torch.Generator().manual_seed(banks)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    x, state = rand(3, 1, channels).to(dtype), rand(3, 3, channels).to(dtype)
    filters = [(rand(channels, 1, 4).to(dtype), rand(channels).to(dtype)) for _ in range(banks)]
    length = torch.tensor([1, 0, 1], device=DEVICE)
    expected = [causal_conv1d(x, w, b, state, length) for w, b in filters]
    moved = state.clone()
    ys, new_state = causal_conv1d_banks(x, filters, moved, length, kernel_backend="triton")
    assert new_state.data_ptr() == moved.data_ptr()
    assert torch.equal(new_state, expected[0][1])
    for y, (want, _) in zip(ys, expected):
        assert y.dtype == dtype and rel_err(y, want) <= tol


def test_conv_step_leaves_views_and_width_one_to_their_owners():
    # A state that is a view (of a larger buffer) or a broadcast is moved in a copy, never written through;
    # a width-1 convolution has no window and runs the reference.
    x, length = torch.randn(2, 1, 8, device=DEVICE), torch.tensor([1, 0], device=DEVICE)
    filters = [(torch.randn(8, 1, 4, device=DEVICE), torch.randn(8, device=DEVICE))]
    big = torch.randn(2, 5, 8, device=DEVICE)
    for state in (big[:, 1:4], torch.randn(1, 3, 8, device=DEVICE).expand(2, 3, 8)):
        before = state.clone()
        (y,), new_state = causal_conv1d_banks(x, filters, state, length, kernel_backend="triton")
        want, want_state = causal_conv1d(x, *filters[0], before, length)
        assert torch.equal(state, before) and torch.equal(new_state, want_state) and rel_err(y, want) <= 1e-6
    width_one = [(torch.randn(8, 1, 1, device=DEVICE), torch.randn(8, device=DEVICE))]
    (y,), new_state = causal_conv1d_banks(x, width_one, x.new_zeros(2, 0, 8), length, kernel_backend="triton")
    assert new_state.shape == (2, 0, 8) and torch.equal(
        y, causal_conv1d(x, *width_one[0], x.new_zeros(2, 0, 8), length)[0]
    )


def test_model_conv_steps_follow_the_config_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(ttt_ops, "causal_conv_step_triton", lambda *a: calls.append(a) or causal_conv_step_triton(*a))
    model = tiny_model("linear", kernel_backend="triton")  # Mamba backbone: a pre-conv and the shared q/k pair
    layers = model.config.num_hidden_layers
    for backend, expected in (("triton", 2 * layers), ("torch", 0)):
        model.config.kernel_backend = backend
        calls.clear()
        with torch.no_grad():
            out = model(random_ids(1, 5), use_cache=True)
            model(random_ids(1, 1), cache=out.cache, use_cache=True)
        assert len(calls) == expected, backend


def test_conv_step_dispatch_and_errors(monkeypatch):
    x, state = torch.randn(2, 1, 8, device=DEVICE), torch.zeros(2, 3, 8, device=DEVICE)
    filters = [(torch.randn(8, 1, 4, device=DEVICE), torch.randn(8, device=DEVICE))]
    calls = []
    monkeypatch.setattr(ttt_ops, "causal_conv_step_triton", lambda *a: calls.append(a) or causal_conv_step_triton(*a))
    length = torch.ones(2, dtype=torch.long, device=DEVICE)
    causal_conv1d_banks(x, filters, state, length, kernel_backend="triton")
    causal_conv1d_banks(x, filters, state, length, kernel_backend="torch")
    causal_conv1d_banks(torch.randn(2, 5, 8, device=DEVICE), filters, state, length * 5, kernel_backend="triton")
    with torch.enable_grad():
        causal_conv1d_banks(x.requires_grad_(), filters, state, length, kernel_backend="triton")
    assert len(calls) == 1  # only the no-grad one-token step of the Triton backend
    with pytest.raises(ValueError, match="dtype"):
        causal_conv_step_triton(x.detach(), filters, state.double(), length)
    with pytest.raises(ValueError, match="one token"):
        causal_conv_step_triton(torch.randn(2, 2, 8, device=DEVICE), filters, state, length)
    with pytest.raises(ValueError, match="weight"):
        causal_conv_step_triton(x.detach(), [*filters, (torch.randn(6, 1, 4, device=DEVICE), None)], state, length)


def test_mlp_model_decodes_the_same_with_both_backends(no_tf32):
    """A TTT-MLP model with kernel_backend="triton" decodes through the kernel (its prefill through the chunk
    forward kernel): a
    left-padded prompt then steps crossing commits give the torch backend's logits; beam search (which
    reorders the cache between in-place steps) picks the same tokens."""
    model = tiny_model("mlp", hidden_size=32, num_attention_heads=2, num_hidden_layers=1, mini_batch_size=MB)  # f = 16
    model = model.to(DEVICE)
    ids = random_ids(2, 13, vocab=96, seed=5).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits, generated = {}, {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            model.config.kernel_backend = backend
            out = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
            steps = [out.logits[:, -1]]
            for t in range(7, 13):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache)
                steps.append(out.logits[:, -1])
            logits[backend] = torch.stack(steps, 1)
            generated[backend] = model.generate(
                ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False
            )
    assert rel_err(logits["triton"], logits["torch"]) <= 1e-4
    assert torch.equal(generated["triton"], generated["torch"])


GPU_CASES = [
    (layer_type, heads, head_dim, dtype)
    for layer_type in ("linear", "mlp")
    for heads, head_dim in ((12, 64), (16, 96), (32, 64), (8, 128))
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.gpu
@pytest.mark.parametrize("layer_type, heads, head_dim, dtype", GPU_CASES)
def test_step_matches_reference_at_real_sizes(layer_type, heads, head_dim, dtype, no_tf32):
    position = [15 if r % 3 == 0 else 16 + r for r in range(16)]  # every third row commits (mini-batch 16)
    active = [r % 5 != 4 for r in range(16)]
    check_step(layer_type, 16, heads, head_dim, position, active, dtype=dtype, mini_batch=16)


@pytest.mark.gpu
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_cuda_graph_replay_matches_eager(layer_type, no_tf32):
    """The step captured once in a CUDA graph, replayed over 20 tokens (crossing a commit) with positions and
    inputs copied into static buffers, equals eager steps."""
    batch, heads, head_dim, tokens = 16, 12, 64, 20
    state, acc, q, k, v, lr, tau, ln_w, ln_b = step_inputs(
        layer_type, batch, heads, head_dim, tokens, dtype=torch.bfloat16, mini_batch=16
    )
    start = torch.arange(batch, device=DEVICE) * 3
    active = torch.arange(batch, device=DEVICE) % 4 != 1

    eager_state, eager_acc = [t.clone() for t in state], [t.clone() for t in acc]
    eager = []
    for t in range(tokens):
        out, _, _ = ttt_step_triton(
            eager_state, eager_acc, q[:, :, t], k[:, :, t], v[:, :, t], lr[:, :, t], tau, ln_w, ln_b, start + t, active
        )
        eager.append(out)

    graph_state, graph_acc = [t.clone() for t in state], [t.clone() for t in acc]
    static = [x[:, :, 0].clone() for x in (q, k, v, lr)]
    position = start.clone()

    def step():
        return ttt_step_triton(graph_state, graph_acc, *static, tau, ln_w, ln_b, position, active)[0]

    # Warm up (compiles the kernel) on a side stream on scratch copies, as torch.cuda.graphs recommends.
    saved = [t.clone() for t in graph_state + graph_acc]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for t, s in zip(graph_state + graph_acc, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the launch without running it
        static_out = step()

    for t in range(tokens):
        for buffer, x in zip(static, (q, k, v, lr)):
            buffer.copy_(x[:, :, t])
        position.copy_(start + t)
        graph.replay()
        assert rel_err(static_out, eager[t]) <= 1e-5, t
    for got, want in zip(graph_state + graph_acc, eager_state + eager_acc):
        assert rel_err(got, want) <= 1e-5
