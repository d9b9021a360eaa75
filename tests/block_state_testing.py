"""Shared helpers of the Block-State tests: tiny configs and models with non-trivial parameters."""

from __future__ import annotations

import torch
from model_testing import random_ids  # noqa: F401  (re-exported for the tests)

from ttt_hf import BlockStateConfig, BlockStateForCausalLM

VARIANTS = [
    dict(context_mode="sh"),
    dict(context_mode="mh"),
    dict(context_mode="mf"),
    dict(context_mode="sh", attend_previous_block=True),
    dict(context_mode="mf", attend_previous_block=True, ssm_layers=[1]),
    dict(context_mode="sh", ssm_kind="implicit"),
    dict(context_mode="mh", ssm_kind="implicit"),
    dict(context_mode="mf", ssm_kind="implicit"),
]
VARIANT_IDS = ["-".join(f"{k}={v}" for k, v in variant.items()) for variant in VARIANTS]


def tiny_config(**overrides) -> BlockStateConfig:
    values = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        block_size=4,
        ssm_state_size=8,
        num_context_states=3,
        ssm_filter_max_len=64,
        ssm_filter_hidden=16,
        ssm_filter_features=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return BlockStateConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> BlockStateForCausalLM:
    """A tiny model whose constant-initialised parameters are perturbed, so no term is trivial."""
    torch.manual_seed(seed)
    model = BlockStateForCausalLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "log_a_real" in name:
                param.add_(0.1 * torch.randn_like(param))
            if "log_dt" in name:
                param.add_(2.0)  # dt up to ~0.7: states decay within tens of steps, long-range terms stay visible
    return model.eval()
