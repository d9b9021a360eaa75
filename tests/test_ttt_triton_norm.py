"""The RMSNorm kernels (forward and backward) against the torch reference `ttt_ops.rms_norm_reference`: on CPU under
TRITON_INTERPRET=1 (set by conftest before triton is imported) at tiny sizes, on CUDA at real sizes (marked gpu)."""

import pytest
import torch

pytest.importorskip("triton")

from ttt_testing import rel_err, tiny_model

from ttt_hf.ttt import ttt_ops
from ttt_hf.ttt.ttt_ops import rms_norm, rms_norm_reference
from ttt_hf.ttt.ttt_triton_norm import BACKWARD_ROWS, rms_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_against_reference(shape, dtype, weight_dtype, tol, seed=0):
    """Output (dtype included), and the gradients of x and the weight, against the reference's."""
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g) + 0.5).to(DEVICE, dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(DEVICE, weight_dtype).requires_grad_()
    y = rms_norm(x, weight, 1e-6, kernel_backend="triton")
    want = rms_norm_reference(x, weight, 1e-6)
    assert y.dtype == want.dtype
    d_y = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    grads = torch.autograd.grad(y, (x, weight), d_y)
    want_grads = torch.autograd.grad(want, (x, weight), d_y)
    errors = {"y": rel_err(y, want), "dx": rel_err(grads[0], want_grads[0]), "dw": rel_err(grads[1], want_grads[1])}
    assert all(a.dtype == b.dtype for a, b in zip(grads, (x, weight)))
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("hidden", [24, 64])  # 24: a masked block
def test_rms_norm_matches_reference(hidden):
    # 2 x (BACKWARD_ROWS + 3) rows: three backward programs, the last one partial.
    check_against_reference((2, BACKWARD_ROWS + 3, hidden), torch.float32, torch.float32, 1e-5)


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
)
def test_rms_norm_half_precision(dtype, weight_dtype):
    # bf16 activations with fp32 weights (mixed precision) give fp32 outputs, as the reference's promotion does.
    check_against_reference((3, 17, 40), dtype, weight_dtype, 1e-2)


def test_rms_norm_dispatch_and_errors(monkeypatch):
    calls = []
    monkeypatch.setattr(ttt_ops, "rms_norm_triton", lambda *a: calls.append(a) or rms_norm_triton(*a))
    x, weight = torch.randn(2, 3, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    rms_norm(x, weight, 1e-6, kernel_backend="triton")
    rms_norm(x, weight, 1e-6, kernel_backend="torch")
    rms_norm(x.double(), weight.double(), 1e-6, kernel_backend="triton")  # fp64: the reference
    assert len(calls) == 1
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        rms_norm_triton(x.double(), weight, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, weight[:4], 1e-6)


def test_model_norms_follow_the_config_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(ttt_ops, "rms_norm_triton", lambda *a: calls.append(a) or rms_norm_triton(*a))
    model = tiny_model("linear", kernel_backend="triton").to(DEVICE)  # Mamba backbone: three norms per layer
    ids = torch.randint(3, model.config.vocab_size, (1, 5), device=DEVICE)
    for backend, expected in (("triton", 3 * model.config.num_hidden_layers + 1), ("torch", 0)):
        model.config.kernel_backend = backend
        calls.clear()
        with torch.no_grad():
            model(ids)
        assert len(calls) == expected, backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden", [768, 2048])
def test_rms_norm_real_sizes_on_gpu(hidden):
    check_against_reference((2, 4099, hidden), torch.float32, torch.float32, 1e-5)
    check_against_reference((8, 8192, hidden), torch.bfloat16, torch.bfloat16, 1e-2)
