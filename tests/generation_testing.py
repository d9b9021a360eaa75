"""Shared by the generation tests: tiny models of every family whose greedy tokens depend on the context, left-padded
prompts, and the definition of greedy decoding (one full forward per token, no cache)."""

from __future__ import annotations

import block_state_testing
import torch
import ttt_testing
from model_testing import left_pad, random_ids

from ttt_hf import BlockStateCache, TTTCache

FAMILIES = {
    **{
        f"ttt-{layer}-{backbone}": ("ttt", dict(layer_type=layer, backbone=backbone))
        for layer, backbone in ttt_testing.VARIANTS
    },
    **{
        f"block_state-{mode}-{kind}": ("block_state", dict(context_mode=mode, ssm_kind=kind))
        for mode in ("sh", "mh", "mf")
        for kind in ("s4d", "implicit")
    },
}
NEW_TOKENS = 7  # crosses mini-batch (TTT: 4) and block (Block-State: 4) boundaries from every prompt length
ROWS = (9, 3, 6)  # left-padded prompt lengths: different mini-batch / block offsets per row


def generation_model(family: str):
    """A tiny model whose greedy tokens depend on the context (larger embeddings, an untied, sharper lm_head; no
    EOS): with small weights a tiny model mostly repeats one token."""
    kind, variant = FAMILIES[family]
    if kind == "ttt":
        model = ttt_testing.tiny_model(variant["layer_type"], variant["backbone"], seed=3, tie_word_embeddings=False)
    else:
        model = block_state_testing.tiny_model(seed=3, tie_word_embeddings=False, **variant)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
        model.lm_head.weight.mul_(10.0)
    model.generation_config.eos_token_id = None
    return model


def new_cache(model):
    return (TTTCache if model.config.model_type == "ttt" else BlockStateCache)(model.config)


def padded_prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([random_ids(1, n, seed=seed + n)[0] for n in ROWS], max(ROWS))


def greedy_without_cache(model, ids, mask, steps: int) -> torch.Tensor:
    """The definition: one full forward per new token, no cache anywhere."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids
