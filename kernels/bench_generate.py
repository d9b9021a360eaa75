"""Decoding through plain `model.generate` on the GPU: what a user gets without writing any CUDA-graph code.

Random-weight models in bf16, greedy decoding of `--new` tokens (`min_new_tokens` set, so every row decodes them
all) after a random prompt. Per model and setting:
  decode tokens/s  batch x (new - 1) / (time of generate(new) - time of generate(1)): the prefill excluded;
  prefill s        time of generate(1): the prompt's forward and one token;
  first call s     the first generate(new) of the setting less a later one: compilation and CUDA-graph recording;
  graphs           the graphs torch.compile made for the setting (0: nothing was compiled);
  captures         CUDA graphs recorded during the timed calls (0 expected: a recording there is timed as decoding);
  cudagraph skips  compiled graphs that inductor ran without CUDA graphs (in the JSON; 0 expected).
The JSON also keeps every timed call's seconds.
TTT and Block-State models run plain `generate` (its decoding step compiled and replayed as a CUDA graph,
transformers' automatic compilation) and with `disable_compile=True` (eager steps); the same-size Llama (SDPA) runs with
HF's DynamicCache (eager) and with `cache_implementation="static"` (compiled the same way); a 1.1B Llama
(TinyLlama's shape) also with `cache=TOVACache(4096)`, compiled and eager.

    python kernels/bench_generate.py [--models ttt-125m-linear,ttt-125m-mlp,llama-125m] [--batches 1,16]
        [--prompts 512] [--new 256] [--out generate.json]

Prints a markdown table and writes kernels/results/<out> and a bar chart of the decode tokens/s beside it (.png),
also into $OUT when it is set.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from bench_common import ROOT, pyplot, result_paths, save_results, ttt_model
from bench_ttt_model import llama_like
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_hf import BlockStateConfig, BlockStateForCausalLM, TOVACache, TTTConfig

TOVA_BUDGET = 4096
# mode -> what `generate` is given besides the prompt (a function: a cache is made fresh for each call)
RECURRENT_MODES = {"generate (compiled)": dict, "generate, disable_compile": lambda: {"disable_compile": True}}
LLAMA_MODES = {
    "DynamicCache": dict,
    'cache_implementation="static" (compiled)': lambda: {"cache_implementation": "static"},
}
TOVA_MODES = {
    **LLAMA_MODES,
    f"TOVACache({TOVA_BUDGET}) (compiled)": lambda: {"cache": TOVACache(TOVA_BUDGET)},
    f"TOVACache({TOVA_BUDGET}), disable_compile": lambda: {"cache": TOVACache(TOVA_BUDGET), "disable_compile": True},
}


def ttt_config(name: str) -> TTTConfig:
    return TTTConfig.from_json_file(ROOT / "configs" / f"{name}.json")


def block_state_200m(dtype: torch.dtype) -> BlockStateForCausalLM:
    """A random Block-State-SH 200M (configs/block-state-200m-sh.json: S4D filters, Triton kernels)."""
    config = BlockStateConfig.from_json_file(ROOT / "configs" / "block-state-200m-sh.json")
    config.max_position_embeddings = 1 << 16  # informative only; keeps generate from warning at long prompts
    torch.manual_seed(0)
    return BlockStateForCausalLM(config).to("cuda", dtype)


def llama_like_block_state_200m(dtype: torch.dtype) -> LlamaForCausalLM:
    """A Llama of Block-State-SH 200M's width, depth, heads and vocabulary; an FFN of 4096 matches its parameter
    count (the Block-State layers' cross-attention weights), as in bench_block_state.py."""
    block_state = BlockStateConfig.from_json_file(ROOT / "configs" / "block-state-200m-sh.json")
    return llama_like(block_state, dtype, intermediate_size=4096)


def tinyllama_shaped(dtype: torch.dtype) -> LlamaForCausalLM:
    """A random 1.1B Llama of TinyLlama's shape (22 layers, 2048 wide, 32 query / 4 KV heads), SDPA."""
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=1 << 16,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", dtype)


# name -> (the model in bf16, its modes)
MODELS = {
    "ttt-125m-linear": (lambda dtype: ttt_model("ttt-125m-linear-mamba", "auto", dtype), RECURRENT_MODES),
    "ttt-125m-mlp": (lambda dtype: ttt_model("ttt-125m-mlp-mamba", "auto", dtype), RECURRENT_MODES),
    "ttt-1.3b-linear": (lambda dtype: ttt_model("ttt-1.3b-linear-mamba", "auto", dtype), RECURRENT_MODES),
    "llama-125m": (lambda dtype: llama_like(ttt_config("ttt-125m-linear-mamba"), dtype), LLAMA_MODES),
    "llama-1.3b": (lambda dtype: llama_like(ttt_config("ttt-1.3b-linear-mamba"), dtype), LLAMA_MODES),
    "block-state-200m-sh": (block_state_200m, RECURRENT_MODES),
    "llama-200m": (llama_like_block_state_200m, LLAMA_MODES),
    "llama-1.1b-tova": (tinyllama_shaped, TOVA_MODES),
}


def build(name: str, dtype: torch.dtype):
    model = MODELS[name][0](dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def generate_tokens(model, ids: torch.Tensor, tokens: int, generate_kwargs) -> torch.Tensor:
    """Plain greedy `generate` of exactly `tokens` new tokens after the prompt `ids` (no padding)."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        **generate_kwargs(),
    )


def random_prompt(model, batch: int, prompt: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(1, model.config.vocab_size, (batch, prompt), device="cuda")


@contextmanager
def counted_graph_captures():
    """Yields a dict whose "captures" counts the CUDA graphs recorded inside the block (cudagraph trees record
    through `torch.cuda.graph`, which begins every capture with `CUDAGraph.capture_begin`)."""
    counter = {"captures": 0}
    capture_begin = torch.cuda.CUDAGraph.capture_begin

    def counting_capture_begin(self, *args, **kwargs):
        counter["captures"] += 1
        return capture_begin(self, *args, **kwargs)

    with mock.patch.object(torch.cuda.CUDAGraph, "capture_begin", counting_capture_begin):
        yield counter


def measure(model, batch: int, prompt: int, new: int, generate_kwargs) -> dict:
    ids = random_prompt(model, batch, prompt)

    def run(tokens: int):
        return generate_tokens(model, ids, tokens, generate_kwargs)

    torch._dynamo.utils.counters.clear()
    torch.cuda.reset_peak_memory_stats()
    first = timed(lambda: run(new))
    timed(lambda: run(new))
    with counted_graph_captures() as recorded:
        prefills = [timed(lambda: run(1)) for _ in range(2)]
        totals = [timed(lambda: run(new)) for _ in range(2)]
    prefill, total = min(prefills), min(totals)
    decode = total - prefill
    return {
        "decode_tokens_per_s": batch * (new - 1) / decode,
        "ms_per_step": 1e3 * decode / (new - 1),
        "prefill_s": prefill,
        "first_call_extra_s": max(first - total, 0.0),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "captures": recorded["captures"],
        "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"],
        "prefill_calls_s": prefills,
        "generate_calls_s": totals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ttt-125m-linear,ttt-125m-mlp,llama-125m")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompts", default="512")
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--modes", default="", help="comma-separated subset of the modes (default: all)")
    parser.add_argument("--out", default="generate.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [int(p) for p in args.prompts.split(",")]
    only = set(filter(None, args.modes.split(",")))
    device = torch.cuda.get_device_name()
    results = {"device": device, "new_tokens": args.new, "dtype": "bf16", "rows": []}
    print(f"## Plain generate, bf16, greedy, {args.new} new tokens ({device})\n")
    print(
        "| model | mode | batch | prompt | decode tok/s | ms/step | prefill s | first call +s | peak GiB | graphs | "
        "captures |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build(name, torch.bfloat16)
        for mode, kwargs in MODELS[name][1].items():
            if only and mode not in only:
                continue
            for prompt in prompts:
                for batch in batches:
                    try:
                        row = measure(model, batch, prompt, args.new, kwargs)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"| {name} | {mode} | {batch} | {prompt} | out of memory | | | | | | |")
                        continue
                    results["rows"].append({"model": name, "mode": mode, "batch": batch, "prompt": prompt, **row})
                    print(
                        f"| {name} | {mode} | {batch} | {prompt} | {row['decode_tokens_per_s']:,.0f} | "
                        f"{row['ms_per_step']:.2f} | {row['prefill_s']:.3f} | {row['first_call_extra_s']:.1f} | "
                        f"{row['peak_gib']:.2f} | {row['graphs']} | {row['captures']} |",
                        flush=True,
                    )
                    save_results(args.out, results)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    plot(results, result_paths(Path(args.out).with_suffix(".png").name))


def plot(results: dict, paths: list[Path]) -> None:
    """Decode tokens/s per model and mode (bars), one group per batch size and prompt length."""
    plt = pyplot()
    if plt is None:
        return
    rows = results["rows"]
    if not rows:
        return
    groups = sorted({(row["batch"], row["prompt"]) for row in rows})
    settings = list(dict.fromkeys(f"{row['model']}: {row['mode']}" for row in rows))
    width = 0.8 / len(settings)
    fig, ax = plt.subplots(figsize=(max(8.0, 2.5 * len(groups)), 6.0))
    for index, setting in enumerate(settings):
        measured = {
            groups.index((r["batch"], r["prompt"])): r["decode_tokens_per_s"]
            for r in rows
            if f"{r['model']}: {r['mode']}" == setting
        }
        ax.bar([g + index * width for g in measured], list(measured.values()), width, label=setting)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"batch {b}\nprompt {p}" for b, p in groups])
    ax.set(
        yscale="log",
        ylabel="decode tokens/s",
        title=f"plain generate, bf16, greedy, {results['new_tokens']} new tokens ({results['device']})",
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
