"""Shared by the TOVA tests: the official implementation's greedy generations (tests/fixtures/tova)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from model_testing import cache_arg
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_hf import TOVACache

FIXTURES = Path(__file__).parent / "fixtures" / "tova"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())

# A tiny decoder's config fields, shared by every family the TOVA tests build (grouped-query attention: 4 / 2 heads).
SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
    max_position_embeddings=512,
)


def official_generation(case: str, attn_implementation: str = "sdpa", device: str = "cpu", **cache_kwargs):
    """Greedy generation of a fixture case with a TOVACache of the case's budget, as the official code ran it.
    Returns (generated tokens on CPU, the fixture's data, the cache)."""
    folder = FIXTURES / case
    meta = json.loads((folder / "meta.json").read_text())
    config = LlamaConfig.from_json_file(str(folder / "config.json"))
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    data = load_file(folder / "data.safetensors")
    cache = TOVACache(meta["N_cache_size"], **cache_kwargs)
    out = model.to(device).generate(
        data["input_ids"].to(device),
        **cache_arg(cache),
        max_new_tokens=meta["K_new_tokens"],
        do_sample=False,
        eos_token_id=None,
    )
    return out.cpu(), data, cache


def assert_kept_positions(cache: TOVACache, data: dict) -> None:
    """The positions each layer holds at the end equal the official cache's."""
    for i in range(len(cache.layers)):
        assert torch.equal(cache.kept_positions(i)[0].sort().values.cpu(), data[f"kept_positions_layer{i}"])
