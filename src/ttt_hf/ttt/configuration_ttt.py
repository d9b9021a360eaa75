"""Configuration of TTT language models (TTT-Linear and TTT-MLP, Mamba or Transformer backbone).

Field names follow the official ttt-lm-pytorch `TTTConfig`, so an official `config.json` loads as is.
"""

import math

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

TTT_LAYER_TYPES = ("linear", "mlp")
KERNEL_BACKENDS = ("auto", "triton", "torch")


class TTTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`TTTModel`] / [`TTTForCausalLM`].

    The defaults describe the 1.3B model of the paper (arXiv 2407.04620) with the Transformer backbone.
    The paper's default "Mamba backbone" sets `pre_conv=True`, `share_qk=True` and `use_gate=True`.

    Args:
        vocab_size (`int`, defaults to 32000): size of the vocabulary.
        hidden_size (`int`, defaults to 2048): width `d` of the residual stream.
        intermediate_size (`int`, defaults to 5504): width of the SwiGLU feed-forward block.
        num_hidden_layers (`int`, defaults to 24): number of blocks.
        num_attention_heads (`int`, defaults to 32): number of TTT heads; `head_dim = hidden_size / heads`.
        hidden_act (`str`, defaults to `"silu"`): activation of the feed-forward block.
        max_position_embeddings (`int`, defaults to 2048): context length the model was trained at
            (informative only: TTT has no positional limit, RoPE runs on positions modulo the mini-batch).
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the RMSNorms.
        use_cache (`bool`, defaults to `True`): return a [`TTTCache`] from `forward`.
        tie_word_embeddings (`bool`, defaults to `True`): tie `lm_head` to the input embedding.
        rope_theta (`float`, defaults to 10000.0): RoPE base.
        ttt_layer_type (`str`, defaults to `"linear"`): `"linear"` (TTT-Linear) or `"mlp"` (TTT-MLP).
        ttt_base_lr (`float`, defaults to 1.0): base inner learning rate (the paper uses 0.1 for TTT-MLP).
        mini_batch_size (`int`, defaults to 16): inner-loop mini-batch size `b`.
        pre_conv (`bool`, defaults to `False`): Mamba backbone: causal depthwise conv before each TTT block.
        share_qk (`bool`, defaults to `False`): Mamba backbone: one Q/K projection followed by two causal convs.
        use_gate (`bool`, defaults to `False`): Mamba backbone: gelu-gated output.
        conv_kernel (`int`, defaults to 4): width of the causal convolutions.
        scan_checkpoint_group_size (`int`, defaults to 0): when training, the backward pass recomputes the inner
            loop in groups of this many mini-batches from the inner state kept at each group's start, on the
            Triton kernels and the torch reference alike (0: groups of 16). 1 keeps every mini-batch's start
            state: TTT-Linear's kernels then skip the recomputation, faster at (f^2 + f) floats in bf16 or fp32
            and b f fp32 per mini-batch and head.
        kernel_backend (`str`, defaults to `"auto"`): `"auto"` (Triton on CUDA when available, else PyTorch),
            `"triton"` or `"torch"`.
    """

    model_type = "ttt"
    # Tensor parallelism: each rank holds whole heads (their projections, inner state, norms and gate) and a
    # slice of the feed-forward block; the rest is replicated (see tensor_parallel.py).
    base_model_tp_plan = {
        "layers.*.ttt.q_proj": "colwise",
        "layers.*.ttt.k_proj": "colwise",
        "layers.*.ttt.v_proj": "colwise",
        "layers.*.ttt.g_proj": "colwise",
        "layers.*.ttt.conv_q": "ttt_hf_head_shard",
        "layers.*.ttt.conv_k": "ttt_hf_head_shard",
        "layers.*.ttt.learnable_ttt_lr_weight": "ttt_hf_head_shard",
        "layers.*.ttt.learnable_ttt_lr_bias": "ttt_hf_head_shard",
        "layers.*.ttt.ttt_norm_weight": "ttt_hf_head_shard",
        "layers.*.ttt.ttt_norm_bias": "ttt_hf_head_shard",
        "layers.*.ttt.W1": "ttt_hf_head_shard",
        "layers.*.ttt.b1": "ttt_hf_head_shard",
        "layers.*.ttt.W2": "ttt_hf_head_shard",
        "layers.*.ttt.b2": "ttt_hf_head_shard",
        "layers.*.ttt.post_norm": "ttt_hf_head_shard",
        "layers.*.ttt.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5504,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = True,
        rope_theta: float = 10000.0,
        ttt_layer_type: str = "linear",
        ttt_base_lr: float = 1.0,
        mini_batch_size: int = 16,
        pre_conv: bool = False,
        share_qk: bool = False,
        use_gate: bool = False,
        conv_kernel: int = 4,
        scan_checkpoint_group_size: int = 0,
        kernel_backend: str = "auto",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.ttt_layer_type = ttt_layer_type
        self.ttt_base_lr = ttt_base_lr
        self.mini_batch_size = mini_batch_size
        self.pre_conv = pre_conv
        self.share_qk = share_qk
        self.use_gate = use_gate
        self.conv_kernel = conv_kernel
        self.scan_checkpoint_group_size = scan_checkpoint_group_size
        self.kernel_backend = kernel_backend
        # ttt-lm-pytorch's tensor-parallel emulation: only the plain layout exists here.
        if kwargs.pop("pretraining_tp", 1) != 1:
            raise ValueError("pretraining_tp: only 1 is supported (the official configs all use 1)")
        self._validate()
        self.base_model_tp_plan = self._tensor_parallel_plan()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _tensor_parallel_plan(self) -> dict[str, str]:
        """The class's plan less the modules this configuration does not build (transformers warns about every
        rule that matches nothing)."""
        absent = {"W2", "b2"} if self.ttt_layer_type != "mlp" else set()
        absent |= {"k_proj"} if self.share_qk else {"conv_q", "conv_k"}
        absent |= set() if self.use_gate else {"g_proj"}
        return {key: style for key, style in type(self).base_model_tp_plan.items() if key.split(".")[-1] not in absent}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "mini_batch_size",
            "conv_kernel",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"hidden_size / num_attention_heads must be even for RoPE, got head_dim={self.head_dim}")
        if self.ttt_layer_type not in TTT_LAYER_TYPES:
            raise ValueError(f"ttt_layer_type must be one of {TTT_LAYER_TYPES}, got {self.ttt_layer_type!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        for name in ("pre_conv", "share_qk", "use_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("ttt_base_lr", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act must be one of transformers' activations {sorted(ACT2FN)}, got {self.hidden_act!r}"
            )
        group = self.scan_checkpoint_group_size
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ValueError(f"scan_checkpoint_group_size must be an integer >= 0, got {group!r}")


__all__ = ["TTTConfig"]
