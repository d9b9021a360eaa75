"""What the TTT kernel files share: the inner LayerNorm and its L2-loss gradient, the tanh-GELU, a mini-batch's
loads and commit (TTT-Linear's and TTT-MLP's chunk kernels), and the host-side checks of where a kernel may run
and which tensors it may overwrite."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _on_triton_device(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _owns_memory(t: torch.Tensor) -> bool:
    """A kernel may overwrite `t`: contiguous memory of its own, not a view such as the broadcast initial
    parameters (whose writes would land in the model) or an expanded tensor."""
    return t.is_contiguous() and t._base is None and not t.requires_grad


def _precision(x: torch.Tensor, half: str = "bf16") -> str:
    # fp32 inputs get exact fp32 products. Half-precision inputs get `half` products on the GPU: bf16 (the fp32
    # intermediates they multiply round to bf16) ran the TTT-Linear kernels 10-26% faster than TF32 on the H200,
    # at the same error against the fp32 reference (CHANGELOG.md, kernel history). Triton's interpreter multiplies
    # bf16 tiles as integers, so on CPU they take TF32 products (fp32 there).
    if x.dtype == torch.float32:
        return "ieee"
    return half if x.is_cuda else "tf32"


def _kernel_inputs(q, k, v, lr, tau, ln_weight, ln_bias) -> tuple:
    """The token and parameter tensors as every TTT kernel reads them: contiguous; lr, tau and the LayerNorm
    parameters in fp32."""
    return (
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        lr.float().contiguous(),
        tau.float().contiguous(),
        ln_weight.float().contiguous(),
        ln_bias.float().contiguous(),
    )


def _chunk_kernel_inputs(q, k, v, lr, tau, ln_weight, ln_bias, span, checkpoint_group: int) -> tuple:
    """`_kernel_inputs` and span (int32) as the chunk kernels read them, after checking the checkpoint group."""
    if checkpoint_group < 1:
        raise ValueError(f"checkpoint_group must be >= 1, got {checkpoint_group}")
    return (*_kernel_inputs(q, k, v, lr, tau, ln_weight, ln_bias), span.to(torch.int32).contiguous())


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation: "bf16" rounds both operands to bf16, else tl.dot's input precision."""
    if PRECISION == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


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
def _key_grad_backward(d_grad, z_hat, rstd, grad_hat, ln_w, col_mask, F: tl.constexpr):
    """Reverse mode of the key gradient g = rstd * project(grad_hat, z_hat), grad_hat = (ln_w z_hat + ln_b - (v - k))
    ln_w, given d_grad = dL/dg: returns dL/dz (through z_hat and rstd: d rstd / d z = -rstd^2 z_hat / F) and
    dL/dgrad_hat. Linear in d_grad, which is what lets the backward split its sequential chain off."""
    u = _project(grad_hat, z_hat, col_mask, F)
    d_rstd = tl.sum(d_grad * u, axis=1)
    d_u = rstd[:, None] * d_grad
    d_grad_hat = _project(d_u, z_hat, col_mask, F)
    d_z_hat = (
        d_grad_hat * ln_w[None, :] * ln_w[None, :]
        - (tl.sum(grad_hat * z_hat, axis=1) / F)[:, None] * d_u
        - (tl.sum(d_u * z_hat, axis=1) / F)[:, None] * grad_hat
    )
    d_z = rstd[:, None] * _project(d_z_hat, z_hat, col_mask, F) - (d_rstd * rstd * rstd / F)[:, None] * z_hat
    return d_z, d_grad_hat


@triton.jit
def _gelu_tanh(x):
    """gelu_tanh(x) and the tanh it used (the gradient reuses it); constants of the official code."""
    u = 0.79788456 * x * (1.0 + 0.044715 * x * x)
    e = tl.exp(-2.0 * tl.abs(u))  # tanh from exp(-2|u|) <= 1: no overflow for large |u|
    tanh = tl.where(u >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
    return 0.5 * x * (1.0 + tanh), tanh


@triton.jit
def _gelu_tanh_grad(x, tanh):
    return 0.5 * x * ((1.0 - tanh * tanh) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1.0 + tanh)


@triton.jit
def _token_offsets(first, tokens, cols, F: tl.constexpr):
    """Offsets of tokens [first, first + MB) of the slot layout into [.., F] tensors (int64: B*H*T*F may pass 2^31)."""
    return (first + tokens).to(tl.int64)[:, None] * F + cols[None, :]


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
def _load_row(ptr, index, cols, col_mask, F: tl.constexpr):
    return tl.load(ptr + index * F + cols, mask=col_mask, other=0.0)


@triton.jit
def _mini_batch_constants(ln_w_ptr, ln_b_ptr, tau_ptr, head, tokens, cols, col_mask, F: tl.constexpr):
    """The head's LayerNorm parameters, tau per position and the causal mask of the dual form."""
    ln_w = _load_row(ln_w_ptr, head, cols, col_mask, F)
    ln_b = _load_row(ln_b_ptr, head, cols, col_mask, F)
    return ln_w, ln_b, tl.load(tau_ptr + tokens), tokens[:, None] >= tokens[None, :]


@triton.jit
def _commit_one(x, acc, commit, tau_last):
    """`commit` is 1.0 when the mini-batch completes, 0.0 for a row's partial last one (it keeps accumulating)."""
    return x - commit * tau_last * acc, acc * (1.0 - commit)
