"""TTT operations: the PyTorch reference (the numerical definition and the CPU path) and their dispatch point.

Shapes: B batch rows, H heads, T tokens, f head dim, b mini-batch size.

The inner model is a chain of (W, c) layers: one for TTT-Linear, two with a tanh-GELU between them for
TTT-MLP. Its state is a flat list `[W1, c1, (W2, c2)]` of fp32 tensors `[B, H, ...]`, always the state at
the START of the current mini-batch, plus an accumulator of the same shapes holding the lr-weighted
gradients of the tokens already seen in that mini-batch (not yet scaled by tau). Every gradient of a
mini-batch is taken at its start state; the accumulator is committed when the mini-batch completes.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .configuration_ttt import KERNEL_BACKENDS

try:
    from .ttt_triton_linear import ttt_linear_chunk_triton
except ImportError:  # triton is optional: the torch reference runs everywhere
    ttt_linear_chunk_triton = None
try:
    from .ttt_triton_conv import causal_conv_chunk_triton, causal_conv_step_triton
    from .ttt_triton_decode import decode_kernel_supported, ttt_step_inplace, ttt_step_triton
    from .ttt_triton_mlp import mlp_kernel_supported, ttt_mlp_chunk_triton
    from .ttt_triton_norm import rms_norm_triton
except ImportError:  # without triton (or without these kernels) the steps, convolutions, norms and TTT-MLP run in torch
    causal_conv_chunk_triton = causal_conv_step_triton = decode_kernel_supported = ttt_step_triton = None
    ttt_step_inplace = None
    mlp_kernel_supported = ttt_mlp_chunk_triton = rms_norm_triton = None

logger = logging.getLogger(__name__)

TTT_LN_EPS = 1e-6
# Training recomputes the inner loop in groups of this many mini-batches unless the config asks for another size
# (`scan_checkpoint_group_size` 0), on every path: TTT-Linear's saved states then cost 1/16 of the activations'
# memory at f=64; TTT-MLP's (16 f^2 + 10 f floats per head and group) about 1.1 GB at B=4, H=32, f=64, T=8192.
DEFAULT_CHECKPOINT_GROUP = 16


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The inner loop runs in fp32 for half-precision inputs (and in fp64 for fp64 inputs)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _learning_rate_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.einsum("btd,hd->bht", at_least_fp32(hidden), at_least_fp32(weight)) + at_least_fp32(bias)


class LearningRateLogits(torch.autograd.Function):
    """`learning_rate_logits` under autograd. It saves the input as it comes (bf16 in mixed precision, a tensor the
    layer's projections keep for their backward anyway), not the fp32 copy the product reads: per layer 4 bytes per
    token and channel less kept for the backward, which converts the input again."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.bias_dtype = bias.dtype
        return _learning_rate_logits(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        d_hidden = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_hidden = torch.einsum("bht,hd->btd", grad, at_least_fp32(weight)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            d_weight = torch.einsum("bht,btd->hd", grad, at_least_fp32(hidden)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            d_bias = grad.sum((0, 2))[:, None].to(ctx.bias_dtype)
        return d_hidden, d_weight, d_bias


def learning_rate_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The inner learning rate's logits [B, H, T], in fp32 for half-precision inputs: hidden [B, T, D] times
    weight [H, D], plus bias [H, 1]."""
    if _needs_grad(hidden, weight, bias):
        return LearningRateLogits.apply(hidden, weight, bias)
    return _learning_rate_logits(hidden, weight, bias)


def check_kernel_backend(kernel_backend: str) -> None:
    """Fail early for a backend this installation cannot run."""
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {kernel_backend!r}")
    if kernel_backend == "triton" and ttt_linear_chunk_triton is None:
        raise ImportError("kernel_backend='triton' needs the triton package (pip install triton)")


def _kernel_requested(kernel_backend: str, kernel, q: torch.Tensor) -> bool:
    """Whether this backend may run `kernel` (None when not importable) for inputs on q's device."""
    check_kernel_backend(kernel_backend)
    if kernel_backend == "torch" or kernel is None:
        return False
    if kernel_backend == "triton" and not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "kernel_backend='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "triton, or use kernel_backend='auto'"
        )
    return q.is_cuda or kernel_backend == "triton"


def _use_kernel(kernel_backend: str, state: list[torch.Tensor], q: torch.Tensor, mini_batch: int) -> bool:
    """Whether a chunk kernel runs this call. They exist for mini-batches of 16, 32 or 64 tokens (their tiles'
    dims are powers of two, and their products need at least 16 rows on the GPU): for TTT-Linear with bf16/fp16
    inputs and head_dim 16..128, fp32 inputs and head_dim 16..64, and for TTT-MLP with fp32/bf16/fp16 inputs and
    head_dim 16..128 (both forward and backward); elsewhere the torch reference runs, also under
    kernel_backend="triton" (logged once), so a result is never wrong, only slower. Under torch.compile (a
    compiled whole forward; `generate` compiles decoding steps only) the reference runs, traced by the compiler."""
    if torch.compiler.is_compiling() or not _kernel_requested(kernel_backend, ttt_linear_chunk_triton, q):
        return False
    if mini_batch not in (16, 32, 64):
        if kernel_backend == "triton":
            _log_fallback_once(f"mini_batch_size {mini_batch}: the chunk kernels take 16, 32 or 64")
        return False
    if len(state) == 4:
        supported = mlp_kernel_supported is not None and mlp_kernel_supported(state, q)
        if kernel_backend == "triton" and not supported:
            shapes = [tuple(t.shape[-2:]) for t in state]
            _log_fallback_once(
                f"TTT-MLP needs fp32/bf16/fp16 inputs, head_dim 16..128 and 4 * head_dim hidden units; "
                f"got {q.dtype}, head_dim {q.shape[-1]}, state shapes {shapes}"
            )
        return supported
    # fp32 tiles of head_dim 96/128 need ~400 KB of shared memory (H100: 227 KB): fp32 runs the kernel up to 64.
    max_head_dim = 64 if q.dtype == torch.float32 else 128
    supported = q.dtype in (torch.float32, torch.bfloat16, torch.float16) and 16 <= q.shape[-1] <= max_head_dim
    if kernel_backend == "triton" and not supported:
        _log_fallback_once("fp64 inputs, head_dim outside 16..128 (16..64 in fp32)")
    return supported


def _use_step_kernel(kernel_backend: str, state: list[torch.Tensor], q: torch.Tensor, needs_grad: bool) -> bool:
    """Whether the decode step kernel (TTT-Linear and TTT-MLP, no backward) runs this call."""
    if not _kernel_requested(kernel_backend, ttt_step_triton, q):
        return False
    supported = not needs_grad and decode_kernel_supported(state, q)
    if kernel_backend == "triton" and not supported:
        _log_fallback_once("decode step with gradients, fp64 inputs, head_dim above 128 or another state layout")
    return supported


@functools.cache
def _log_fallback_once(reason: str) -> None:
    logger.warning(f"kernel_backend='triton': no TTT kernel for this call ({reason}); using the torch reference")


def ln_forward(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = TTT_LN_EPS) -> torch.Tensor:
    mu = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    return weight * ((z - mu) / torch.sqrt(var + eps)) + bias


def ln_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = TTT_LN_EPS
) -> torch.Tensor:
    """Gradient of `0.5 * ||LN(z) - target||^2` with respect to `z` (LayerNorm backward fused with the L2 loss)."""
    f = z.shape[-1]
    mu = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    std = torch.sqrt(var + eps)
    z_hat = (z - mu) / std
    grad_z_hat = (weight * z_hat + bias - target) * weight
    return (
        (1.0 / f)
        * (
            f * grad_z_hat
            - grad_z_hat.sum(dim=-1, keepdim=True)
            - z_hat * (grad_z_hat * z_hat).sum(dim=-1, keepdim=True)
        )
        / std
    )


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    # The constants of the official JAX/PyTorch code (sqrt(2/pi) and 3 * 0.044715 * sqrt(2/pi)).
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)


def _key_pass(state, k, v, ln_weight, ln_bias):
    """Runs the keys through the inner model at `state`: returns each layer's input and the loss
    gradient with respect to each layer's output (the reconstruction target is v - k)."""
    weights, biases = state[0::2], state[1::2]
    layer_inputs, pre_activations = [k], []
    x = k
    for i, (w, c) in enumerate(zip(weights, biases)):
        z = x @ w + c
        pre_activations.append(z)
        if i + 1 < len(weights):
            x = F.gelu(z, approximate="tanh")
            layer_inputs.append(x)
    grad = ln_l2_grad(pre_activations[-1], v - k, ln_weight, ln_bias)
    grads = [grad]
    for i in range(len(weights) - 1, 0, -1):
        grad = (grad @ weights[i].transpose(-1, -2)) * gelu_tanh_grad(pre_activations[i - 1])
        grads.insert(0, grad)
    return layer_inputs, grads


def _dual_mini_batch(state, acc, q, k, v, lr, tau, ln_weight, ln_bias, commit):
    """One mini-batch in the dual form.

    q, k, v: [B, H, b, f]; lr: [B, H, b]; tau: [b]; commit: [B] bool, whether each row's tokens reach the end
    of this mini-batch (then the state advances and the accumulator is cleared).
    Returns the output [B, H, b, f], the new state and the new accumulator.
    """
    layer_inputs, grads = _key_pass(state, k, v, ln_weight, ln_bias)
    tau_col = tau[:, None]  # [b, 1]
    eta = torch.tril(tau_col * lr[..., None, :])  # [B, H, b, b]: eta[i, j] = tau_i * lr_j for j <= i
    x = q
    new_acc = []
    for i in range(len(layer_inputs)):
        w, c, acc_w, acc_c = state[2 * i], state[2 * i + 1], acc[2 * i], acc[2 * i + 1]
        g = grads[i]
        z = (
            x @ w
            - tau_col * (x @ acc_w)
            - (eta * torch.tril(x @ layer_inputs[i].transpose(-1, -2))) @ g
            + (c - tau_col * acc_c - eta @ g)
        )
        if i + 1 < len(layer_inputs):
            x = F.gelu(z, approximate="tanh")
        weighted_g = lr[..., None] * g
        new_acc += [acc_w + layer_inputs[i].transpose(-1, -2) @ weighted_g, acc_c + weighted_g.sum(-2, keepdim=True)]
    out = q + ln_forward(z, ln_weight, ln_bias)

    commit = commit.view(-1, 1, 1, 1)
    new_state = [torch.where(commit, s - tau[-1] * a, s) for s, a in zip(state, new_acc)]
    new_acc = [torch.where(commit, torch.zeros_like(a), a) for a in new_acc]
    return out, new_state, new_acc


class MiniBatchSlots:
    """Right-padded rows shifted by their offset inside a mini-batch, so that every row's mini-batches line
    up: row r's token t goes to slot (start[r] % b) + t of M * b slots. Slots before a row's first token and
    after its last are inert (zero inputs, zero learning rate); `span` [B] is the slot after each row's last
    token, so mini-batch m of row r completes (commits) when (m + 1) * b <= span[r].

    `aligned`: the caller knows that every row starts a mini-batch and holds `seq_len` tokens, so the layout is
    not read back from the device (a host sync per layer and forward otherwise)."""

    def __init__(
        self, start: torch.Tensor, length: torch.Tensor, mini_batch_size: int, seq_len: int, aligned: bool = False
    ) -> None:
        self.mini_batch_size, self.seq_len = mini_batch_size, seq_len
        self.offset = start % mini_batch_size
        self.span = self.offset + length
        if aligned:
            longest, shortest, ragged = seq_len, seq_len, 0
        else:
            longest, shortest, ragged = torch.stack([self.span.max(), self.span.min(), self.offset.max()]).tolist()
        self.num_mini_batches = max(1, -(-longest // mini_batch_size))
        # Every row starts a mini-batch and fills whole ones (training, aligned prefill): the slots are the
        # tokens themselves, a view instead of two gathers and a mask per tensor.
        self.dense = ragged == 0 and shortest == longest == seq_len and seq_len % mini_batch_size == 0
        if not self.dense:
            slot = torch.arange(self.num_mini_batches * mini_batch_size, device=start.device)
            src = slot[None, :] - self.offset[:, None]  # [B, M*b]
            self.valid = (src >= 0) & (src < length[:, None])
            self.src = src.clamp(0, seq_len - 1)

    def to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, d] -> [B, H, M, b, d]."""
        batch, heads = x.shape[:2]
        if self.dense:
            return x.reshape(batch, heads, self.num_mini_batches, self.mini_batch_size, x.shape[-1])
        index = self.src[:, None, :, None].expand(batch, heads, -1, x.shape[-1])
        x = torch.gather(x, 2, index) * self.valid[:, None, :, None]
        return x.reshape(batch, heads, self.num_mini_batches, self.mini_batch_size, x.shape[-1])

    def from_slots(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, M*b, d] (or [B, H, M, b, d]) -> [B, H, T, d], zero at the padding after each row's tokens (what
        the slots hold there differs between the reference and the kernels)."""
        batch, heads, dim = x.shape[0], x.shape[1], x.shape[-1]
        x = x.reshape(batch, heads, -1, dim)
        if self.dense:
            return x
        token = torch.arange(self.seq_len, device=x.device)[None, :]
        index = (token + self.offset[:, None]).clamp(max=x.shape[2] - 1)
        x = torch.gather(x, 2, index[:, None, :, None].expand(batch, heads, self.seq_len, dim))
        return x * (token < self.span[:, None] - self.offset[:, None])[:, None, :, None]


def ttt_chunk_reference(
    state: list[torch.Tensor],
    acc: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    checkpoint_group: int = 0,
    aligned: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """TTT over a chunk of tokens continuing from (state, acc), dual form, PyTorch reference.

    q, k, v: [B, H, T, f]; lr: [B, H, T] per-token inner learning rate; tau: [b] per-position factor;
    ln_weight, ln_bias: [H, 1, f]. Rows are right-padded: row r holds `length[r]` real tokens whose first
    has absolute position `start[r]` (which may fall anywhere inside a mini-batch).
    Returns the output [B, H, T, f] (fp32; zero at padded slots), the new state and accumulator.
    `checkpoint_group > 0` recomputes groups of that many mini-batches in the backward pass (0: keeps every
    activation). `aligned`: every
    row starts a mini-batch and is full (`start % b == 0`, `length == T`), known to the caller (see `MiniBatchSlots`).
    """
    slots = MiniBatchSlots(start, length, tau.shape[0], q.shape[2], aligned)
    q_s, k_s, v_s = (slots.to_slots(at_least_fp32(x)) for x in (q, k, v))
    lr_s = slots.to_slots(at_least_fp32(lr)[..., None])[..., 0]
    num_mb = slots.num_mini_batches
    commit = torch.arange(1, num_mb + 1, device=q.device)[None, :] * tau.shape[0] <= slots.span[:, None]  # [B, M]

    n_state = len(state)

    def scan(first, last, *carry):
        """Mini-batches [first, last), from `carry` = state + accumulator."""
        state, acc = list(carry[:n_state]), list(carry[n_state:])
        outs = []
        for m in range(first, last):
            out, state, acc = _dual_mini_batch(
                state,
                acc,
                q_s[:, :, m],
                k_s[:, :, m],
                v_s[:, :, m],
                lr_s[:, :, m],
                tau,
                ln_weight,
                ln_bias,
                commit[:, m],
            )
            outs.append(out)
        return (torch.cat(outs, dim=2), *state, *acc)

    carry = (*state, *acc)
    group = checkpoint_group if checkpoint_group > 0 and torch.is_grad_enabled() else num_mb
    outs = []
    for first in range(0, num_mb, group):
        run = functools.partial(scan, first, min(first + group, num_mb))
        out, *carry = checkpoint(run, *carry, use_reentrant=False) if group < num_mb else run(*carry)
        outs.append(out)
    out = slots.from_slots(torch.cat(outs, dim=2))
    return out, list(carry[:n_state]), list(carry[n_state:])


def ttt_step_reference(
    state: list[torch.Tensor],
    acc: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    position: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One decoding step (primal form), PyTorch reference.

    q, k, v: [B, H, f]; lr: [B, H]; position: [B] absolute position of each row's token; active: [B] bool
    (inactive rows, i.e. padding, leave state and accumulator untouched).
    Returns the output [B, H, f] (fp32), the new state and accumulator.
    """
    b = tau.shape[0]
    index = position % b
    tau_i = tau[index].view(-1, 1, 1, 1)
    q, k, v = (at_least_fp32(x)[:, :, None] for x in (q, k, v))  # [B, H, 1, f]
    lr = at_least_fp32(lr)[..., None, None]  # [B, H, 1, 1]
    active = active.view(-1, 1, 1, 1)

    layer_inputs, grads = _key_pass(state, k, v, ln_weight, ln_bias)
    new_acc = []
    for i, (x_in, g) in enumerate(zip(layer_inputs, grads)):
        weighted_g = lr * g
        new_acc += [acc[2 * i] + x_in.transpose(-1, -2) @ weighted_g, acc[2 * i + 1] + weighted_g]
    new_acc = [torch.where(active, a_new, a) for a_new, a in zip(new_acc, acc)]

    x = q
    for i in range(len(layer_inputs)):
        w = state[2 * i] - tau_i * new_acc[2 * i]
        c = state[2 * i + 1] - tau_i * new_acc[2 * i + 1]
        z = x @ w + c
        if i + 1 < len(layer_inputs):
            x = F.gelu(z, approximate="tanh")
    out = q + ln_forward(z, ln_weight, ln_bias)

    commit = active & (index == b - 1).view(-1, 1, 1, 1)
    new_state = [torch.where(commit, s - tau[-1] * a, s) for s, a in zip(state, new_acc)]
    new_acc = [torch.where(commit, torch.zeros_like(a), a) for a in new_acc]
    return out[:, :, 0], new_state, new_acc


def ttt_chunk(
    state: list[torch.Tensor],
    acc: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    checkpoint_group: int = 0,
    aligned: bool = False,
    kernel_backend: str = "auto",
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Dispatch point of the chunked (prefill / training) TTT operation; see `ttt_chunk_reference`. Under autograd
    the backward recomputes groups of `checkpoint_group` mini-batches (0: `DEFAULT_CHECKPOINT_GROUP`), from the
    inner state kept at each group's start, on either path (with 1 TTT-Linear's kernels skip the recomputation:
    the kept start states are all their backward needs)."""
    checkpoint_group = checkpoint_group or DEFAULT_CHECKPOINT_GROUP
    if not _use_kernel(kernel_backend, state, q, tau.shape[0]):
        return ttt_chunk_reference(
            state,
            acc,
            q,
            k,
            v,
            lr,
            tau,
            ln_weight,
            ln_bias,
            start,
            length,
            checkpoint_group=checkpoint_group,
            aligned=aligned,
        )
    slots = MiniBatchSlots(start, length, tau.shape[0], q.shape[2], aligned)
    q_s, k_s, v_s = (slots.to_slots(x) for x in (q, k, v))
    lr_s = slots.to_slots(lr.float()[..., None])[..., 0]
    chunk_kernel = ttt_mlp_chunk_triton if len(state) == 4 else ttt_linear_chunk_triton
    out, state, acc = chunk_kernel(
        state,
        acc,
        q_s,
        k_s,
        v_s,
        lr_s,
        tau,
        ln_weight,
        ln_bias,
        slots.span,
        TTT_LN_EPS,
        checkpoint_group=checkpoint_group,
    )
    return slots.from_slots(out), state, acc


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ttt_step(
    state: list[torch.Tensor],
    acc: list[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    position: torch.Tensor,
    active: torch.Tensor,
    kernel_backend: str = "auto",
    state_in_cache: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Dispatch point of the one-token decoding step; see `ttt_step_reference`. The kernel updates the state in
    place when the cache owns it (contiguous fp32 tensors, not the broadcast initial parameters).
    `state_in_cache`: state and acc are a cache's own tensors, which a compiled step updates in place."""
    # The step kernel has no backward: a step that needs gradients (rare: decoding is inference) runs in torch.
    needs_grad = _needs_grad(*state, *acc, q, k, v, lr, tau, ln_weight, ln_bias)
    if not _use_step_kernel(kernel_backend, state, q, needs_grad):
        return ttt_step_reference(state, acc, q, k, v, lr, tau, ln_weight, ln_bias, position, active)
    if torch.compiler.is_compiling():
        # torch.compile cannot trace the launch code: the kernel runs as one operator that writes the cache's
        # tensors, and only theirs (never the initial parameters of a first step).
        if not state_in_cache:
            return ttt_step_reference(state, acc, q, k, v, lr, tau, ln_weight, ln_bias, position, active)
        out = ttt_step_inplace([*state, *acc], q, k, v, lr, tau, ln_weight, ln_bias, position, active, TTT_LN_EPS)
        return out, state, acc
    return ttt_step_triton(state, acc, q, k, v, lr, tau, ln_weight, ln_bias, position, active, TTT_LN_EPS)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor, length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over right-padded rows, continuing from `state`.

    x: [B, T, C]; weight: [C, 1, K]; bias: [C]; state: [B, K-1, C], the previous K-1 inputs of each row
    (zeros at the start of a sequence); length: [B] real tokens per row.
    Returns y [B, T, C] and the new state: the last K-1 real inputs of each row.
    """
    return _conv1d_outputs(x, weight, bias, state), next_conv_state(x, state, length)


def _conv1d_outputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> torch.Tensor:
    padded = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    return F.conv1d(padded.transpose(1, 2), weight, bias, groups=weight.shape[0]).transpose(1, 2)


def next_conv_state(x: torch.Tensor, state: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """The last K-1 real inputs of each row of [state, x] (x [B, T, C], state [B, K-1, C], length [B]), in x's
    dtype, without concatenating x."""
    window = state.shape[1]
    index = (length[:, None] + torch.arange(window, device=x.device)[None, :])[..., None]  # into [state, x]
    from_state = torch.gather(state.to(x.dtype), 1, index.clamp(max=max(window - 1, 0)).expand(-1, -1, x.shape[-1]))
    from_x = torch.gather(x, 1, (index - window).clamp(0, x.shape[1] - 1).expand(-1, -1, x.shape[-1]))
    return torch.where(index < window, from_state, from_x)


def causal_conv1d_banks(
    x: torch.Tensor,
    filters: list[tuple[torch.Tensor, torch.Tensor | None]],
    state: torch.Tensor,
    length: torch.Tensor,
    kernel_backend: str = "auto",
    keep_state: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Dispatch point of `causal_conv1d` for one or more filter banks (weight, bias) over the same input and
    state (the shared q/k projection has two): returns each bank's output and the new state (None with
    `keep_state=False`: no cache holds it). A decoding step (one token, no gradient) runs one Triton launch for
    all banks that moves the state in place; whole sequences (and steps with gradients) run one launch forward
    and one backward for up to two banks of one width; anything else runs the reference per bank."""
    parameters = [p for bank in filters for p in bank if p is not None]
    kernel_fits = (
        len(filters) <= 2
        and len({tuple(w.shape) for w, _ in filters}) == 1
        and len({b is None for _, b in filters}) == 1
        and state.device == x.device
    )
    if (
        kernel_fits
        and not torch.compiler.is_compiling()  # compiled, the reference below fuses into the step's graph
        and _kernel_requested(kernel_backend, causal_conv_step_triton, x)
        and not _needs_grad(x, state, *parameters)
        and x.shape[1] == 1
        and state.shape[1] > 0  # a width-1 convolution has no window to move
        and state.dtype == x.dtype
    ):
        return causal_conv_step_triton(x, filters, state, length)
    if (
        kernel_fits
        and not torch.compiler.is_compiling()
        and _kernel_requested(kernel_backend, causal_conv_chunk_triton, x)
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    ):
        outputs = causal_conv_chunk_triton(x, filters, state)
    else:
        outputs = [_conv1d_outputs(x, weight, bias, state) for weight, bias in filters]
    return outputs, next_conv_state(x, state, length) if keep_state else None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm over the last dim: normalized in fp32, rounded to x's dtype, then scaled by the weight."""
    normalized = x.to(torch.float32)
    normalized = normalized * torch.rsqrt(normalized.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel_backend: str = "auto") -> torch.Tensor:
    """Dispatch point of `rms_norm_reference`: one Triton pass forward and one backward for fp32/bf16/fp16
    activations and weights; the reference elsewhere (fp64, CPU)."""
    half_or_single = (torch.float32, torch.bfloat16, torch.float16)
    if (
        not torch.compiler.is_compiling()  # compiled, inductor fuses the reference into one kernel
        and _kernel_requested(kernel_backend, rms_norm_triton, x)
        and x.dtype in half_or_single
        and weight.dtype in half_or_single
        and weight.device == x.device
        and x.shape[-1] <= 65536
    ):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
