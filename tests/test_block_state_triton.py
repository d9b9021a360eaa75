"""Block-State fast paths: the Triton S4D kernels against the torch reference (on CPU under TRITON_INTERPRET=1,
at tiny sizes; on CUDA at real sizes), the dispatch rule, and the fused 2H-head attention of SH/MH layers."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # the kernels run in the interpreter; set before triton is imported (as conftest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
from block_state_testing import random_ids, tiny_model

from ttt_hf.block_state import block_state_triton, ssm_ops
from ttt_hf.block_state.cache_block_state import BlockStateLayerCache
from ttt_hf.block_state.modeling_block_state import TokenStep, apply_rope, rotary_heads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _s4d_parameters(filters, features, modes, seed=0, device="cpu"):
    """Raw S4D parameters as BlockStateS4D holds them, with dt up to ~0.7 so every lag matters."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "log_a_real": math.log(0.5) + 0.1 * torch.randn(filters, features, modes, generator=g),
        "a_imag": math.pi * torch.arange(modes).float() + 0.1 * torch.randn(filters, features, modes, generator=g),
        "log_dt": torch.empty(filters, features).uniform_(math.log(1e-3), math.log(0.7), generator=g),
        "c": torch.randn(filters, features, modes, 2, generator=g),
        "skip": torch.randn(filters, features, generator=g),
    }
    return {name: value.to(device).requires_grad_() for name, value in params.items()}


def _kernel_and_gradients(kernel_fn, params, length, seed=1):
    dt_a, db = ssm_ops.s4d_discretize(params["log_a_real"], params["a_imag"], params["log_dt"])
    kernel = kernel_fn(dt_a, torch.view_as_complex(params["c"]) * db, length)
    weights = torch.randn(kernel.shape, generator=torch.Generator().manual_seed(seed)).to(kernel.device)
    names = ("log_a_real", "a_imag", "log_dt", "c")
    grads = torch.autograd.grad((kernel * weights).sum(), [params[n] for n in names])
    return kernel, dict(zip(names, grads))


def _assert_relative(actual, expected, tol, name=""):
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"


def _check_kernel_matches_reference(filters, features, modes, length, tol):
    params = _s4d_parameters(filters, features, modes, device=DEVICE)
    expected, expected_grads = _kernel_and_gradients(ssm_ops.s4d_kernel_reference, params, length)
    actual, actual_grads = _kernel_and_gradients(block_state_triton.s4d_kernel_triton, params, length)
    _assert_relative(actual, expected, tol, "kernel")
    for name, grad in expected_grads.items():
        _assert_relative(actual_grads[name], grad, tol, name)


@pytest.mark.parametrize("length", [1, 37, 300])
def test_kernel_forward_and_gradients_match_the_reference(length):
    # 15 channels and 300 lags: partial channel and lag tiles.
    _check_kernel_matches_reference(filters=3, features=5, modes=4, length=length, tol=1e-4)


def test_kernel_backward_sums_lag_splits(monkeypatch):
    monkeypatch.setattr(block_state_triton, "_BWD_SPLIT", 128)
    _check_kernel_matches_reference(filters=1, features=3, modes=2, length=333, tol=1e-4)


def _check_scan(batch, length, filters, features, modes, tol, dtype=torch.float32, seed=7):
    """The Triton scan (output and the gradients of u and every S4D parameter) against the FFT reference."""
    params = _s4d_parameters(filters, features, modes, seed=seed, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, features, generator=g).to(DEVICE, dtype).requires_grad_()
    weights = torch.randn(batch, length, filters, features, generator=g).to(DEVICE)
    leaves = [u, *params.values()]
    results = []
    for backend in ("torch", "triton"):
        dt_a, db = ssm_ops.s4d_discretize(params["log_a_real"], params["a_imag"], params["log_dt"])
        c = torch.view_as_complex(params["c"])
        y = ssm_ops.s4d_causal_conv(u, dt_a, db, c, params["skip"], dtype, kernel_backend=backend)
        assert y.dtype == dtype
        results.append((y.float(), torch.autograd.grad((y.float() * weights).sum(), leaves)))
    (expected, expected_grads), (actual, actual_grads) = results
    _assert_relative(actual, expected, tol, "output")
    for name, grad, grad_expected in zip(["u", *params], actual_grads, expected_grads):
        assert grad.dtype == grad_expected.dtype
        _assert_relative(grad.float(), grad_expected.float(), tol, name)


@pytest.mark.parametrize(
    "batch,length,filters,features,modes",
    [(2, 37, 1, 3, 4), (1, 5, 2, 3, 4), (2, 70, 3, 5, 3), (1, 33, 1, 40, 8)],
    ids=["sh", "short-mh", "three-filters-odd-modes", "two-channel-blocks"],
)
def test_scan_matches_the_fft_reference(batch, length, filters, features, modes):
    _check_scan(batch, length, filters, features, modes, tol=1e-4)


@pytest.mark.parametrize("filters", [1, 2])
def test_scan_in_segments_matches_the_fft_reference(filters, monkeypatch):
    # Sequences cut into 3 segments (the last one partial) for both passes: states chained across them.
    monkeypatch.setattr(block_state_triton, "_SCAN_MIN_SEGMENT", 8)
    monkeypatch.setattr(block_state_triton, "_SCAN_PROGRAMS_PER_SM", 8)
    assert block_state_triton._segments(70, 2, 16, torch.device(DEVICE))[0] == 3
    _check_scan(2, 70, filters, 3, 4, tol=1e-4)


def test_scan_bf16_input_and_output():
    _check_scan(2, 37, 2, 3, 4, tol=2e-2, dtype=torch.bfloat16)


def test_scan_is_exactly_causal():
    params = _s4d_parameters(2, 3, 4, seed=8)
    dt_a, db = ssm_ops.s4d_discretize(params["log_a_real"], params["a_imag"], params["log_dt"])
    u = torch.randn(1, 21, 3, requires_grad=True)
    y = ssm_ops.s4d_causal_conv(
        u, dt_a, db, torch.view_as_complex(params["c"]), params["skip"], kernel_backend="triton"
    )
    for t in range(21):
        (grad,) = torch.autograd.grad(y[0, t].sum(), u, retain_graph=True)
        assert torch.all(grad[0, t + 1 :] == 0), f"output {t} depends on a later input"
        assert torch.all(grad[0, : t + 1].abs().sum(-1) > 0)


@pytest.mark.parametrize("with_plain", [True, False], ids=["with-cross-heads", "alone"])
def test_rotary_concat_matches_the_reference(with_plain):
    # 37 tokens (a partial token block), positions up to 70k (the kernel wraps the angles first).
    g = torch.Generator().manual_seed(9)
    rotated = torch.randn(2, 37, 3, 16, generator=g).to(DEVICE).requires_grad_()
    plain = torch.randn(2, 37, 2, 16, generator=g).to(DEVICE).requires_grad_() if with_plain else None
    position = torch.randint(0, 70000, (2, 37), generator=g).to(DEVICE)
    weights = torch.randn(2, 37, 5 if with_plain else 3, 16, generator=g).to(DEVICE)
    leaves = [rotated] + ([plain] if with_plain else [])
    results = []
    for backend in ("torch", "triton"):
        out = rotary_heads(rotated, plain, position, 10000.0, backend)
        results.append((out, torch.autograd.grad((out * weights).sum(), leaves)))
    (expected, expected_grads), (actual, actual_grads) = results
    _assert_relative(actual, expected, 1e-5, "output")
    for grad, grad_expected in zip(actual_grads, expected_grads):
        _assert_relative(grad, grad_expected, 1e-5, "gradient")


@pytest.mark.parametrize(
    "log_dt_shift, dtype",
    # -6: dt A ~ 1e-5, where dB needs expm1's accuracy; bf16: a bf16 model's parameters and input, read as they are
    [(0.0, torch.float32), (-6.0, torch.float32), (0.0, torch.bfloat16)],
)
def test_fused_decode_step_matches_the_reference(log_dt_shift, dtype):
    params = {k: v.detach().to(DEVICE) for k, v in _s4d_parameters(2, 5, 4, seed=3).items()}
    params["log_dt"] = params["log_dt"] + log_dt_shift
    params = {k: v.to(dtype) for k, v in params.items()}
    g = torch.Generator().manual_seed(4)
    u = torch.randn(3, 5, generator=g).to(DEVICE, dtype)
    x = torch.randn(3, 2, 5, 4, dtype=torch.complex64, generator=g).to(DEVICE)
    active = torch.tensor([True, False, True], device=DEVICE)
    args = (u, x, params["log_a_real"], params["a_imag"], params["log_dt"], params["c"], params["skip"], active)
    y_ref, x_ref = ssm_ops.s4d_decode_step_reference(*args)
    y, state = block_state_triton.s4d_step_triton(*args, dtype)
    assert y.dtype == dtype
    _assert_relative(y.float(), y_ref, 1e-5 if dtype == torch.float32 else 8e-3, "y")  # bf16: within one ulp
    _assert_relative(torch.view_as_real(state), torch.view_as_real(x_ref), 1e-5, "state")
    assert torch.equal(state[1], x[1])  # inactive rows keep their state


def test_dispatch_rule(monkeypatch):
    params = _s4d_parameters(1, 3, 2)
    dt_a, db = ssm_ops.s4d_discretize(params["log_a_real"], params["a_imag"], params["log_dt"])
    calls = []
    monkeypatch.setattr(ssm_ops, "s4d_kernel_triton", lambda *a: calls.append(a) or ssm_ops.s4d_kernel_reference(*a))
    ssm_ops.s4d_kernel(dt_a, db, 8, "auto")
    ssm_ops.s4d_kernel(dt_a, db, 8, "torch")
    assert calls == []  # "auto" on CPU runs the reference, as does "torch"
    if torch.cuda.is_available():
        ssm_ops.s4d_kernel(dt_a.cuda(), db.cuda(), 8, "auto")
        assert len(calls) == 1  # "auto" on CUDA runs the kernel
    else:
        ssm_ops.s4d_kernel(dt_a, db, 8, "triton")
        assert len(calls) == 1  # "triton" on CPU runs the kernel in the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ssm_ops.s4d_kernel(dt_a, db, 8, "triton")
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        ssm_ops.s4d_kernel(dt_a, db, 8, "cuda")
    monkeypatch.setattr(ssm_ops, "s4d_kernel_triton", None)  # triton not installed
    with pytest.raises(ImportError, match="needs the triton package"):
        ssm_ops.check_kernel_backend("triton")


def _check_slot_attention_step(batch, slots, heads, head_dim, offsets, dtype, tol, device=DEVICE, seed=5):
    """The fused decoding attention of the self (rotated) and cross heads of a tiny SH layer against its unfused
    path (rotary embedding, `_write_slot`, masked SDPA per group), with one inactive row, at large positions; the
    self and cross queries are slices of a wider head axis."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    attention = tiny_model(hidden_size=heads * head_dim, num_attention_heads=heads, block_size=slots).model
    attention = attention.layers[0].attn.to(device)
    query = randn(batch, 1, 2 * heads, head_dim)
    keys, values = (
        [randn(batch, 1, heads, head_dim) for _ in range(2)],
        [randn(batch, 1, heads, head_dim) for _ in range(2)],
    )
    offset = torch.tensor(offsets, device=device)
    active = torch.arange(batch, device=device) != 1
    step = TokenStep(start=offset + 7 * slots, length=active.long(), offset=offset, block_size=slots)
    names = ["self", "cross"]
    caches = {f"{name}_{kind}": randn(batch, slots, heads, head_dim) for name in names for kind in "kv"}
    reference, fused = BlockStateLayerCache(), BlockStateLayerCache()
    for name, tensor in caches.items():
        reference.set(name, tensor.clone())
        fused.set(name, tensor.clone())
    queries = [query[:, :, :heads], query[:, :, heads:]]
    attention.config.kernel_backend = "torch"
    expected = attention._attend_own_blocks(queries, keys, values, names, step, reference, rotated_groups=1)
    attention.config.kernel_backend = "triton" if device == "cpu" else "auto"
    out = attention._attend_own_blocks(queries, keys, values, names, step, fused, rotated_groups=1)
    _assert_relative(out.float(), expected.float(), tol, "attention")
    for name in caches:
        _assert_relative(fused.get(name).float(), reference.get(name).float(), tol, name)
        assert torch.equal(fused.get(name)[1], caches[name][1])  # the inactive row's cache is untouched


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_fused_decode_attention_matches_the_reference(dtype, tol):
    # Offsets: a block's first slot, an inactive row, a slot past one tile, the block's last slot.
    _check_slot_attention_step(4, 80, 2, 16, [0, 70, 65, 79], dtype, tol)


@pytest.mark.parametrize("context_mode", ["sh", "mh", "mf"])
def test_tiny_model_triton_equals_torch(context_mode):
    """Logits, gradients and prefill + decode with kernel_backend="triton" (interpreter) == "torch"."""
    ids = random_ids(2, 11).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model = tiny_model(context_mode=context_mode, kernel_backend=backend).to(DEVICE)
        model.train()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.eval()
        with torch.no_grad():
            steps = model.generate(
                ids[:, :5],
                attention_mask=torch.ones_like(ids[:, :5]),
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = (loss, grads, torch.stack(steps.logits, 1), steps.sequences)
    (loss, grads, logits, tokens), (loss_t, grads_t, logits_t, tokens_t) = results["torch"], results["triton"]
    _assert_relative(loss_t, loss, 1e-5, "loss")
    for name, grad in grads.items():
        _assert_relative(grads_t[name], grad, 1e-4, name)
    _assert_relative(logits_t, logits, 1e-4, "decode logits")
    assert torch.equal(tokens_t, tokens)


def _two_call_attention(attn, hidden_states, layout):
    """The SH/MH layer as it was before the fused path: self- and cross-attention as two SDPA calls."""
    theta, width = attn.config.rope_theta, attn.block_size
    batch, slots, _ = hidden_states.shape

    def blocks(x):  # [B, S, H, hd] -> [B, H, M, W, hd]
        return x.transpose(1, 2).reshape(batch, attn.num_heads, -1, width, attn.head_dim)

    query = apply_rope(attn._heads(attn.q_proj(hidden_states)), layout.position, theta)
    key = apply_rope(attn._heads(attn.k_proj(hidden_states)), layout.position, theta)
    value = attn._heads(attn.v_proj(hidden_states))
    own = F.scaled_dot_product_attention(blocks(query), blocks(key), blocks(value), attn_mask=layout.own_mask)
    context = attn.ssm.outputs(hidden_states * layout.valid[..., None], layout, None)
    if attn.context_mode == "mh":
        cross_k, cross_v = attn.cross_k_proj(context), attn.cross_v_proj(context)
    else:
        cross_k, cross_v = (
            attn._heads(attn.cross_k_proj(context[:, :, 0])),
            attn._heads(attn.cross_v_proj(context[:, :, 0])),
        )
    cross_q = attn._heads(attn.cross_q_proj(hidden_states))
    cross = F.scaled_dot_product_attention(blocks(cross_q), blocks(cross_k), blocks(cross_v), attn_mask=layout.own_mask)
    attended = torch.cat([own, cross], dim=1).reshape(batch, 2 * attn.num_heads, slots, -1)
    return attn.o_proj(attended.transpose(1, 2).reshape(batch, slots, -1))


@pytest.mark.parametrize("context_mode", ["sh", "mh"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded-with-offset"])
def test_fused_two_h_attention_equals_two_calls(context_mode, padded, monkeypatch):
    model = tiny_model(context_mode=context_mode, kernel_backend="torch")
    mask = torch.ones(2, 13, dtype=torch.bool)
    if padded:
        mask[1, 6:] = False
    start = torch.tensor([0, 6 if padded else 0])  # padded: row 1 continues a cache 2 slots into its block
    layout, _ = model.model._layout(mask, start)
    hidden_states = torch.randn(
        2, layout.valid.shape[1], model.config.hidden_size, generator=torch.Generator().manual_seed(5)
    )
    attn = model.model.layers[0].attn
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    fused = attn(hidden_states, layout)
    monkeypatch.undo()
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    assert len(calls) == 1 and math.prod(calls[0]) == 2 * 2 * heads * layout.valid.shape[1] * head_dim
    # Equal at every slot holding a token (padded slots are never read).
    expected = _two_call_attention(attn, hidden_states, layout)
    torch.testing.assert_close(fused[layout.valid], expected[layout.valid], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [4096, 65536])
def test_cuda_kernel_matches_reference_at_real_sizes(length):
    _check_kernel_matches_reference(filters=1, features=1024, modes=8, length=length, tol=1e-4)


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize(
    "filters,dtype,tol", [(1, torch.float32, 1e-4), (4, torch.float32, 1e-4), (1, torch.bfloat16, 2e-2)]
)
def test_cuda_scan_at_real_sizes(filters, dtype, tol):
    _check_scan(batch=2, length=8192, filters=filters, features=1024, modes=8, tol=tol, dtype=dtype)


@pytest.mark.gpu
def test_cuda_fused_decode_step_at_real_sizes():
    params = {k: v.detach().cuda() for k, v in _s4d_parameters(8, 1024, 8, seed=6).items()}
    u = torch.randn(16, 1024, device="cuda")
    x = torch.randn(16, 8, 1024, 8, dtype=torch.complex64, device="cuda")
    active = torch.ones(16, dtype=torch.bool, device="cuda")
    args = (u, x, params["log_a_real"], params["a_imag"], params["log_dt"], params["c"], params["skip"], active)
    y_ref, x_ref = ssm_ops.s4d_decode_step_reference(*args)
    y, new_x = block_state_triton.s4d_step_triton(*args, torch.float32)
    _assert_relative(y, y_ref, 1e-5, "y")
    _assert_relative(torch.view_as_real(new_x), torch.view_as_real(x_ref), 1e-5, "state")


@pytest.mark.gpu
def test_cuda_fused_decode_attention_at_real_sizes():
    _check_slot_attention_step(16, 512, 8, 128, [0, 100, 511, *range(3, 500, 40)][:16], torch.bfloat16, 1e-2)


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("context_mode", ["sh", "mh", "mf"])
def test_cuda_auto_backend_equals_torch(context_mode):
    """On CUDA "auto" takes the Triton paths; it must agree with "torch" (fp32, 3 blocks of 64 tokens)."""
    ids = random_ids(2, 192).cuda()
    outputs = []
    for backend in ("torch", "auto"):
        model = tiny_model(context_mode=context_mode, kernel_backend=backend, block_size=64, ssm_state_size=16).cuda()
        model.train()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        model.eval()
        with torch.no_grad():
            out = model.generate(
                ids[:, :70],
                attention_mask=torch.ones_like(ids[:, :70]),
                max_new_tokens=8,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        outputs.append((loss, grads, torch.stack(out.logits, 1)))
    (loss, grads, logits), (loss_a, grads_a, logits_a) = outputs
    _assert_relative(loss_a, loss, 1e-5, "loss")
    for grad, grad_a in zip(grads, grads_a):
        _assert_relative(grad_a, grad, 1e-3)
    _assert_relative(logits_a, logits, 1e-4, "decode logits")
