"""TTT language models: TTT-Linear and TTT-MLP layers (arXiv 2407.04620) in the transformers API.

Numerically this follows the official ttt-lm-pytorch code (which the released checkpoints were trained
with), and fixes its known defects: padding is honoured, any number of tokens can be appended at any
offset, bf16/fp16 models keep the inner state in fp32.
"""

from __future__ import annotations

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

from .cache_ttt import TTTCache, TTTLayerCache, check_architecture, store
from .configuration_ttt import TTTConfig
from .tensor_parallel import grad_all_reduce, has_sharded_parameters, local, sharded_layer_norm, tp_group
from .ttt_ops import (
    at_least_fp32,
    causal_conv1d_banks,
    check_kernel_backend,
    learning_rate_logits,
    rms_norm,
    ttt_chunk,
    ttt_step,
)

logger = logging.get_logger(__name__)

# LoRA's default targets (`LoraConfig()` without target_modules), registered with PEFT when this file loads, in
# the package or next to a checkpoint under trust_remote_code, so that PEFT finds them without `import ttt_hf`.
# Every linear layer of the blocks, not transformers' q/v habit: here q and v reach the output only through the
# inner loop (v is merely its regression target), so adapters on them alone barely move the loss, while the
# output, gate and MLP projections act on it directly (README, "Fine-tuning with PEFT").
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"]
try:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError:
    pass
else:
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(TTTConfig.model_type, LORA_TARGET_MODULES)

# transformers >= 5.24 names the cache `cache` in `forward`, `generate` and model outputs; earlier releases name it
# `past_key_values`. The models take both and return it under the running release's name.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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


def with_cache_alias(output_class: type) -> type:
    """Makes `output.cache` readable on releases whose outputs name the cache `past_key_values` only (newer ones
    read the old name themselves)."""
    if CACHE_NAME != "cache":
        output_class.cache = property(lambda output: output.past_key_values)
    return output_class


def check_prompt(inputs: torch.Tensor | None, kwargs: dict) -> None:
    """`generate`'s prompt holds a token per row: transformers would fail on an empty one deep inside."""
    prompt = next((x for x in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if x is not None), None)
    if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 and prompt.shape[1] == 0:
        raise ValueError(
            f"generate needs a prompt of at least one token per row, got shape {tuple(prompt.shape)}: start from "
            "the BOS token (or pass no prompt: generate then starts from config.bos_token_id)"
        )


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


@with_cache_alias
@dataclass
class TTTModelOutput(BaseModelOutputWithPast):
    """[`TTTModel`]'s output: `BaseModelOutputWithPast` whose `cache` is a [`TTTCache`]."""


@with_cache_alias
@dataclass
class TTTCausalLMOutput(CausalLMOutputWithPast):
    """[`TTTForCausalLM`]'s output: `CausalLMOutputWithPast` whose `cache` is a [`TTTCache`]."""


@dataclass
class TTTTokenPositions:
    """Where the tokens of one forward call sit. Rows are packed to the left (right padding only).

    start: [B] absolute position of each row's first token; length: [B] real tokens per row;
    position: [B, T] absolute position of every slot (meaningful for the first `length[r]` slots);
    rope: cos and sin [B, 1, T, f/2] (fp32) of RoPE's angles at each slot's position inside its mini-batch,
    shared by every layer;
    aligned: known on the host that every row starts at position 0 and is full (training, a first prefill
    without padding), so the TTT layers need not read start and length back from the device.
    """

    start: torch.Tensor
    length: torch.Tensor
    position: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    aligned: bool = False


class TTTRMSNorm(nn.Module):
    """Llama's RMSNorm (`ttt_ops.rms_norm_reference`), through the config's kernel backend."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.variance_epsilon = config.rms_norm_eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.config.kernel_backend)


class TTTMLP(nn.Module):
    """SwiGLU feed-forward block: down(act(gate(x)) * up(x))."""

    def __init__(self, config: TTTConfig) -> None:
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


def _depthwise_conv(config: TTTConfig) -> nn.Conv1d:
    return nn.Conv1d(config.hidden_size, config.hidden_size, config.conv_kernel, groups=config.hidden_size, bias=True)


class TTTPreConv(nn.Module):
    """Mamba backbone: `RMSNorm -> causal depthwise conv`, added to the residual stream before the TTT block."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        self.norm = TTTRMSNorm(config)
        self.conv = _depthwise_conv(config)
        self.config = config

    def forward(self, hidden_states, layout: TTTTokenPositions, cache: TTTLayerCache | None = None) -> torch.Tensor:
        x = self.norm(hidden_states)
        state = cache.pre_conv_state if cache is not None else None
        (y,), state = causal_conv1d_banks(
            x,
            [(self.conv.weight, self.conv.bias)],
            _conv_state(state, x, self.conv),
            layout.length,
            self.config.kernel_backend,
            keep_state=cache is not None,
        )
        if cache is not None:
            cache.pre_conv_state = store(cache.pre_conv_state, state)
        return y


def _conv_state(state: torch.Tensor | None, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    if state is not None:
        return state
    return x.new_zeros(x.shape[0], conv.kernel_size[0] - 1, x.shape[-1])


def rope_angles(
    position: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, f/2] in `dtype` of RoPE's angles at `position` [B, T]."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position.device).float()
    inv_freq = 1.0 / (theta ** (dims / head_dim))
    angle = position.float()[:, None, :, None] * inv_freq
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1).flatten(-2)


class InterleavedRope(torch.autograd.Function):
    """RoPE with interleaved pairs (dims 2i, 2i+1), as the official JAX code: x [B, H, T, f] rotated by the
    angles of `rope_angles`. Its gradient is the inverse rotation, written out: autograd through the strided
    slices would add a zero-filled buffer per slice and twice the products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate_pairs(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_pairs(grad, cos, -sin), None, None


class TTTLayer(nn.Module):
    """The TTT sequence-modeling block: the hidden state is a small model (linear, or a 2-layer MLP) trained
    by one gradient step per mini-batch on a self-supervised reconstruction loss, `v - k` from `k`.

    Parameters (official names): `W1, b1, (W2, b2)` the inner model's initial weights per head;
    `ttt_norm_weight/bias` the per-head LayerNorm of the inner model; `learnable_ttt_lr_weight/bias` the
    per-token learning-rate gate; `learnable_token_idx` the learnable offset of the per-position factor.
    """

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__()
        check_kernel_backend(config.kernel_backend)
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.mini_batch_size = config.mini_batch_size
        self.share_qk = config.share_qk
        self.use_gate = config.use_gate

        width = self.hidden_size
        self.q_proj = nn.Linear(width, width, bias=False)
        if self.share_qk:
            self.conv_q = _depthwise_conv(config)
            self.conv_k = _depthwise_conv(config)
        else:
            self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        if self.use_gate:
            self.g_proj = nn.Linear(width, width, bias=False)
        self.post_norm = nn.LayerNorm(width, eps=1e-6)

        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(self.num_heads, 1, width))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.empty(self.num_heads, 1))
        self.learnable_token_idx = nn.Parameter(torch.empty(self.mini_batch_size))
        self.ttt_norm_weight = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.ttt_norm_bias = nn.Parameter(torch.empty(self.num_heads, self.head_dim))

        f = self.head_dim
        inner_width = 4 * f if config.ttt_layer_type == "mlp" else f
        self.W1 = nn.Parameter(torch.empty(self.num_heads, f, inner_width))
        self.b1 = nn.Parameter(torch.empty(self.num_heads, 1, inner_width))
        if config.ttt_layer_type == "mlp":
            self.W2 = nn.Parameter(torch.empty(self.num_heads, inner_width, f))
            self.b2 = nn.Parameter(torch.empty(self.num_heads, 1, f))

    @property
    def inner_parameters(self) -> list[nn.Parameter]:
        """The inner model's initial state `[W1, b1, (W2, b2)]`, each [H, ...]."""
        names = ("W1", "b1", "W2", "b2") if self.config.ttt_layer_type == "mlp" else ("W1", "b1")
        return [getattr(self, name) for name in names]

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)  # [B, H, T, f] (H: this rank's heads)

    def forward(
        self, hidden_states: torch.Tensor, layout: TTTTokenPositions, cache: TTTLayerCache | None = None
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        group = tp_group(self.W1)  # heads split over this group (tensor parallelism), else None
        if self.share_qk:
            shared = self.q_proj(hidden_states)
            state = _conv_state(cache.qk_conv_state if cache is not None else None, shared, self.conv_q)
            (xq, xk), state = causal_conv1d_banks(
                shared,
                [(local(conv.weight), local(conv.bias)) for conv in (self.conv_q, self.conv_k)],
                state,
                layout.length,
                self.config.kernel_backend,
                keep_state=cache is not None,
            )
            if cache is not None:
                cache.qk_conv_state = store(cache.qk_conv_state, state)
        else:
            xq, xk = self.q_proj(hidden_states), self.k_proj(hidden_states)
        xv = self.v_proj(hidden_states)

        cos, sin = (t.to(xq.dtype) for t in layout.rope)
        xq = InterleavedRope.apply(self._split_heads(xq), cos, sin)
        xk = InterleavedRope.apply(self._split_heads(xk), cos, sin)
        xv = self._split_heads(xv)

        # Per-token inner learning rate [B, H, T] and per-position factor tau [b], in fp32. Under tensor
        # parallelism the replicated inputs get only this rank's heads' gradient here: summed over the ranks.
        lr_logits = learning_rate_logits(
            grad_all_reduce(hidden_states, group),
            local(self.learnable_ttt_lr_weight).squeeze(1),
            local(self.learnable_ttt_lr_bias),
        )
        lr = self.config.ttt_base_lr * torch.sigmoid(lr_logits) / self.head_dim
        positions = torch.arange(1, self.mini_batch_size + 1, device=hidden_states.device)
        token_idx = grad_all_reduce(self.learnable_token_idx, group)
        tau = torch.clamp_min(1.0 / positions + at_least_fp32(token_idx), 0.0)

        state_in_cache = cache is not None and cache.ttt_state is not None
        if state_in_cache:
            state, acc = cache.ttt_state, cache.ttt_acc
        else:
            initial = [local(p) for p in self.inner_parameters]
            state = [at_least_fp32(p).unsqueeze(0).expand(batch, *p.shape) for p in initial]
            acc = [torch.zeros_like(s) for s in state]
        ln_weight = at_least_fp32(local(self.ttt_norm_weight)).unsqueeze(1)  # [H, 1, f]
        ln_bias = at_least_fp32(local(self.ttt_norm_bias)).unsqueeze(1)
        backend = self.config.kernel_backend

        if cache is not None and seq_len == 1:
            out, state, acc = ttt_step(
                state,
                acc,
                xq[:, :, 0],
                xk[:, :, 0],
                xv[:, :, 0],
                lr[:, :, 0],
                tau,
                ln_weight,
                ln_bias,
                layout.start,
                layout.length > 0,
                kernel_backend=backend,
                state_in_cache=state_in_cache,
            )
            out = out[:, :, None]
        else:
            out, state, acc = ttt_chunk(
                state,
                acc,
                xq,
                xk,
                xv,
                lr,
                tau,
                ln_weight,
                ln_bias,
                layout.start,
                layout.length,
                checkpoint_group=self.config.scan_checkpoint_group_size,
                aligned=layout.aligned,
                kernel_backend=backend,
            )
        if cache is not None:
            cache.store_state(state, acc)

        out = out.transpose(1, 2).reshape(batch, seq_len, -1).to(hidden_states.dtype)
        if not self.use_gate:
            return self.o_proj(self._post_norm(out, group))
        gate = self.g_proj(hidden_states)
        if torch.is_grad_enabled() and (out.requires_grad or gate.requires_grad):
            # Recomputed in the backward from its two inputs: the normalised output and the gate's activation, 4
            # bytes per token and channel, are not kept.
            return self.o_proj(checkpoint(self._gated_post_norm, out, gate, group, use_reentrant=False))
        return self.o_proj(self._gated_post_norm(out, gate, group))

    def _post_norm(self, out: torch.Tensor, group) -> torch.Tensor:
        if group is None:
            return self.post_norm(out)
        norm = self.post_norm  # this rank's heads' slice of a LayerNorm over all heads
        return sharded_layer_norm(out, local(norm.weight), local(norm.bias), norm.eps, self.hidden_size, group)

    def _gated_post_norm(self, out: torch.Tensor, gate: torch.Tensor, group) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") * self._post_norm(out, group)


class TTTDecoderLayer(GradientCheckpointingLayer):
    """`[h += pre_conv(h)]; h += TTT(norm(h)); h += MLP(norm(h))`."""

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.pre_conv = TTTPreConv(config) if config.pre_conv else None
        self.seq_norm = TTTRMSNorm(config)
        self.ttt = TTTLayer(config, layer_idx)
        self.ffn_norm = TTTRMSNorm(config)
        self.mlp = TTTMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, layout: TTTTokenPositions, cache: TTTCache | None = None
    ) -> torch.Tensor:
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        if self.pre_conv is not None:
            hidden_states = hidden_states + self.pre_conv(hidden_states, layout, layer_cache)
        hidden_states = hidden_states + self.ttt(self.seq_norm(hidden_states), layout, layer_cache)
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


class TTTPreTrainedModel(PreTrainedModel):
    config_class = TTTConfig
    config: TTTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TTTDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            if isinstance(module, nn.Linear):
                init.normal_(module.weight, mean=0.0, std=std)
            else:
                # PyTorch's default Conv1d init, as in the official code.
                init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                if isinstance(module, nn.Conv1d):
                    bound = 1.0 / (module.weight.shape[1] * module.weight.shape[2]) ** 0.5
                    init.uniform_(module.bias, -bound, bound)
                else:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (TTTRMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TTTLayer):
            init.normal_(module.learnable_ttt_lr_weight, mean=0.0, std=0.02)
            init.zeros_(module.learnable_ttt_lr_bias)
            init.zeros_(module.learnable_token_idx)
            init.ones_(module.ttt_norm_weight)
            init.zeros_(module.ttt_norm_bias)
            for weight, bias in zip(module.inner_parameters[0::2], module.inner_parameters[1::2]):
                init.normal_(weight, mean=0.0, std=0.02)
                init.zeros_(bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # One folder serves AutoModel and AutoModelForCausalLM under trust_remote_code.
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_ttt.TTTModel",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Generation uses the model's own recurrent TTTCache (`OwnCacheGenerationMixin._prepare_cache_for_generation`).
        return False


class TTTModel(TTTPreTrainedModel):
    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([TTTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TTTRMSNorm(config)
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
        cache: TTTCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TTTModelOutput | tuple:
        r"""
        cache ([`TTTCache`], *optional*):
            The recurrent state to continue from; updated in place. `past_key_values` is accepted as an alias.
        """
        cache = cache_argument(cache, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "position_ids is not supported by TTT models: positions come from attention_mask and the cache "
                "(pass attention_mask with 0 at padding)"
            )
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported: TTT layers compute no attention weights")
        check_inputs(
            self.config,
            input_ids,
            inputs_embeds,
            self.embed_tokens.weight.dtype,
            attention_mask,
            cache if isinstance(cache, TTTCache) else None,
        )
        if cache is not None and not isinstance(cache, TTTCache):
            raise TypeError(
                f"cache must be a TTTCache (TTT models keep a recurrent state, not key/values), "
                f"got {type(cache).__name__}"
            )
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
            cache = TTTCache(self.config)

        batch, seq_len, _ = inputs_embeds.shape
        device = inputs_embeds.device
        mask = self._token_mask(attention_mask, seq_len, device)
        fresh = cache is None or cache.positions is None
        start = torch.zeros(batch, dtype=torch.long, device=device) if fresh else cache.row_positions(batch, device)
        # Padding can sit anywhere: move each row's real tokens to the front, run, then put them back.
        order = None
        if mask is None:
            length = torch.full((batch,), seq_len, dtype=torch.long, device=device)
        else:
            length = mask.sum(-1)
            # One column needs no reordering: skipping the test keeps a decoding step free of host syncs.
            if seq_len > 1 and not bool(mask.all()):
                order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # [B, T]
                inputs_embeds = torch.gather(inputs_embeds, 1, order[..., None].expand_as(inputs_embeds))
                # Padding now fills each row's tail. Mini-batch sums weigh it by zero, which would turn a NaN or
                # inf there into NaN everywhere: replace it by zeros instead.
                real = torch.arange(seq_len, device=device)[None, :] < length[:, None]
                inputs_embeds = inputs_embeds.masked_fill(~real[..., None], 0.0)
        position = start[:, None] + torch.arange(seq_len, device=device)[None, :]
        # RoPE encodes the position inside the mini-batch only.
        rope = rope_angles(
            position % self.config.mini_batch_size, self.config.head_dim, self.config.rope_theta, torch.float32
        )
        layout = TTTTokenPositions(
            start=start, length=length, position=position, rope=rope, aligned=fresh and order is None
        )

        hidden_states = inputs_embeds
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, layout, cache=cache)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states

        if order is not None:
            inverse = torch.argsort(order, dim=1)[..., None]
            hidden_states = torch.gather(hidden_states, 1, inverse.expand_as(hidden_states))
            if output_hidden_states:
                all_hidden_states = [torch.gather(h, 1, inverse.expand_as(h)) for h in all_hidden_states]
        if cache is not None:
            cache.advance(seq_len, length)

        output = TTTModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **{CACHE_NAME: cache},
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _token_mask(attention_mask, seq_len: int, device) -> torch.Tensor | None:
        """[B, T] bool of real tokens: the last columns of a 2-D mask (checked by `check_inputs`)."""
        if attention_mask is None:
            return None
        return attention_mask[:, -seq_len:].to(device) != 0


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


class TTTForCausalLM(OwnCacheGenerationMixin, TTTPreTrainedModel, GenerationMixin):
    cache_class = TTTCache
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.model = TTTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: TTTCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> TTTCausalLMOutput | tuple:
        r"""
        cache ([`TTTCache`], *optional*):
            The recurrent state to continue from; updated in place. `past_key_values` is accepted as an alias.
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

        output = TTTCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: outputs.cache}
        )
        return output if return_dict else output.to_tuple()

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """transformers' [`GenerationMixin.generate`], which refuses an empty prompt up front."""
        check_prompt(inputs, kwargs)
        return super().generate(inputs, *args, **kwargs)


__all__ = ["TTTPreTrainedModel", "TTTModel", "TTTForCausalLM"]
