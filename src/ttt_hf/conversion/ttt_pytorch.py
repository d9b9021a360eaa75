"""ttt-lm-pytorch checkpoint folder (config.json + model.safetensors) -> ttt_hf checkpoint folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..ttt.configuration_ttt import TTTConfig
from .common import load_tokenizer, save_converted

# Official module names -> ours; every other name is the same in both.
_RENAMES = [
    (re.compile(r"^model\.layers\.(\d+)\.seq_modeling_block\."), r"model.layers.\1.ttt."),
    (re.compile(r"^model\.layers\.(\d+)\.conv\."), r"model.layers.\1.pre_conv."),
]


def official_to_ttt_hf_key(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _load_official_weights(src: Path) -> dict[str, torch.Tensor]:
    single = src / "model.safetensors"
    index = src / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            for key, value in load_file(src / shard).items():
                if key in weights:
                    raise ValueError(f"cannot convert this checkpoint: {key} appears in two shards (again in {shard})")
                weights[key] = value
        return weights
    raise FileNotFoundError(f"{src} has neither model.safetensors nor model.safetensors.index.json")


def convert_ttt_pytorch(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
) -> Path:
    """Converts a ttt-lm-pytorch checkpoint folder into a ttt_hf folder that `AutoModelForCausalLM` loads.

    Refuses unknown, missing or mis-shaped keys (naming them). The output appears only when complete.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src / 'config.json'} not found")
    tokenizer_to_save = load_tokenizer(tokenizer)
    config = TTTConfig.from_json_file(str(src / "config.json"))
    config.use_cache = True
    config.architectures = ["TTTForCausalLM"]

    official = _load_official_weights(src)
    if config.tie_word_embeddings and "lm_head.weight" in official:
        # The official state dict stores the tied head as a copy of the embedding.
        head = official.pop("lm_head.weight")
        embedding = official.get("model.embed_tokens.weight")
        if embedding is not None and not torch.equal(head, embedding):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    weights = {official_to_ttt_hf_key(k): v for k, v in official.items()}
    sources = {official_to_ttt_hf_key(k): k for k in official}

    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    return save_converted(config, weights, sources, dst, overwrite=overwrite, tokenizer=tokenizer_to_save)
