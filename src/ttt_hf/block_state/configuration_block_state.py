"""Configuration of Block-State Transformer language models (arXiv 2306.09539)."""

import math

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

CONTEXT_MODES = ("sh", "mh", "mf")
SSM_KINDS = ("s4d", "implicit")
KERNEL_BACKENDS = ("auto", "triton", "torch")


class BlockStateConfig(PreTrainedConfig):
    r"""
    Configuration of a [`BlockStateModel`] / [`BlockStateForCausalLM`].

    Each layer: `h = RMSNorm(x); y = SSM(h); x += W_o(concat(SelfAttn_in_block(h), CrossAttn(h -> ctx(y))))`,
    then a SwiGLU feed-forward block. Defaults: the paper's ~200M setting (12 layers, D=1024, 8 heads,
    W=512, N=16, single-head context).

    Args:
        vocab_size (`int`, defaults to 32000), hidden_size (`int`, defaults to 1024),
        intermediate_size (`int`, defaults to 2736: the parameters of BRECT's 4096-wide plain FFN),
        num_hidden_layers (`int`, defaults to 12),
        num_attention_heads (`int`, defaults to 8): the usual sizes. Self- and cross-attention each use
            `num_attention_heads` heads of `hidden_size / num_attention_heads`.
        block_size (`int`, defaults to 512): W, the block (window) length of the attention.
        attend_previous_block (`bool`, defaults to `False`): self-attention also sees the previous block's keys.
        context_mode (`str`, defaults to `"sh"`): `"sh"` single-head (one SSM filter per feature, context =
            the SSM outputs at the block's positions), `"mh"` multi-head (one filter per head), `"mf"`
            multi-filter (S filters, context = their outputs at the end of the previous block).
        ssm_kind (`str`, defaults to `"s4d"`): `"s4d"` (diagonal state space, finite state) or `"implicit"`
            (an MLP-parameterised long filter; decoding keeps the input history).
        ssm_state_size (`int`, defaults to 16): N; S4D uses N/2 complex modes.
        num_context_states (`int`, defaults to 32): S, the number of MF context states.
        ssm_layers (`list[int]`, *optional*): layers that compute an SSM (default: all); the others are
            plain block-attention layers.
        ssm_filter_max_len (`int`, defaults to 4096): implicit filter: lags are measured in units of this
            length (a fixed scale, so the filter does not stretch with the input length).
        ssm_filter_hidden (`int`, defaults to 64), ssm_filter_features (`int`, defaults to 16): implicit
            filter MLP width and number of sine/cosine position features.
        max_position_embeddings (`int`, defaults to 4096): training length (informative: nothing limits it).
        rope_theta (`float`, defaults to 10000.0), rms_norm_eps (`float`, defaults to 1e-6),
        initializer_range (`float`, defaults to 0.02), hidden_act (`str`, defaults to `"silu"`),
        tie_word_embeddings (`bool`, defaults to `True`), use_cache (`bool`, defaults to `True`).
        kernel_backend (`str`, defaults to `"auto"`): Triton fast paths (the S4D scan, the rotary pass, the
            fused decode step, the S4D kernel generation): `"auto"` on CUDA, the torch reference elsewhere;
            `"triton"` forces them (on CPU under `TRITON_INTERPRET=1`); `"torch"` always runs the reference.
    """

    model_type = "block_state"
    # Tensor parallelism: each rank holds whole heads (self- and cross-attention) and a slice of the feed-forward
    # block; the SSM is replicated (see tensor_parallel.py).
    base_model_tp_plan = {
        "layers.*.attn.q_proj": "colwise",
        "layers.*.attn.k_proj": "colwise",
        "layers.*.attn.v_proj": "colwise",
        "layers.*.attn.cross_q_proj": "colwise",
        "layers.*.attn.cross_k_proj": "ttt_hf_colwise_or_head_shard",
        "layers.*.attn.cross_v_proj": "ttt_hf_colwise_or_head_shard",
        "layers.*.attn.o_proj": "ttt_hf_grouped_rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 2736,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        block_size: int = 512,
        attend_previous_block: bool = False,
        context_mode: str = "sh",
        ssm_kind: str = "s4d",
        ssm_state_size: int = 16,
        num_context_states: int = 32,
        ssm_layers: list[int] | None = None,
        ssm_filter_max_len: int = 4096,
        ssm_filter_hidden: int = 64,
        ssm_filter_features: int = 16,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        hidden_act: str = "silu",
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = True,
        kernel_backend: str = "auto",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.block_size = block_size
        self.attend_previous_block = attend_previous_block
        self.context_mode = context_mode
        self.ssm_kind = ssm_kind
        self.ssm_state_size = ssm_state_size
        self.num_context_states = num_context_states
        self.ssm_layers = list(range(num_hidden_layers)) if ssm_layers is None else list(ssm_layers)
        self.ssm_filter_max_len = ssm_filter_max_len
        self.ssm_filter_hidden = ssm_filter_hidden
        self.ssm_filter_features = ssm_filter_features
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        self.kernel_backend = kernel_backend
        self._validate()
        # Without SSM layers there is no cross-attention (transformers warns about every rule that matches nothing).
        self.base_model_tp_plan = {
            key: style for key, style in type(self).base_model_tp_plan.items() if self.ssm_layers or "cross" not in key
        }
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def filters_per_feature(self) -> int:
        """SSM filters per feature: 1 (SH), one per head (MH) or S (MF)."""
        return {"sh": 1, "mh": self.num_attention_heads, "mf": self.num_context_states}[self.context_mode]

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "block_size",
            "num_context_states",
            "ssm_filter_max_len",
            "ssm_filter_hidden",
            "ssm_filter_features",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        n = self.ssm_state_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
            raise ValueError(f"ssm_state_size must be an even integer >= 2 (N/2 complex modes), got {n!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"hidden_size / num_attention_heads must be even for RoPE, got {self.head_dim}")
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {self.context_mode!r}")
        if self.ssm_kind not in SSM_KINDS:
            raise ValueError(f"ssm_kind must be one of {SSM_KINDS}, got {self.ssm_kind!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if not isinstance(self.attend_previous_block, bool):
            raise ValueError(f"attend_previous_block must be True or False, got {self.attend_previous_block!r}")
        bad = [
            i
            for i in self.ssm_layers
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers
        ]
        if bad or len(set(self.ssm_layers)) != len(self.ssm_layers):
            raise ValueError(
                f"ssm_layers must be distinct layer indices in [0, {self.num_hidden_layers}), got {self.ssm_layers!r}"
            )
        value = self.initializer_range
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"initializer_range must be a finite number >= 0, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act must be one of transformers' activations {sorted(ACT2FN)}, got {self.hidden_act!r}"
            )


__all__ = ["BlockStateConfig"]
