"""Shared helpers of the TTT tests: tiny configs and models with non-trivial (perturbed) parameters."""

from __future__ import annotations

import pytest
import torch
from model_testing import random_ids  # noqa: F401  (re-exported for the tests)

from ttt_hf import TTTConfig, TTTForCausalLM
from ttt_hf.ttt.ttt_ops import ttt_chunk

BACKBONES = {
    "mamba": dict(pre_conv=True, share_qk=True, use_gate=True),
    "transformer": dict(pre_conv=False, share_qk=False, use_gate=False),
}
VARIANTS = [(layer_type, backbone) for layer_type in ("linear", "mlp") for backbone in BACKBONES]


def tiny_config(layer_type: str = "linear", backbone: str = "mamba", **overrides) -> TTTConfig:
    values = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        mini_batch_size=4,
        ttt_layer_type=layer_type,
        ttt_base_lr=1.0 if layer_type == "linear" else 0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(BACKBONES[backbone])
    values.update(overrides)
    return TTTConfig(**values)


def tiny_model(layer_type: str = "linear", backbone: str = "mamba", seed: int = 0, **overrides) -> TTTForCausalLM:
    """A tiny model whose constant-initialised parameters are perturbed, so no term of the math is trivial."""
    torch.manual_seed(seed)
    model = TTTForCausalLM(tiny_config(layer_type, backbone, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("norm", "learnable_ttt_lr_bias", "learnable_token_idx", "b1", "b2")):
                param.add_(0.05 * torch.randn_like(param))
            if "W1" in name or "W2" in name:
                param.mul_(3.0)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference over the reference's max abs value: 0 where both are 0 (an accumulator after whole
    mini-batches), inf for NaN (which a max() over several errors would silently drop)."""
    error = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)
    return torch.nan_to_num(error, nan=float("inf")).item()


def check_double_backward_is_refused(state, acc, q, k, v, lr, tau, ln_w, ln_b) -> None:
    """A second-order gradient through the Triton chunk kernels raises (their backward is once_differentiable)
    instead of missing every term through them. Inputs: one row of whole mini-batches."""
    for x in (q, *state):
        x.requires_grad_()
    start, length = torch.zeros(1, dtype=torch.long, device=q.device), torch.full((1,), q.shape[2], device=q.device)
    out, new_state, _ = ttt_chunk(state, acc, q, k, v, lr, tau, ln_w, ln_b, start, length, kernel_backend="triton")
    (d_w,) = torch.autograd.grad(out.square().sum() + new_state[-2].square().sum(), [state[-2]], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        d_w.square().sum().backward()
