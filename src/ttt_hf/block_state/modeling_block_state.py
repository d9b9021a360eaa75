"""Block-State Transformer language models (Fathi et al., arXiv 2306.09539) in the transformers API.

Each layer runs a long causal SSM over the whole sequence, turns its outputs into "context states", and
attends inside blocks of W tokens to its own block (self-attention) and to the context (cross-attention);
both attention outputs are concatenated over heads and projected back.

Layout: a forward call places each row's real tokens in "slots" aligned to the row's block boundaries:
row r's first new token sits at slot `start[r] % W`, the slots before it hold the current block's cached
keys/values, padding sits after its last token. Blocks then line up across rows, so block attention is a
batched matmul over `[B, H, blocks, W]` whatever the padding and the cache offsets.

Decoding (one token per row after a prefill, S4D filters): a `TokenStep` instead. Each layer computes the new
token alone, writes its keys/values into its block's cached slot and attends to the slots before it: the work of
a step is one token's, whatever the block size, and its shapes never change, so that a compiled step compiles once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_block_state import BlockStateCache, BlockStateLayerCache, check_architecture
from .configuration_block_state import BlockStateConfig
from .ssm_ops import (
    _needs_grad,
    _triton_applies,
    _use_triton,
    check_kernel_backend,
    fft_causal_conv,
    rotary_concat_triton,
    s4d_block_end_states,
    s4d_causal_conv,
    s4d_decode_step,
    s4d_discretize,
    s4d_final_state,
    s4d_state_output,
    slot_attention_step_op,
    slot_attention_step_triton,
)
from .tensor_parallel import grad_all_reduce, has_sharded_parameters, local, tp_group

logger = logging.get_logger(__name__)

# LoRA's default targets (`LoraConfig()` without target_modules), registered with PEFT when this file loads, in
# the package or next to a checkpoint under trust_remote_code, so that PEFT finds them without `import ttt_hf`.
# The blocks' linear layers, as for TTT (README, "Fine-tuning with PEFT"); not the cross keys and values, which
# the multi-head context mode computes per head (`HeadwiseLinear`, which LoRA cannot wrap).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "cross_q_proj", "gate_proj", "up_proj", "down_proj"]
try:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError:
    pass
else:
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(BlockStateConfig.model_type, LORA_TARGET_MODULES)

# Copied from ttt_hf.ttt.modeling_ttt.CACHE_NAME
# transformers >= 5.24 names the cache `cache` in `forward`, `generate` and model outputs; earlier releases name it
# `past_key_values`. The models take both and return it under the running release's name.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# Copied from ttt_hf.ttt.modeling_ttt.cache_argument
def cache_argument(cache, kwargs: dict):
    """The cache a caller passed as `cache` or under its alias `past_key_values` (popped from `kwargs`)."""
    past_key_values = kwargs.pop("past_key_values", None)
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError(
            "Got both `cache` and `past_key_values`: pass the cache once, under one of the two names "
            "(`generate` of transformers < 5.24 takes it as `past_key_values=` only)"
        )
    return past_key_values


# Copied from ttt_hf.ttt.modeling_ttt.with_cache_alias
def with_cache_alias(output_class: type) -> type:
    """Makes `output.cache` readable on releases whose outputs name the cache `past_key_values` only (newer ones
    read the old name themselves)."""
    if CACHE_NAME != "cache":
        output_class.cache = property(lambda output: output.past_key_values)
    return output_class


# Copied from ttt_hf.ttt.modeling_ttt.check_prompt
def check_prompt(inputs: torch.Tensor | None, kwargs: dict) -> None:
    """`generate`'s prompt holds a token per row: transformers would fail on an empty one deep inside."""
    prompt = next((x for x in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if x is not None), None)
    if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 and prompt.shape[1] == 0:
        raise ValueError(
            f"generate needs a prompt of at least one token per row, got shape {tuple(prompt.shape)}: start from "
            "the BOS token (or pass no prompt: generate then starts from config.bos_token_id)"
        )


# Copied from ttt_hf.ttt.modeling_ttt.check_inputs
def check_inputs(
    config,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    dtype: torch.dtype,
    attention_mask: torch.Tensor | None = None,
    cache=None,
) -> None:
    """Clear errors for malformed inputs before any work. Token ids are range-checked on the CPU only: on an
    accelerator the check would wait for the device. `cache`: the model's cache passed in, if any."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
            low, high = (bound.item() for bound in torch.aminmax(input_ids))
            if low < 0 or high >= config.vocab_size:
                raise ValueError(
                    f"input_ids must be token ids in [0, {config.vocab_size}) (vocab_size), "
                    f"got values from {low} to {high}"
                )
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [batch, seq_len, {config.hidden_size}], "
                f"got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.dtype != dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
            raise TypeError(f"inputs_embeds must have the model's dtype {dtype}, got {inputs_embeds.dtype}")
    batch, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if attention_mask is not None:
        # Only a mask wider than the input needs the cache's column count, which waits for the device.
        wider = attention_mask.dim() == 2 and attention_mask.shape[1] != seq_len
        cached_tokens = cache.get_seq_length() if wider and cache is not None else 0
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or wider and not cached_tokens:
            raise ValueError(
                f"attention_mask must be a 2-D [batch, seq_len] mask of 0/1 covering the input ({batch} x {seq_len}), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if wider and attention_mask.shape[1] != cached_tokens + seq_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} columns, but the cache has seen {cached_tokens} and "
                f"the input adds {seq_len}: it must cover all {cached_tokens + seq_len} (or the {seq_len} new ones "
                "only). A used cache continues only from the whole sequence so far, as generate passes it; for a new "
                "prompt, use a new cache or call cache.reset()"
            )
    if seq_len == 0:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"{name} must hold at least one token per row, got seq_len 0")


# Copied from ttt_hf.ttt.modeling_ttt.TTTModelOutput with TTT->BlockState
@with_cache_alias
@dataclass
class BlockStateModelOutput(BaseModelOutputWithPast):
    """[`BlockStateModel`]'s output: `BaseModelOutputWithPast` whose `cache` is a [`BlockStateCache`]."""


# Copied from ttt_hf.ttt.modeling_ttt.TTTCausalLMOutput with TTT->BlockState
@with_cache_alias
@dataclass
class BlockStateCausalLMOutput(CausalLMOutputWithPast):
    """[`BlockStateForCausalLM`]'s output: `CausalLMOutputWithPast` whose `cache` is a [`BlockStateCache`]."""


@dataclass
class BlockSlots:
    """Slots of one forward call (see the module docstring).

    start: [B] absolute position of each row's first new token; length: [B] new real tokens per row;
    offset: [B] `start % W`, the slots of block 0 that the cache fills; valid: [B, S] slots holding a new
    token; position: [B, S] absolute position of every slot; right_order: [B, S] slot of each entry when the
    new tokens are aligned to the right end (zeros before them), as the SSM's final state wants them.
    Shared by every layer: own_mask [B, 1, M, W, W] (causal inside the block, over slots holding a token;
    the diagonal always, so padded queries attend to something); prev_mask [B, 1, M, W] (keys of the
    previous block: it exists from a row's second block on).
    """

    start: torch.Tensor
    length: torch.Tensor
    offset: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor
    right_order: torch.Tensor
    own_mask: torch.Tensor
    prev_mask: torch.Tensor
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.valid.shape[1] // self.block_size

    @property
    def next_block(self) -> torch.Tensor:
        """[B] slot-block index of each row's next token after this call."""
        return (self.offset + self.length) // self.block_size


@dataclass
class TokenStep:
    """A decoding step: one input column per row, against the cache (see the module docstring).

    start: [B] absolute position of each row's token; length: [B] 1 where the column holds a real token, else 0
    (the row's cache stays as it is); offset: [B] `start % W`, the token's slot in its block.
    """

    start: torch.Tensor
    length: torch.Tensor
    offset: torch.Tensor
    block_size: int
    num_blocks = 1

    @property
    def active(self) -> torch.Tensor:
        return self.length > 0

    @property
    def valid(self) -> torch.Tensor:
        return self.active[:, None]  # [B, 1]

    @property
    def position(self) -> torch.Tensor:
        return self.start[:, None]  # [B, 1]

    @property
    def next_block(self) -> torch.Tensor:
        """[B] 1 where the token closes its block: the block that the cache holds next is a new one."""
        return (self.offset + self.length) // self.block_size

    def slots_up_to_token(self) -> torch.Tensor:
        """[B, W] the slots of the token's block that it attends to: the cached ones before it and its own."""
        return torch.arange(self.block_size, device=self.offset.device)[None] <= self.offset[:, None]

    def previous_block_exists(self) -> torch.Tensor:
        """[B, W] the previous block's slots, all there from a row's second block on."""
        return (self.start >= self.block_size)[:, None].expand(-1, self.block_size)


class BlockStateRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


# Copied from ttt_hf.ttt.modeling_ttt.TTTMLP with TTT->BlockState
class BlockStateMLP(nn.Module):
    """SwiGLU feed-forward block: down(act(gate(x)) * up(x))."""

    def __init__(self, config: BlockStateConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            # Recomputed in the backward from gate and up: the activation, which the product would keep beside
            # them, is not kept (intermediate_size values per token).
            return self.down_proj(checkpoint(self._gated_activation, gate, up, use_reentrant=False))
        return self.down_proj(self._gated_activation(gate, up))

    def _gated_activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def apply_rope(x: torch.Tensor, position: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (half-split pairs). x: [B, S, h, hd]; position: [B, S]."""
    angle = position.float()[:, :, None, None] * _inv_freq(x.shape[-1], theta, x.device)
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(x.dtype), torch.cat([angle.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rotary_heads(
    rotated: torch.Tensor,
    plain: torch.Tensor | None,
    position: torch.Tensor,
    theta: float,
    kernel_backend: str = "auto",
) -> torch.Tensor:
    """`rotated` [B, S, H, hd] with rotary embeddings at `position` [B, S], followed along the head axis by
    `plain` [B, S, H2, hd] (or nothing). Dispatch point: one Triton pass (`rotary_concat_triton`) or the
    reference, `apply_rope` and a concatenation."""
    half = rotated.shape[-1] // 2
    supported = rotated.shape[-1] % 2 == 0 and half & (half - 1) == 0
    if _use_triton(kernel_backend, rotated.device, supported, "rotary embeddings with head_dim / 2 not a power of two"):
        return rotary_concat_triton(rotated, plain, position, _inv_freq(rotated.shape[-1], theta, rotated.device))
    out = apply_rope(rotated, position, theta)
    return out if plain is None else torch.cat([out, plain.to(out.dtype)], dim=2)


class BlockStateS4D(nn.Module):
    """S4D bank: `F` diagonal state spaces per feature (N/2 complex modes each), plus a skip term D.

    Parameters `log_a_real, a_imag, c` [F, D, N/2] (c as real pairs), `log_dt, skip` [F, D].
    """

    def __init__(self, config: BlockStateConfig) -> None:
        super().__init__()
        shape = (config.filters_per_feature, config.hidden_size)
        modes = config.ssm_state_size // 2
        self.log_a_real = nn.Parameter(torch.empty(*shape, modes))
        self.a_imag = nn.Parameter(torch.empty(*shape, modes))
        self.c = nn.Parameter(torch.empty(*shape, modes, 2))
        self.log_dt = nn.Parameter(torch.empty(*shape))
        self.skip = nn.Parameter(torch.empty(*shape))
        self.kernel_backend = config.kernel_backend

    def _discretized(self):
        dt_a, db = s4d_discretize(self.log_a_real, self.a_imag, self.log_dt)
        return dt_a, db, torch.view_as_complex(self.c.float().contiguous())

    def _step(self, u, step, cache, x0, dtype) -> torch.Tensor:
        """Decoding: the recurrence advances each row by its one token. u: [B, 1, D]. Returns the token's outputs
        [B, 1, F, D] in `dtype` (computed in fp32), skip term included."""
        y, state = s4d_decode_step(
            u[:, 0],
            x0,
            self.log_a_real,
            self.a_imag,
            self.log_dt,
            self.c,
            self.skip,
            step.active,
            dtype,
            self.kernel_backend,
        )
        cache.set("ssm_state", state)
        return y[:, None]

    def outputs(
        self,
        u: torch.Tensor,
        layout: BlockSlots,
        cache: BlockStateLayerCache | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Outputs at every slot: [B, S, F, D] in `dtype` (SH/MH), computed in fp32. u: [B, S, D], zeros
        outside `layout.valid`."""
        x0 = cache.get("ssm_state") if cache is not None else None
        if isinstance(layout, TokenStep):
            return self._step(u, layout, cache, x0, dtype)
        dt_a, db, c = self._discretized()
        # From a zero state the convolution writes `dtype` itself; a cached state's share is added in fp32.
        y = s4d_causal_conv(u, dt_a, db, c, self.skip, dtype if x0 is None else torch.float32, self.kernel_backend)
        if x0 is not None:
            steps = torch.arange(u.shape[1], device=u.device)[None] - layout.offset[:, None] + 1
            y = (y + s4d_state_output(x0, dt_a, c, steps.clamp(min=0))).to(dtype)
        if cache is not None:
            cache.set("ssm_state", self._final_state(u, layout, x0, dt_a, db))
        return y

    def block_end_outputs(
        self, u: torch.Tensor, layout: BlockSlots, cache: BlockStateLayerCache | None
    ) -> torch.Tensor:
        """Outputs at the last slot of every block: [B, M, F, D] (MF). Never builds all slots' outputs."""
        x0 = cache.get("ssm_state") if cache is not None else None
        if isinstance(layout, TokenStep):
            # Read only where the token closes its block.
            return self._step(u, layout, cache, x0, torch.float32)
        dt_a, db, c = self._discretized()
        width = layout.block_size
        if x0 is None:
            x0 = torch.zeros(u.shape[0], *dt_a.shape, dtype=torch.complex64, device=u.device)
        states = s4d_block_end_states(u.view(u.shape[0], -1, width, u.shape[-1]), x0, dt_a, db, width - layout.offset)
        if cache is not None:
            cache.set("ssm_state", self._final_state(u, layout, x0, dt_a, db))
        return 2 * (c * states).real.sum(-1) + self.skip.float() * u[:, width - 1 :: width, None]

    @staticmethod
    def _final_state(u, layout, x0, dt_a, db):
        u_right = torch.gather(u, 1, layout.right_order[..., None].expand_as(u))
        if x0 is None:
            x0 = torch.zeros(u.shape[0], *dt_a.shape, dtype=torch.complex64, device=u.device)
        return s4d_final_state(u_right, x0, dt_a, db, layout.length)


class BlockStateImplicitFilter(nn.Module):
    """Unstructured long filter: `h(t) = exp(-decay * t_norm) * MLP(features(t_norm))`, `t_norm = lag /
    ssm_filter_max_len`, one filter per (filter, feature) channel, plus a skip term.

    It has no finite state: decoding convolves the whole input history, which the cache keeps.
    """

    def __init__(self, config: BlockStateConfig) -> None:
        super().__init__()
        self.max_len = config.ssm_filter_max_len
        self.num_features = config.ssm_filter_features
        channels = config.filters_per_feature * config.hidden_size
        self.shape = (config.filters_per_feature, config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(2 * self.num_features + 1, config.ssm_filter_hidden),
            nn.SiLU(),
            nn.Linear(config.ssm_filter_hidden, config.ssm_filter_hidden),
            nn.SiLU(),
            nn.Linear(config.ssm_filter_hidden, channels),
        )
        self.decay = nn.Parameter(torch.empty(self.shape))
        self.skip = nn.Parameter(torch.empty(self.shape))

    def kernel(self, length: int, device) -> torch.Tensor:
        """[F, D, length] fp32."""
        t = torch.arange(length, device=device, dtype=torch.float32)[:, None] / self.max_len
        freqs = 2 * math.pi * torch.arange(1, self.num_features + 1, device=device, dtype=torch.float32)
        features = torch.cat([t, torch.sin(freqs * t), torch.cos(freqs * t)], dim=-1)
        h = features
        for module in self.mlp:  # in fp32 whatever the model dtype
            h = F.linear(h, module.weight.float(), module.bias.float()) if isinstance(module, nn.Linear) else module(h)
        h = h.T.reshape(*self.shape, length)
        return h * torch.exp(-self.decay.float()[..., None].abs() * t[:, 0])

    def _with_history(self, u, layout, cache):
        """The new inputs appended to the cached history, right-aligned: ([B, P+S, D], right index of each slot)."""
        history = cache.get("history") if cache is not None else None
        if history is None:
            history = u.new_zeros(u.shape[0], 0, u.shape[-1])
        seen = layout.start
        hist_valid = torch.arange(history.shape[1], device=u.device)[None] >= history.shape[1] - seen[:, None]
        valid = torch.cat([hist_valid, layout.valid], dim=1)
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
        full = torch.gather(torch.cat([history, u], 1), 1, order[..., None].expand(-1, -1, u.shape[-1]))
        if cache is not None:
            keep = int((seen + layout.length).max())
            cache.set("history", full[:, full.shape[1] - keep :])
        where = torch.argsort(order, dim=1)[:, history.shape[1] :]  # right-aligned index of every slot
        return full, where

    def outputs(
        self,
        u: torch.Tensor,
        layout: BlockSlots,
        cache: BlockStateLayerCache | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        full, where = self._with_history(u, layout, cache)
        y = fft_causal_conv(full, self.kernel(full.shape[1], u.device))  # [B, P+S, F, D]
        y = torch.gather(y, 1, where[:, :, None, None].expand(-1, -1, *y.shape[2:]))
        return (y + self.skip.float() * u.float()[:, :, None]).to(dtype)

    def block_end_outputs(
        self, u: torch.Tensor, layout: BlockSlots, cache: BlockStateLayerCache | None
    ) -> torch.Tensor:
        full, where = self._with_history(u, layout, cache)
        width = layout.block_size
        ends = where[:, width - 1 :: width]  # [B, M]
        kernel = self.kernel(full.shape[1], u.device)
        outputs = []
        for f in range(kernel.shape[0]):  # one filter at a time: never all filters at all positions
            y = fft_causal_conv(full, kernel[f : f + 1])[:, :, 0]  # [B, P+S, D]
            outputs.append(torch.gather(y, 1, ends[..., None].expand(-1, -1, y.shape[-1])))
        return torch.stack(outputs, dim=2) + self.skip.float() * u[:, width - 1 :: width, None]


class HeadwiseLinear(nn.Module):
    """MH context projection: head j maps filter j's outputs [D] to its keys/values [hd]. weight: [H, hd, D]."""

    def __init__(self, heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, H, D] -> [B, S, H, hd]."""
        return torch.einsum("bshd,hkd->bshk", x, local(self.weight).to(x.dtype))


def _previous_blocks(blocks: torch.Tensor, cached: torch.Tensor | None) -> torch.Tensor:
    """[B, M, W, h, hd] -> the block before each one: block m-1, or for block 0 the cached block (or zeros)."""
    first = blocks.new_zeros(blocks[:, :1].shape) if cached is None else cached[:, None].to(blocks.dtype)
    return torch.cat([first, blocks[:, :-1]], dim=1)


def _attend_in_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_size: int) -> torch.Tensor:
    """Causal attention inside each block of W slots, the blocks as batch entries of one `is_causal` call
    (which SDPA can run with its flash kernel): [B, S, h, hd] -> [B, S, h, hd], no copies on the way in.

    The plain causal mask is exact for every slot holding a new token: a row's slots are its cached keys,
    then its new tokens, then padding, so the keys at or before a token are all real. It differs from
    `own_mask` only at padded queries, whose outputs are never read.
    """
    batch, slots, heads, _ = query.shape
    blocks = [x.reshape(-1, block_size, heads, x.shape[-1]).transpose(1, 2) for x in (query, key, value)]
    out = F.scaled_dot_product_attention(*blocks, is_causal=True)  # [B*M, h, W, hd]
    return out.transpose(1, 2).reshape(batch, slots, heads, -1)


def _write_slot(cache: BlockStateLayerCache, name: str, new: torch.Tensor, step: TokenStep) -> None:
    """Writes each active row's token `new` [B, 1, h, hd] into slot `offset` of the cached block `name`."""
    block = cache.get(name)  # [B, W, h, hd]
    index = step.offset.view(-1, 1, 1, 1).expand_as(new)
    new = torch.where(step.active.view(-1, 1, 1, 1), new.to(block.dtype), torch.gather(block, 1, index))
    if block.requires_grad or new.requires_grad:  # a loss may reach back through the cache: keep its history
        cache.set(name, block.scatter(1, index, new))
    else:  # in place: a step moves one slot's bytes, not the block's
        block.scatter_(1, index, new)


def _attend_slots(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row [B, 1, h, hd] against cached slots [B, L, h, hd] where `mask` [B, L]: [B, 1, h, hd]."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2).to(query.dtype),
        value.transpose(1, 2).to(query.dtype),
        attn_mask=mask[:, None, None, :],
    )
    return out.transpose(1, 2)


class BlockStateAttention(nn.Module):
    """Block self-attention (+ cross-attention to the SSM context states when the layer has an SSM).

    Activations are kept as [B, S, heads, hd] (the projections' layout): the 2H-head attention of SH/MH
    concatenates self and cross heads along the head axis and hands SDPA strided views of the blocks."""

    def __init__(self, config: BlockStateConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.block_size = config.block_size
        self.context_mode = config.context_mode
        self.has_ssm = layer_idx in config.ssm_layers
        width = config.hidden_size
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        if self.has_ssm:
            self.ssm = BlockStateS4D(config) if config.ssm_kind == "s4d" else BlockStateImplicitFilter(config)
            self.cross_q_proj = nn.Linear(width, width, bias=False)
            if self.context_mode == "mh":
                self.cross_k_proj = HeadwiseLinear(self.num_heads, width, self.head_dim)
                self.cross_v_proj = HeadwiseLinear(self.num_heads, width, self.head_dim)
            else:
                self.cross_k_proj = nn.Linear(width, width, bias=False)
                self.cross_v_proj = nn.Linear(width, width, bias=False)
            if self.context_mode == "mf":
                self.context_ids = nn.Parameter(torch.empty(config.num_context_states, width))
                self.initial_context = nn.Parameter(torch.empty(config.num_context_states, width))
        self.o_proj = nn.Linear(2 * width if self.has_ssm else width, width, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, self.head_dim)  # [B, S, H, hd] (H: this rank's heads)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.block_size, *x.shape[2:])  # [B, M, W, h, hd]

    def _fill_from_cache(self, x, cache, names, layout):
        """Slots of block 0 before each row's first new token come from the cache. x: [B, S, h, hd], its heads
        the cached tensors `names` (H heads each) side by side."""
        if cache is None or cache.get(names[0]) is None:
            return x
        cached = torch.cat([cache.get(name) for name in names], dim=2).to(x.dtype)
        width = cached.shape[1]
        from_cache = (torch.arange(width, device=x.device)[None, :] < layout.offset[:, None])[:, :, None, None]
        head = torch.where(from_cache, cached, x[:, :width])
        return torch.cat([head, x[:, width:]], dim=1)

    def _store_blocks(self, cache, x, names, layout, previous_name=None):
        """Keeps the slots of the block holding each row's next token (and, optionally, the block before) of
        each head group of x (see `_fill_from_cache`)."""
        heads = x.shape[2] // len(names)
        for group, name in enumerate(names):
            keep_previous = previous_name if group == 0 else None  # the previous block is the self heads'
            blocks = self._blocks(x[:, :, group * heads : (group + 1) * heads])
            zeros = torch.zeros_like(blocks[:, :1])
            before = cache.get(keep_previous) if keep_previous else None
            before = zeros if before is None else before[:, None].to(x.dtype)
            extended = torch.cat([before, blocks, zeros], dim=1)  # [B, M+2, W, H, hd]
            index = layout.next_block.view(-1, 1, 1, 1, 1).expand(-1, 1, *blocks.shape[2:])
            cache.set(name, torch.gather(extended, 1, index + 1)[:, 0])
            if keep_previous:
                cache.set(keep_previous, torch.gather(extended, 1, index)[:, 0])

    def _through_cache(self, x, cache, names, layout):
        x = self._fill_from_cache(x, cache, names, layout)
        if cache is not None:
            self._store_blocks(cache, x, names, layout)
        return x

    def forward(
        self, hidden_states: torch.Tensor, layout: BlockSlots | TokenStep, cache: BlockStateLayerCache | None = None
    ) -> torch.Tensor:
        if isinstance(layout, TokenStep):
            return self._decode(hidden_states, layout, cache)
        batch, slots, _ = hidden_states.shape
        query, key = self._heads(self.q_proj(hidden_states)), self._heads(self.k_proj(hidden_states))
        value = self._heads(self.v_proj(hidden_states))
        previous_block = self.config.attend_previous_block
        # SH/MH cross-attention has the self-attention's shape and mask: one call over 2H heads, the cross
        # heads placed beside the self heads as the rotary embedding is applied.
        fused = self.has_ssm and self.context_mode != "mf" and not previous_block
        cross = self._context_heads(hidden_states, layout, cache) if fused else (None, None, None)
        query, key = (self._rotary(x, extra, layout) for x, extra in zip((query, key), cross))
        value = value if cross[2] is None else torch.cat([value, cross[2]], dim=2)
        names = (("self_k", "cross_k"), ("self_v", "cross_v")) if fused else (("self_k",), ("self_v",))
        key, value = (self._fill_from_cache(x, cache, n, layout) for x, n in zip((key, value), names))
        previous = None
        if previous_block:  # read before the cache moves on
            previous = (
                _previous_blocks(self._blocks(key), cache.get("prev_k") if cache else None),
                _previous_blocks(self._blocks(value), cache.get("prev_v") if cache else None),
            )
        if cache is not None:
            self._store_blocks(cache, key, names[0], layout, "prev_k" if previous else None)
            self._store_blocks(cache, value, names[1], layout, "prev_v" if previous else None)

        if fused:
            attended = _attend_in_blocks(query, key, value, self.block_size)
        else:
            attended = self._self_attention(query, key, value, previous, layout)
            if self.has_ssm and self.context_mode == "mf":
                attended = torch.cat([attended, self._mf_cross_attention(hidden_states, layout, cache)], dim=2)
            elif self.has_ssm:
                cross_q, cross_k, cross_v = self._context_heads(hidden_states, layout, cache)
                cross_k = self._through_cache(cross_k, cache, ("cross_k",), layout)
                cross_v = self._through_cache(cross_v, cache, ("cross_v",), layout)
                attended = torch.cat([attended, _attend_in_blocks(cross_q, cross_k, cross_v, self.block_size)], dim=2)
        return self.o_proj(attended.reshape(batch, slots, -1))

    def _decode(self, hidden_states: torch.Tensor, step: TokenStep, cache: BlockStateLayerCache) -> torch.Tensor:
        """One token per row [B, 1, D]: its keys/values go to its slot of the cached block, then it attends to the
        slots up to its own (and to the previous block, or to the block's context states in MF)."""
        query, key = self._heads(self.q_proj(hidden_states)), self._heads(self.k_proj(hidden_states))
        value = self._heads(self.v_proj(hidden_states))
        slot_cross = self.has_ssm and self.context_mode != "mf"
        cross = self._context_heads(hidden_states, step, cache) if slot_cross else (None, None, None)
        if self.config.attend_previous_block:
            query, key = (self._rotary(x, extra, step) for x, extra in zip((query, key), cross))  # [B, 1, H(+H), hd]
            heads = query.shape[2] // 2 if slot_cross else query.shape[2]  # this rank's self heads
            attended = [self._attend_with_previous_block(query[:, :, :heads], key[:, :, :heads], value, step, cache)]
            if slot_cross:
                cross_q, cross_k = query[:, :, heads:], key[:, :, heads:]
                attended.append(self._attend_own_blocks([cross_q], [cross_k], [cross[2]], ["cross"], step, cache, 0))
        else:
            names = ["self", "cross"] if slot_cross else ["self"]
            groups = [(query, key, value), cross][: len(names)]
            attended = [self._attend_own_blocks(*zip(*groups), names, step, cache, rotated_groups=1)]
        if self.has_ssm and not slot_cross:
            attended.append(self._mf_cross_attention(hidden_states, step, cache))
        attended = attended[0] if len(attended) == 1 else torch.cat(attended, dim=2)  # [B, 1, heads, hd]
        return self.o_proj(attended.flatten(2))

    def _attend_own_blocks(self, queries, keys, values, names, step, cache, rotated_groups):
        """Groups of heads of a decoding token (self-attention, then SH/MH cross-attention; [B, 1, h, hd] each, the
        first `rotated_groups` groups' queries and keys not rotated yet): each group's key and value go to the
        token's slot of the cached block `names[g]_k/v`, and its query attends to that block's slots up to the
        token's own. Returns [B, 1, groups * h, hd]. Dispatch point: one Triton launch per group for the rotary
        embedding, the writes and the attention (instead of a gather, a select and a scatter per tensor and a masked
        SDPA) when no gradient is needed, else the reference below."""
        caches = [(cache.get(f"{name}_k"), cache.get(f"{name}_v")) for name in names]
        half = self.head_dim // 2
        supported = (
            not _needs_grad(*queries, *keys, *values, *(t for pair in caches for t in pair))
            and self.head_dim % 2 == 0
            and half & (half - 1) == 0
        )
        supported = supported and all(t.is_contiguous() and t.dtype == pair[0].dtype for pair in caches for t in pair)
        backend = self.config.kernel_backend
        if _triton_applies(backend, queries[0].device, supported, "decoding with gradients"):
            attend = slot_attention_step_op if torch.compiler.is_compiling() else slot_attention_step_triton
            inv_freq = _inv_freq(self.head_dim, self.config.rope_theta, queries[0].device)
            key_caches, value_caches = (list(group) for group in zip(*caches))
            return attend(
                list(queries),
                list(keys),
                list(values),
                key_caches,
                value_caches,
                step.offset,
                step.active,
                step.start,
                inv_freq,
                rotated_groups,
            )
        outputs, mask = [], step.slots_up_to_token()
        for group, (query, key, value, name) in enumerate(zip(queries, keys, values, names)):
            if group < rotated_groups:
                query, key = (self._rotary(x, None, step) for x in (query, key))
            _write_slot(cache, f"{name}_k", key, step)
            _write_slot(cache, f"{name}_v", value, step)
            outputs.append(_attend_slots(query, cache.get(f"{name}_k"), cache.get(f"{name}_v"), mask))
        return torch.cat(outputs, dim=2)

    @staticmethod
    def _attend_with_previous_block(query, key, value, step, cache):
        """A decoding token attends to the previous block and to its own block's slots up to its own. [B, 1, h, hd]"""
        _write_slot(cache, "self_k", key, step)
        _write_slot(cache, "self_v", value, step)
        own = step.slots_up_to_token()
        self_k = torch.cat([cache.get("prev_k"), cache.get("self_k")], dim=1)
        self_v = torch.cat([cache.get("prev_v"), cache.get("self_v")], dim=1)
        mask = torch.cat([step.previous_block_exists(), own], dim=1)
        # A token that closes its block makes that block the previous one of the next token.
        closes = (step.active & (step.next_block > 0)).view(-1, 1, 1, 1)
        for name in ("k", "v"):
            cache.set(f"prev_{name}", torch.where(closes, cache.get(f"self_{name}"), cache.get(f"prev_{name}")))
        return _attend_slots(query, self_k, self_v, mask)

    def _rotary(self, x, extra, layout):
        return rotary_heads(x, extra, layout.position, self.config.rope_theta, self.config.kernel_backend)

    def _self_attention(self, query, key, value, previous, layout):
        """[B, S, H, hd]; `previous`: the previous blocks' keys and values [B, M, W, H, hd], or None."""
        if previous is None:
            return _attend_in_blocks(query, key, value, self.block_size)
        width = self.block_size
        prev_mask = layout.prev_mask[:, :, :, None, :].expand(-1, -1, -1, width, -1)
        mask = torch.cat([prev_mask, layout.own_mask], dim=-1)

        def head_major(blocks):  # [B, M, W, H, hd] -> [B, H, M, W, hd]
            return blocks.permute(0, 3, 1, 2, 4)

        key_b = head_major(torch.cat([previous[0], self._blocks(key)], dim=2))
        value_b = head_major(torch.cat([previous[1], self._blocks(value)], dim=2))
        out = F.scaled_dot_product_attention(head_major(self._blocks(query)), key_b, value_b, attn_mask=mask)
        return out.permute(0, 2, 3, 1, 4).reshape(query.shape)

    @staticmethod
    def _ssm_input(hidden_states, layout):
        """The SSM input in the model's dtype (the SSM reads it as fp32): zero outside the new tokens."""
        return (hidden_states * layout.valid[..., None]).contiguous()

    def _context_heads(self, hidden_states, layout, cache):
        """SH/MH cross-attention queries and context keys/values, [B, S, H, hd] each (block 0's cached slots
        not filled yet)."""
        query = self._heads(self.cross_q_proj(hidden_states))
        u = self._ssm_input(hidden_states, layout)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            context = self.ssm.outputs(u, layout, cache, hidden_states.dtype)  # [B, S, F, D]
        if self.context_mode == "mh":
            if (group := tp_group(self.cross_k_proj.weight)) is not None:
                # Heads split over the ranks: head j reads filter j, so this rank reads its heads' filters. The
                # SSM is replicated; its gradient from this rank's heads is summed over the ranks.
                heads = local(self.cross_k_proj.weight).shape[0]
                first = heads * self.cross_k_proj.weight.device_mesh.get_local_rank()
                context = grad_all_reduce(context, group)[:, :, first : first + heads]
            return query, self.cross_k_proj(context), self.cross_v_proj(context)
        return query, self._heads(self.cross_k_proj(context[:, :, 0])), self._heads(self.cross_v_proj(context[:, :, 0]))

    def _mf_cross_attention(self, hidden_states, layout, cache):
        """MF: every query of block i attends to block i's S context states (no mask). [B, S, H, hd]."""
        batch, slots, _ = hidden_states.shape
        query = self._heads(self.cross_q_proj(hidden_states))
        # [B, H, M, W, hd]; a decoding step: one block of one slot
        query = query.view(batch, layout.num_blocks, -1, *query.shape[2:]).permute(0, 3, 1, 2, 4)
        u = self._ssm_input(hidden_states, layout)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            ends = self.ssm.block_end_outputs(u, layout, cache)  # [B, M, S, D]: block ends only
        key, value = self._mf_context(ends.to(hidden_states.dtype), layout, cache)
        out = F.scaled_dot_product_attention(query, key, value)  # [B, H, M, W, hd]
        return out.permute(0, 2, 3, 1, 4).reshape(batch, slots, -1, self.head_dim)

    def _mf_context(self, ends, layout, cache):
        """Context keys/values of every block [B, H, M, S, hd]: block i uses the filter outputs at the end of
        block i-1; the first block of a sequence uses the learned initial context; a block already begun in
        an earlier call uses the cached context."""
        batch, blocks = ends.shape[:2]
        states = ends + self.context_ids.to(ends.dtype)  # [B, M, S, D]
        first = (self.initial_context + self.context_ids).to(ends.dtype).expand(batch, 1, *states.shape[2:])

        def project(proj, x):  # [B, n, S, D] -> [B, H, n, S, hd]
            y = proj(x).view(*x.shape[:3], -1, self.head_dim)
            return y.permute(0, 3, 1, 2, 4)

        contexts_k = project(self.cross_k_proj, torch.cat([first, states], dim=1))  # [B, H, M+1, S, hd]
        contexts_v = project(self.cross_v_proj, torch.cat([first, states], dim=1))
        cached_k, cached_v = (cache.get("cross_k"), cache.get("cross_v")) if cache is not None else (None, None)
        if cached_k is not None:
            # Rows past their first block continue the context their current block started with.
            use_cache = (layout.start > 0).view(-1, 1, 1, 1)
            contexts_k[:, :, 0] = torch.where(use_cache, cached_k.to(ends.dtype), contexts_k[:, :, 0])
            contexts_v[:, :, 0] = torch.where(use_cache, cached_v.to(ends.dtype), contexts_v[:, :, 0])
        if cache is not None:
            index = layout.next_block.view(-1, 1, 1, 1, 1).expand(-1, contexts_k.shape[1], 1, *contexts_k.shape[3:])
            cache.set("cross_k", torch.gather(contexts_k, 2, index)[:, :, 0])
            cache.set("cross_v", torch.gather(contexts_v, 2, index)[:, :, 0])
        return contexts_k[:, :, :blocks], contexts_v[:, :, :blocks]


class BlockStateDecoderLayer(GradientCheckpointingLayer):
    """`h += Attention(norm(h))` (block self-attention + SSM context cross-attention); `h += MLP(norm(h))`."""

    def __init__(self, config: BlockStateConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = BlockStateRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = BlockStateAttention(config, layer_idx)
        self.post_attention_layernorm = BlockStateRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = BlockStateMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, layout: BlockSlots, cache: BlockStateCache | None = None
    ) -> torch.Tensor:
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        hidden_states = hidden_states + self.attn(self.input_layernorm(hidden_states), layout, layer_cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BlockStatePreTrainedModel(PreTrainedModel):
    config_class = BlockStateConfig
    config: BlockStateConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlockStateDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, BlockStateRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HeadwiseLinear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, BlockStateS4D):
            # S4D-Lin: A = -1/2 + i pi n; dt log-uniform in [1e-3, 1e-1]; C complex normal (unit variance).
            modes = module.a_imag.shape[-1]
            init.constant_(module.log_a_real, math.log(0.5))
            init.copy_(module.a_imag, (math.pi * torch.arange(modes, dtype=torch.float32)).expand_as(module.a_imag))
            init.normal_(module.c, mean=0.0, std=0.5**0.5)
            init.uniform_(module.log_dt, math.log(1e-3), math.log(1e-1))
            init.normal_(module.skip, mean=0.0, std=1.0)
        elif isinstance(module, BlockStateImplicitFilter):
            decay = torch.linspace(0.5, 8.0, module.decay.shape[-1]).expand_as(module.decay)
            init.copy_(module.decay, decay)
            init.normal_(module.skip, mean=0.0, std=1.0)
        elif isinstance(module, BlockStateAttention) and hasattr(module, "context_ids"):
            init.normal_(module.context_ids, mean=0.0, std=std)
            init.normal_(module.initial_context, mean=0.0, std=std)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # One folder serves AutoModel and AutoModelForCausalLM under trust_remote_code.
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {**auto_map, "AutoModel": "modeling_block_state.BlockStateModel"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Generation uses the model's own BlockStateCache (`OwnCacheGenerationMixin._prepare_cache_for_generation`).
        return False


class BlockStateModel(BlockStatePreTrainedModel):
    def __init__(self, config: BlockStateConfig) -> None:
        super().__init__(config)
        check_kernel_backend(config.kernel_backend)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BlockStateDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BlockStateRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: BlockStateCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BlockStateModelOutput | tuple:
        r"""
        cache ([`BlockStateCache`], *optional*):
            The block and SSM states to continue from; updated in place. `past_key_values` is accepted as an alias.
        """
        cache = cache_argument(cache, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "position_ids is not supported by Block-State models: positions come from attention_mask and the "
                "cache (pass attention_mask with 0 at padding)"
            )
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported by Block-State models")
        check_inputs(
            self.config,
            input_ids,
            inputs_embeds,
            self.embed_tokens.weight.dtype,
            attention_mask,
            cache if isinstance(cache, BlockStateCache) else None,
        )
        if cache is not None and not isinstance(cache, BlockStateCache):
            raise TypeError(f"cache must be a BlockStateCache, got {type(cache).__name__}")
        if cache is not None:
            check_architecture(cache, self.config)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and (use_cache or cache is not None):
            # The backward replays each layer: a cache would be written twice and read half-updated.
            logger.warning_once("Caching is incompatible with gradient checkpointing in training: running uncached")
            use_cache, cache = False, None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = BlockStateCache(self.config)

        batch, seq_len, _ = inputs_embeds.shape
        device = inputs_embeds.device
        mask = self._token_mask(attention_mask, batch, seq_len, device)
        start = cache.row_positions(batch, device) if cache is not None else mask.new_zeros(batch, dtype=torch.long)
        # One token per row after a prefill: a decoding step, whose shapes the host knows without reading the
        # device, so that it compiles once. The implicit filter's growing history keeps it on the slot layout.
        if seq_len == 1 and cache is not None and cache.positions is not None and cache.is_compileable:
            length = mask[:, 0].long()
            layout = TokenStep(start, length, start % self.config.block_size, self.config.block_size)
            slot_of_token = torch.zeros_like(mask, dtype=torch.long)
            # Padding's embedding (even NaN) never enters.
            hidden_states = torch.where(mask[..., None], inputs_embeds, 0)
        else:
            layout, slot_of_token = self._layout(mask, start)
            hidden_states = inputs_embeds.new_zeros(batch, layout.valid.shape[1], inputs_embeds.shape[-1])
            rows = torch.arange(batch, device=device)[:, None].expand(-1, seq_len)
            hidden_states = hidden_states.index_put((rows[mask], slot_of_token[mask]), inputs_embeds[mask])

        def to_tokens(x):  # slots -> input columns (zeros at padding)
            index = slot_of_token.clamp(max=x.shape[1] - 1)[..., None].expand(-1, -1, x.shape[-1])
            return torch.gather(x, 1, index) * mask[..., None]

        all_hidden_states = [inputs_embeds] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, layout, cache=cache)
            if output_hidden_states:
                all_hidden_states.append(to_tokens(hidden_states))
        hidden_states = to_tokens(self.norm(hidden_states))
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states
        if cache is not None:
            cache.advance(seq_len, layout.length)

        output = BlockStateModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **{CACHE_NAME: cache},
        )
        return output if return_dict else output.to_tuple()

    def _layout(self, mask: torch.Tensor, start: torch.Tensor) -> tuple[BlockSlots, torch.Tensor]:
        width = self.config.block_size
        length = mask.sum(-1)
        offset = start % width
        rank = mask.cumsum(-1) - 1
        slot_of_token = offset[:, None] + rank.clamp(min=0)  # [B, T]
        num_slots = max(1, -(-int((offset + length).max()) // width)) * width
        slot = torch.arange(num_slots, device=mask.device)[None]
        valid = (slot >= offset[:, None]) & (slot < (offset + length)[:, None])
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices
        # Keys exist at new tokens and at the cached slots before them.
        key_valid = (valid | (slot < offset[:, None])).view(mask.shape[0], 1, -1, width)  # [B, 1, M, W]
        causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
        diagonal = torch.eye(width, dtype=torch.bool, device=mask.device)
        own_mask = causal & (key_valid[..., None, :] | diagonal)
        # The previous block of slot-block 0 is the cached one (complete), of block m the slots of block m-1.
        absolute_block = (start - offset)[:, None] // width + torch.arange(key_valid.shape[2], device=mask.device)
        prev_valid = torch.cat([torch.ones_like(key_valid[:, :, :1]), key_valid[:, :, :-1]], dim=2)
        prev_mask = prev_valid & (absolute_block >= 1)[:, None, :, None]
        layout = BlockSlots(
            start=start,
            length=length,
            offset=offset,
            valid=valid,
            position=(start - offset)[:, None] + slot,
            right_order=order,
            own_mask=own_mask,
            prev_mask=prev_mask,
            block_size=width,
        )
        return layout, slot_of_token

    @staticmethod
    def _token_mask(attention_mask, batch: int, seq_len: int, device) -> torch.Tensor:
        """[B, T] bool of real tokens: the last columns of a 2-D mask (checked by `check_inputs`)."""
        if attention_mask is None:
            return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        return attention_mask[:, -seq_len:].to(device) != 0


# Copied from ttt_hf.ttt.modeling_ttt.OwnCacheGenerationMixin
class OwnCacheGenerationMixin:
    """What `generate` needs from a model that decodes with its own cache (`cache_class`, built from the config):
    the cache handed over before the prefill, a decoding step's mask reduced to its own column, and no compiled
    step while parameters are split over ranks."""

    cache_class: type

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        # generate decides whether to compile its decoding step from the cache it holds before the prefill: hand it
        # the model's own cache from the start rather than letting the first forward create it.
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        passed = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if passed is None and model_kwargs.get("use_cache", generation_config.use_cache):
            model_kwargs[CACHE_NAME] = self.cache_class(self.config)

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        # With parameters split over ranks a decoding step runs collectives inside the layers, which no compiled
        # step is tested with: it stays eager.
        return not has_sharded_parameters(self) and super()._valid_auto_compile_criteria(
            model_kwargs, generation_config
        )

    def create_masks_for_generate(
        self, config, inputs_embeds: torch.Tensor, attention_mask, is_first_iteration: bool = False, **kwargs
    ):
        """The attention mask `generate` passes with a compileable cache: a decoding step gets only its own
        column, since positions come from the cache. Every step then has the same shapes, and the compiled step
        compiles once. The prefill's mask is passed whole, for the model to check it against a cache passed in."""
        if is_first_iteration or attention_mask is None or attention_mask.dim() != 2 or inputs_embeds.shape[1] != 1:
            return attention_mask
        return attention_mask[:, -1:].contiguous()  # a view's row stride would grow with every step


class BlockStateForCausalLM(OwnCacheGenerationMixin, BlockStatePreTrainedModel, GenerationMixin):
    cache_class = BlockStateCache
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BlockStateConfig) -> None:
        super().__init__(config)
        self.model = BlockStateModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: BlockStateCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> BlockStateCausalLMOutput | tuple:
        r"""
        cache ([`BlockStateCache`], *optional*):
            The block and SSM states to continue from; updated in place. `past_key_values` is accepted as an alias.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside the loss); -100 is ignored.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits only for the last `logits_to_keep` positions (0: all), or for the given indices.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = cache_argument(cache, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = BlockStateCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: outputs.cache}
        )
        return output if return_dict else output.to_tuple()

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """transformers' [`GenerationMixin.generate`], which refuses an empty prompt up front."""
        check_prompt(inputs, kwargs)
        return super().generate(inputs, *args, **kwargs)


__all__ = ["BlockStatePreTrainedModel", "BlockStateModel", "BlockStateForCausalLM"]
