"""Decoding through plain `model.generate` on the GPU: what a user gets without writing any CUDA-graph code.

Random-weight models in bf16, greedy decoding of `--new` tokens (`min_new_tokens` set, so every row decodes them
all) after a random prompt. Per model and setting:
  decode tokens/s  batch x (new - 1) / (time of generate(new) - time of generate(1)): the prefill excluded;
  prefill s        time of generate(1): the prompt's forward and one token;
  first call s     the first generate(new) of the setting less a later one: compilation and CUDA-graph recording;
  graphs           the graphs torch.compile made for the setting (0: nothing was compiled).
TTT models run plain `generate` (its decoding step compiled and replayed as a CUDA graph, transformers'
automatic compilation) and with `disable_compile=True` (eager steps); the same-size Llama (SDPA) runs with
HF's DynamicCache (eager) and with `cache_implementation="static"` (compiled the same way).

    python kernels/bench_generate.py [--models ttt-125m-linear,ttt-125m-mlp,llama-125m] [--batches 1,16]
        [--prompts 512] [--new 256] [--out generate.json]

Prints a markdown table and writes kernels/results/<out> (and $OUT/<out> when $OUT is set).
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import ROOT, save_results, ttt_model
from bench_ttt_model import llama_like

from ttt_hf import TTTConfig

# name -> (TTT config whose sizes the model takes, whether it is the same-size Llama)
MODELS = {
    "ttt-125m-linear": ("ttt-125m-linear-mamba", False),
    "ttt-125m-mlp": ("ttt-125m-mlp-mamba", False),
    "ttt-1.3b-linear": ("ttt-1.3b-linear-mamba", False),
    "llama-125m": ("ttt-125m-linear-mamba", True),
    "llama-1.3b": ("ttt-1.3b-linear-mamba", True),
}
# mode -> generate keyword arguments, per kind of model
TTT_MODES = {"generate (compiled)": {}, "generate, disable_compile": {"disable_compile": True}}
LLAMA_MODES = {"DynamicCache": {}, 'cache_implementation="static" (compiled)': {"cache_implementation": "static"}}


def build(name: str, dtype: torch.dtype):
    config_name, is_llama = MODELS[name]
    if is_llama:
        config = TTTConfig.from_json_file(ROOT / "configs" / f"{config_name}.json")
        model = llama_like(config, dtype).eval()
    else:
        model = ttt_model(config_name, "auto", dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, batch: int, prompt: int, new: int, **generate_kwargs) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)

    def run(tokens: int):
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                **generate_kwargs,
            )

    torch._dynamo.utils.counters.clear()
    torch.cuda.reset_peak_memory_stats()
    first = timed(lambda: run(new))
    timed(lambda: run(new))
    prefill = min(timed(lambda: run(1)) for _ in range(2))
    total = min(timed(lambda: run(new)) for _ in range(2))
    decode = total - prefill
    return {
        "decode_tokens_per_s": batch * (new - 1) / decode,
        "ms_per_step": 1e3 * decode / (new - 1),
        "prefill_s": prefill,
        "first_call_extra_s": max(first - total, 0.0),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
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
    print("| model | mode | batch | prompt | decode tok/s | ms/step | prefill s | first call +s | peak GiB | graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build(name, torch.bfloat16)
        modes = LLAMA_MODES if MODELS[name][1] else TTT_MODES
        for mode, kwargs in modes.items():
            if only and mode not in only:
                continue
            for prompt in prompts:
                for batch in batches:
                    try:
                        row = measure(model, batch, prompt, args.new, **kwargs)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"| {name} | {mode} | {batch} | {prompt} | out of memory | | | | | |")
                        continue
                    results["rows"].append({"model": name, "mode": mode, "batch": batch, "prompt": prompt, **row})
                    print(
                        f"| {name} | {mode} | {batch} | {prompt} | {row['decode_tokens_per_s']:,.0f} | "
                        f"{row['ms_per_step']:.2f} | {row['prefill_s']:.3f} | {row['first_call_extra_s']:.1f} | "
                        f"{row['peak_gib']:.2f} | {row['graphs']} |",
                        flush=True,
                    )
                    save_results(args.out, results)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
