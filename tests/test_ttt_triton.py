"""The TTT-Linear Triton kernels against the torch reference: on CPU under TRITON_INTERPRET=1 (set by
conftest) at tiny sizes, on CUDA at real sizes (marked gpu)."""

import pytest
import torch
from ttt_testing import check_double_backward_is_refused, random_ids, rel_err, tiny_model

from ttt_hf.ttt import ttt_ops, ttt_triton_linear
from ttt_hf.ttt.ttt_ops import ttt_chunk, ttt_chunk_reference, ttt_step, ttt_step_reference
from ttt_hf.ttt.ttt_triton_linear import ttt_linear_chunk_triton

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MB = 16


def linear_inputs(batch, heads, seq_len, head_dim, dtype=torch.float32, device=DEVICE, seed=0, mini_batch=MB):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=g)
    q, k, v = (rand(batch, heads, seq_len, head_dim).to(device, dtype) for _ in range(3))
    lr = (torch.rand(batch, heads, seq_len, generator=g) * 0.5 / head_dim**0.5).to(device)
    tau = (1.0 / torch.arange(1, mini_batch + 1) + 0.05 * torch.randn(mini_batch, generator=g)).clamp_min(0).to(device)
    ln_w, ln_b = (1 + rand(heads, 1, head_dim, scale=0.1)).to(device), rand(heads, 1, head_dim, scale=0.1).to(device)
    state = [
        rand(batch, heads, head_dim, head_dim, scale=0.3).to(device),
        rand(batch, heads, 1, head_dim, scale=0.1).to(device),
    ]
    acc = [
        rand(batch, heads, head_dim, head_dim, scale=0.01).to(device),
        rand(batch, heads, 1, head_dim, scale=0.01).to(device),
    ]
    return state, acc, q, k, v, lr, tau, ln_w, ln_b


def check_chunk(
    batch,
    heads,
    seq_len,
    head_dim,
    start,
    length,
    dtype=torch.float32,
    tol=1e-4,
    checkpoint_group=0,
    backward=True,
    mini_batch=MB,
    tols=None,
):
    """Output, final state and accumulator, and the gradient of every input (for random cotangents of all
    four results) against the torch reference, within `tol` (`tols`: per result name, for some)."""
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(
        batch, heads, seq_len, head_dim, dtype, mini_batch=mini_batch
    )
    inputs = [q, k, v, lr, tau, ln_w, ln_b, *state, *acc]
    for x in inputs:
        x.requires_grad_(backward)
    start, length = torch.tensor(start, device=DEVICE), torch.tensor(length, device=DEVICE)
    args = (state, acc, q, k, v, lr, tau, ln_w, ln_b, start, length)
    real = (torch.arange(seq_len, device=DEVICE)[None, :] < length[:, None])[
        :, None, :, None
    ]  # padded slots: undefined
    g = torch.Generator(device=DEVICE).manual_seed(1)
    cotangents = None
    results = {}
    for backend in ("torch", "triton"):  # the reference upcasts half-precision inputs to fp32 itself
        out, new_state, new_acc = ttt_chunk(*args, checkpoint_group=checkpoint_group, kernel_backend=backend)
        outputs = [out * real, *new_state, *new_acc]
        if cotangents is None:
            cotangents = [torch.randn(x.shape, generator=g, device=DEVICE) for x in outputs]
        grads = torch.autograd.grad(outputs, inputs, cotangents) if backward else ()
        results[backend] = [x.detach() for x in outputs] + list(grads)
    names = [
        "out",
        "W",
        "c",
        "acc_W",
        "acc_c",
        "d_q",
        "d_k",
        "d_v",
        "d_lr",
        "d_tau",
        "d_ln_w",
        "d_ln_b",
        "d_W",
        "d_c",
        "d_acc_W",
        "d_acc_c",
    ]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, results["triton"], results["torch"])}
    tols = {n: (tols or {}).get(n, tol) for n in names}
    assert all(errors[n] <= tols[n] for n in names), {n: f"{e:.2e} (tol {tols[n]:.0e})" for n, e in errors.items()}


@pytest.mark.parametrize("head_dim, checkpoint_group", [(16, 2), (24, 1)])
def test_chunk_kernel_and_gradients_match_reference_with_offsets_and_partial_mini_batches(head_dim, checkpoint_group):
    # row 0 starts mid mini-batch and ends mid one (keeps its accumulator); row 1 is right-padded; head_dim 24
    # is padded to 32 inside the kernel; groups of 2 leave a last group of 1 (3 mini-batches).
    check_chunk(2, 2, 40, head_dim, start=[5, 32], length=[40, 27], checkpoint_group=checkpoint_group)


@pytest.mark.parametrize("checkpoint_group", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_kernel_and_gradients_with_half_precision_inputs(dtype, checkpoint_group):
    # Half-precision loads and stores (d_q, d_k, d_v in the inputs' dtype, the shares of d_k, d_v in place; bf16
    # start states; bf16 products for fp16 inputs too). Measured here: d_k 7.8e-3 (bf16), everything else <=
    # 4.6e-3, the states kept in fp32 <= 1.5e-7: bounds that a doubled error breaks for most results.
    check_chunk(
        2,
        2,
        40,
        16,
        start=[5, 32],
        length=[40, 27],
        dtype=dtype,
        tol=6e-3,
        checkpoint_group=checkpoint_group,
        tols={"d_k": 1.2e-2, "W": 1e-6, "c": 1e-6, "acc_W": 1e-6, "acc_c": 1e-6},
    )


@pytest.mark.parametrize("checkpoint_group", [1, 16])
def test_chunk_kernel_and_gradients_within_one_mini_batch(checkpoint_group):
    # One mini-batch per row: row 0 ends inside it (its accumulator comes out), row 1 starts inside it and ends
    # at its end (commits).
    check_chunk(2, 2, 11, 16, start=[0, 5], length=[11, 11], checkpoint_group=checkpoint_group)


def test_chunk_kernel_and_gradients_with_mini_batches_of_32():
    check_chunk(2, 1, 70, 16, start=[3, 0], length=[70, 64], mini_batch=32)


def test_aligned_full_rows_take_the_slots_as_views():
    # Both rows start a mini-batch (0 and 16) and fill whole ones: no gathers, same results and gradients.
    layout = ttt_ops.MiniBatchSlots(torch.tensor([0, 16]), torch.tensor([32, 32]), MB, 32)
    assert layout.dense and not ttt_ops.MiniBatchSlots(torch.tensor([0, 16]), torch.tensor([32, 31]), MB, 32).dense
    x = torch.randn(2, 3, 32, 4)
    assert layout.to_slots(x).data_ptr() == x.data_ptr() and torch.equal(layout.from_slots(layout.to_slots(x)), x)
    check_chunk(2, 2, 32, 16, start=[0, 16], length=[32, 32], checkpoint_group=1)


def test_forward_in_segments_hands_the_state_on(monkeypatch):
    # Room for the start states of two mini-batches of all 4 (row, head) pairs: 3 mini-batches run as 2 + 1 in
    # the forward and (one checkpoint group of 2 per segment: the backward also holds a local adjoint) in the backward.
    monkeypatch.setattr(ttt_triton_linear, "SEGMENT_BYTES", 2 * 4 * (16 * 16 + 16) * 4)
    check_chunk(2, 2, 40, 16, start=[5, 32], length=[40, 27], checkpoint_group=2)


class LaunchCounter:
    """Stands in for a Triton kernel and records the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize(
    "start, length, segment_bytes, backward_segments",
    [
        ([0, 0], [48, 32], None, 1),  # the shorter row's span mini-batch is inert: the edge launch runs it
        ([3, 16], [40, 0], None, 1),  # an empty row starting mid mini-batch
        ([3, 0], [5, 40], None, 1),  # a row's only mini-batch is partial and holds tokens: the edge launch runs it once
        ([5, 0], [100, 60], 4 * 4 * (16 * 16 + 16) * 8, 2),  # 7 mini-batches in segments of two groups of 2: 4 + 3
    ],
)
def test_chunk_gradients_across_edge_mini_batches_and_segments(
    monkeypatch, start, length, segment_bytes, backward_segments
):
    if segment_bytes:
        monkeypatch.setattr(ttt_triton_linear, "SEGMENT_BYTES", segment_bytes)
    chain = LaunchCounter(ttt_triton_linear._ttt_linear_chunk_bwd_state_kernel)
    monkeypatch.setattr(ttt_triton_linear, "_ttt_linear_chunk_bwd_state_kernel", chain)
    check_chunk(2, 2, max(length), 16, start=start, length=length, checkpoint_group=2)
    assert len(chain.grids) == backward_segments


def test_keeping_every_start_state_skips_the_recomputation(monkeypatch):
    # checkpoint_group=1: one sequential forward pass in all (the forward's, over all 7 mini-batches at once);
    # the backward's segments bound its local adjoints only: room for 3 mini-batches of all 4 (row, head) pairs.
    monkeypatch.setattr(ttt_triton_linear, "SEGMENT_BYTES", 3 * 4 * (16 * 16 + 16) * 4)
    state_pass = LaunchCounter(ttt_triton_linear._ttt_linear_chunk_state_kernel)
    chain = LaunchCounter(ttt_triton_linear._ttt_linear_chunk_bwd_state_kernel)
    monkeypatch.setattr(ttt_triton_linear, "_ttt_linear_chunk_state_kernel", state_pass)
    monkeypatch.setattr(ttt_triton_linear, "_ttt_linear_chunk_bwd_state_kernel", chain)
    check_chunk(2, 2, 100, 16, start=[5, 0], length=[100, 60], checkpoint_group=1)
    assert len(state_pass.grids) == 1 and len(chain.grids) == 3


def test_padded_slots_are_zero_with_both_backends():
    # A loss that reads the padding (labels not masked) gets the same gradients from both backends.
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(2, 2, 40, 16)
    inputs = [q, k, v, lr, tau, ln_w, ln_b]
    for x in inputs:
        x.requires_grad_()
    start, length = torch.tensor([5, 32], device=DEVICE), torch.tensor([40, 27], device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        out, _, _ = ttt_chunk(state, acc, q, k, v, lr, tau, ln_w, ln_b, start, length, kernel_backend=backend)
        assert not out[1, :, 27:].any()
        results[backend] = [out.detach(), *torch.autograd.grad(out.square().sum(), inputs)]
    for got, want in zip(results["triton"], results["torch"]):
        assert rel_err(got, want) <= 1e-4


def test_chunk_gradients_when_only_the_output_is_used():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(1, 2, 20, 16)
    span = torch.tensor([3], device=DEVICE)
    inputs = [q, k, v, lr, tau, ln_w, ln_b]
    for x in inputs:
        x.requires_grad_()
    grads = {}
    for backend in ("torch", "triton"):
        out, _, _ = ttt_chunk(
            state, acc, q, k, v, lr, tau, ln_w, ln_b, span, torch.tensor([17], device=DEVICE), kernel_backend=backend
        )
        grads[backend] = torch.autograd.grad(out[:, :, :17].square().sum(), inputs)
    for got, want in zip(grads["triton"], grads["torch"]):
        assert rel_err(got, want) <= 1e-4
    with pytest.raises(ValueError, match="checkpoint_group must be >= 1"):
        ttt_linear_chunk_triton(state, acc, q, k, v, lr, tau, ln_w, ln_b, span, 1e-6, checkpoint_group=0)


def test_double_backward_is_refused():
    check_double_backward_is_refused(*linear_inputs(1, 1, 32, 16))


def test_step_kernel_matches_reference_across_a_commit():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(3, 2, 1, 16)
    position = torch.tensor([MB - 1, 3, MB - 1], device=DEVICE)  # rows 0 and 2 end a mini-batch
    active = torch.tensor([True, True, False], device=DEVICE)
    args = (state, acc, q[:, :, 0], k[:, :, 0], v[:, :, 0], lr[:, :, 0], tau, ln_w, ln_b, position, active)
    reference = ttt_step_reference(*args)
    owned = [t.clone() for t in (*state, *acc)]
    out, new_state, new_acc = ttt_step(owned[:2], owned[2:], *args[2:], kernel_backend="triton")
    assert rel_err(out[:2], reference[0][:2]) <= 1e-5
    for got, want in zip([*new_state, *new_acc], [*reference[1], *reference[2]]):
        assert rel_err(got, want) <= 1e-5
    assert new_state[0].data_ptr() == owned[0].data_ptr()  # the cache's state is updated in place
    assert torch.equal(new_state[0][2], state[0][2]) and torch.equal(new_acc[0][2], acc[0][2])  # inactive row


def test_steps_equal_one_chunk():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(2, 2, 20, 16)
    acc = [torch.zeros_like(a) for a in acc]
    zero, full = torch.zeros(2, dtype=torch.long, device=DEVICE), torch.full((2,), 20, device=DEVICE)
    reference, ref_state, ref_acc = ttt_chunk_reference(state, acc, q, k, v, lr, tau, ln_w, ln_b, zero, full)
    state, acc = [s.clone() for s in state], [a.clone() for a in acc]
    active = torch.ones(2, dtype=torch.bool, device=DEVICE)
    for t in range(20):
        out, state, acc = ttt_step(
            state,
            acc,
            q[:, :, t],
            k[:, :, t],
            v[:, :, t],
            lr[:, :, t],
            tau,
            ln_w,
            ln_b,
            zero + t,
            active,
            kernel_backend="triton",
        )
        assert rel_err(out, reference[:, :, t]) <= 1e-4
    for got, want in zip([*state, *acc], [*ref_state, *ref_acc]):
        assert rel_err(got, want) <= 1e-4


def test_chunk_backward_saves_a_state_per_group_not_per_mini_batch():
    # Counted as the bytes saved for backward, in copies of q: the kernel path keeps the inputs, their slot
    # copies, the slot output and the state every 16 mini-batches; the reference (without recomputation) keeps
    # activations of every mini-batch, several [f, f] tensors each.
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(1, 1, 32 * MB, 32)
    for x in (q, k, v, lr, *state):
        x.requires_grad_()
    zero, length = torch.zeros(1, dtype=torch.long, device=DEVICE), torch.full((1,), 32 * MB, device=DEVICE)
    args = (state, acc, q, k, v, lr, tau, ln_w, ln_b, zero, length)
    runs = {
        "torch": lambda: ttt_ops.ttt_chunk_reference(*args, checkpoint_group=0),  # no recomputation
        "torch, groups of 16": lambda: ttt_chunk(*args, kernel_backend="torch"),  # the config's default, 0
        "triton": lambda: ttt_chunk(*args, kernel_backend="triton"),
    }
    saved = {}
    for name, run in runs.items():
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        saved[name] = sum(storages.values()) / q.nbytes
    assert saved["triton"] <= 8 and saved["torch"] > 2 * saved["triton"], saved
    # `scan_checkpoint_group_size` 0 means groups of 16 on the reference too.
    assert saved["torch, groups of 16"] < saved["torch"] / 2, saved


def test_dispatch_rules(monkeypatch):
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(1, 1, 16, 16, device="cpu")
    assert not ttt_ops._use_kernel("auto", state, q, MB)  # CPU: the reference
    assert not ttt_ops._use_kernel("torch", state, q, MB)
    assert ttt_ops._use_kernel("triton", state, q, MB)
    assert not ttt_ops._use_kernel("triton", state + state, q, MB)  # not TTT-MLP's state shapes: reference
    assert not ttt_ops._use_kernel("triton", state, q.double(), MB)
    for mini_batch in (4, 8, 12, 128):  # tiles of powers of two, products of at least 16 rows: the reference
        assert not ttt_ops._use_kernel("triton", state, q, mini_batch)
    assert ttt_ops._use_kernel("triton", state, q, 32) and ttt_ops._use_kernel("triton", state, q, 64)
    q.requires_grad_()
    step_args = (
        q[:, :, 0],
        k[:, :, 0],
        v[:, :, 0],
        lr[:, :, 0],
        tau,
        ln_w,
        ln_b,
        torch.zeros(1, dtype=torch.long),
        torch.ones(1, dtype=torch.bool),
    )
    out, _, _ = ttt_step(state, acc, *step_args, kernel_backend="triton")  # the step kernel has no backward: reference
    assert out.grad_fn is not None
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ttt_ops._use_kernel("triton", state, q.detach(), MB)
    monkeypatch.setattr(ttt_ops, "ttt_linear_chunk_triton", None)
    with pytest.raises(ImportError, match="needs the triton package"):
        ttt_ops.check_kernel_backend("triton")


def test_model_with_triton_backend_matches_torch_backend():  # logits, greedy decoding and every gradient
    ids = random_ids(2, 37, vocab=96, seed=3)
    models = {
        b: tiny_model("linear", hidden_size=64, mini_batch_size=MB, scan_checkpoint_group_size=2, kernel_backend=b)
        for b in ("torch", "triton")
    }
    with torch.no_grad():
        full = {b: m(ids).logits for b, m in models.items()}
        assert rel_err(full["triton"], full["torch"]) <= 1e-4
        generated = {b: m.generate(ids[:, :20], max_new_tokens=20, do_sample=False) for b, m in models.items()}
    assert torch.equal(generated["triton"], generated["torch"])
    for model in models.values():
        model.train()(ids, labels=ids).loss.backward()
    grads = {b: {n: p.grad for n, p in m.named_parameters()} for b, m in models.items()}
    assert grads["torch"].keys() == grads["triton"].keys()
    for name, want in grads["torch"].items():
        assert rel_err(grads["triton"][name], want) <= 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_kernels_at_real_sizes(head_dim, dtype, tol, no_tf32):
    for checkpoint_group in (5, 1):  # recomputed from checkpoints, and kept
        check_chunk(
            4,
            8,
            2048 + 5,
            head_dim,
            start=[0, 7, 16, 3],
            length=[2053, 2000, 1500, 2053],
            dtype=dtype,
            tol=tol,
            checkpoint_group=checkpoint_group,
        )
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(16, 12, 1, head_dim, dtype)
    position = torch.arange(16, device=DEVICE) * 5
    active = torch.ones(16, dtype=torch.bool, device=DEVICE)
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], lr[:, :, 0], tau, ln_w, ln_b, position, active)
    reference = ttt_step_reference(state, acc, *args)
    out, new_state, new_acc = ttt_step(
        [s.clone() for s in state], [a.clone() for a in acc], *args, kernel_backend="triton"
    )
    assert rel_err(out, reference[0]) <= tol
    for got, want in zip([*new_state, *new_acc], [*reference[1], *reference[2]]):
        assert rel_err(got, want) <= tol


@pytest.mark.gpu
def test_decode_step_captures_in_a_cuda_graph():
    state, acc, q, k, v, lr, tau, ln_w, ln_b = linear_inputs(16, 12, 1, 64)
    position = torch.full((16,), 5, device=DEVICE)
    active = torch.ones(16, dtype=torch.bool, device=DEVICE)
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], lr[:, :, 0], tau, ln_w, ln_b, position, active)
    eager_state, eager_acc = [s.clone() for s in state], [a.clone() for a in acc]
    graph_state, graph_acc = [s.clone() for s in state], [a.clone() for a in acc]
    for _ in range(3):
        eager_out, eager_state, eager_acc = ttt_step(eager_state, eager_acc, *args, kernel_backend="triton")
    ttt_step([s.clone() for s in state], [a.clone() for a in acc], *args, kernel_backend="triton")  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, _, _ = ttt_step(graph_state, graph_acc, *args, kernel_backend="triton")
    for _ in range(3):
        graph.replay()
    torch.testing.assert_close(graph_out, eager_out)
    for got, want in zip([*graph_state, *graph_acc], [*eager_state, *eager_acc]):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_model_logits_equal_across_backends_on_cuda(no_tf32):
    ids = random_ids(2, 100, vocab=96, seed=4).cuda()
    models = {
        b: tiny_model("linear", hidden_size=64, mini_batch_size=MB, kernel_backend=b).cuda()
        for b in ("torch", "triton")
    }
    with torch.no_grad():
        logits = {b: m(ids).logits for b, m in models.items()}
        generated = {b: m.generate(ids[:, :40], max_new_tokens=30, do_sample=False) for b, m in models.items()}
    assert rel_err(logits["triton"], logits["torch"]) <= 1e-4
    assert torch.equal(generated["triton"], generated["torch"])
