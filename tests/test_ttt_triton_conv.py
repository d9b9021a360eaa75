"""The causal depthwise convolution kernels over whole sequences (forward and backward) against the torch
reference `ttt_ops.causal_conv1d`: on CPU under TRITON_INTERPRET=1 (set by conftest before triton is imported)
at tiny sizes, on CUDA at real sizes (marked gpu)."""

import pytest
import torch

pytest.importorskip("triton")

from ttt_testing import rel_err, tiny_model

from ttt_hf.ttt import ttt_ops
from ttt_hf.ttt.ttt_ops import causal_conv1d, causal_conv1d_banks
from ttt_hf.ttt.ttt_triton_conv import BACKWARD_ROWS, BLOCK_C, causal_conv_chunk_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def conv_inputs(batch, tokens, channels, width, banks, bias, dtype, seed=0):
    """x, a non-zero state and `banks` filter banks, all random and requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    filters = [(rand(channels, 1, width), rand(channels) if bias else None) for _ in range(banks)]
    return rand(batch, tokens, channels), rand(batch, width - 1, channels), filters


def check_against_reference(batch, tokens, channels, width, banks, bias, dtype, tol):
    """Outputs, next state and the gradients of x, the state and every weight against the reference's."""
    x, state, filters = conv_inputs(batch, tokens, channels, width, banks, bias, dtype)
    length = torch.tensor([tokens, max(tokens - 3, 0), 1][:batch], device=DEVICE)
    ys, new_state = causal_conv1d_banks(x, filters, state, length, kernel_backend="triton")
    expected = [causal_conv1d(x, w, b, state, length) for w, b in filters]
    assert torch.equal(new_state, expected[0][1])
    inputs = [x, state] + [p for bank in filters for p in bank if p is not None]
    d_ys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, inputs, d_ys)
    want = torch.autograd.grad([y for y, _ in expected], inputs, d_ys)
    errors = {"y": max(rel_err(y, w) for y, (w, _) in zip(ys, expected))}
    errors |= {f"d{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(grads, want)) if b.numel()}  # width 1: no state
    assert all(y.dtype == dtype for y in ys) and all(a.dtype == b.dtype for a, b in zip(grads, inputs))
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("banks, bias", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("width", [4, 3, 1])
def test_chunk_conv_matches_reference(banks, bias, width):
    # BACKWARD_ROWS + 5 tokens: two backward programs per row (two partial sums of the weights' gradient), a
    # partial token tile; BLOCK_C + 8 channels: a masked second channel block. Width 3 pads the taps to 4.
    check_against_reference(3, BACKWARD_ROWS + 5, BLOCK_C + 8, width, banks, bias, torch.float32, 1e-5)


def test_chunk_conv_half_precision_and_short_rows():
    # Fewer tokens than the window: the state reaches every output.
    check_against_reference(2, 2, 24, 4, 2, True, torch.bfloat16, 1e-2)
    check_against_reference(2, 40, 24, 4, 1, True, torch.float16, 5e-3)


def test_chunk_conv_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(ttt_ops, "causal_conv_chunk_triton", lambda *a: calls.append(a) or causal_conv_chunk_triton(*a))
    x, state, filters = conv_inputs(2, 6, 8, 4, 2, True, torch.float32)
    length = torch.full((2,), 6, device=DEVICE)
    causal_conv1d_banks(x, filters, state, length, kernel_backend="triton")
    causal_conv1d_banks(
        x[:, :1].detach(),
        [(w.detach(), b.detach()) for w, b in filters],
        state.detach(),
        length,
        kernel_backend="triton",
    )  # a decoding step: the step kernel
    causal_conv1d_banks(x, filters, state, length, kernel_backend="torch")
    causal_conv1d_banks(
        x.double(), [(w.double(), b.double()) for w, b in filters], state.double(), length, kernel_backend="triton"
    )  # fp64: the reference
    causal_conv1d_banks(
        x, [filters[0], (filters[1][0][..., :3], filters[1][1])], state, length, kernel_backend="triton"
    )  # banks of two widths: the reference
    causal_conv1d_banks(x, filters + filters[:1], state, length, kernel_backend="triton")  # three banks
    assert len(calls) == 1


def test_chunk_conv_errors():
    x, state, filters = conv_inputs(2, 6, 8, 4, 2, True, torch.float32)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        causal_conv_chunk_triton(x.double(), filters, state)
    with pytest.raises(ValueError, match="state"):
        causal_conv_chunk_triton(x, filters, state[:, :2])
    with pytest.raises(ValueError, match="weight"):
        causal_conv_chunk_triton(x, [(filters[0][0][:4], None)], state)
    with pytest.raises(ValueError, match="all have a bias or none"):
        causal_conv_chunk_triton(x, [filters[0], (filters[1][0], None)], state)


def test_model_trains_the_same_with_both_convolution_and_norm_paths(monkeypatch, no_tf32):
    """A Mamba-backbone model (a pre-conv, the shared q/k pair and three RMSNorms per layer) gives the same loss
    and gradients with the convolutions and norms in Triton as in torch (its TTT chunks in torch both times)."""
    model = tiny_model("linear", kernel_backend="triton").to(DEVICE)
    monkeypatch.setattr(ttt_ops, "_use_kernel", lambda *args: False)
    ids = torch.randint(3, model.config.vocab_size, (2, 21), device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        model.config.kernel_backend = backend
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (want_loss, want_grads) = results
    assert rel_err(loss, want_loss) <= 1e-5 and grads.keys() == want_grads.keys()
    assert max(rel_err(grads[n], want_grads[n]) for n in grads) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("banks", [1, 2])
def test_chunk_conv_real_sizes_on_gpu(banks, no_tf32):
    check_against_reference(2, 8192 + 7, 768, 4, banks, True, torch.float32, 1e-5)
    check_against_reference(2, 4096, 2048, 4, banks, True, torch.bfloat16, 1e-2)
