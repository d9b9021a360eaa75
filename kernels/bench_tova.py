"""TOVACache decode benchmark on the GPU: a random-weight ~1B Llama (hidden 2048, 16 layers, 32 heads, 8 KV
heads) in bf16, batch 16, after a long prompt; TOVACache budgets vs DynamicCache with the full context.

    python kernels/bench_tova.py [--context 32768] [--batch 16] [--budgets 1024,2048,4096]

For each cache: decode ms/token and tokens/s, peak memory, KV bytes per row; the score-and-evict overhead
(TOVA at budget N vs a DynamicCache holding N tokens); the GPU-busy share of a step (the rest is launch and
Python overhead); the largest batch at the full context (computed from the measured bytes per row).
Prints markdown tables and writes kernels/results/tova.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ttt_hf import TOVACache

RESULTS = Path(__file__).resolve().parent / "results"


def llama_1b() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=1 << 17, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


@torch.no_grad()
def prefill(model, cache, batch: int, context: int, chunk: int) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device="cuda")
    for start in range(0, context, chunk):
        out = model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token: torch.Tensor, steps: int) -> dict:
    def step():
        nonlocal token
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    busy_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return {"ms_per_token": ms, "tokens_per_s": token.shape[0] * 1e3 / ms, "gpu_busy_ms": busy_ms}


def run(model, make_cache, batch: int, context: int, steps: int, chunk: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = make_cache()
    token = prefill(model, cache, batch, context, chunk)
    row = decode(model, cache, token, steps)
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    row.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, kv_bytes_per_row=kv_bytes / batch,
               physical_tokens=cache.layers[0].keys.shape[-2])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (TOVA compresses after each)")
    parser.add_argument(
        "--cudnn-sdpa", action="store_true",
        help="keep SDPA's cuDNN backend: it builds a plan per new KV length (CPU-heavy), which penalises a growing cache",
    )
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_sdpa)
    budgets = [int(b) for b in args.budgets.split(",")]
    model = llama_1b()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "params": weights // 2,
                     "batch": args.batch, "context": args.context, "cudnn_sdpa": args.cudnn_sdpa, "runs": {}}

    runs = {"DynamicCache (full)": (lambda: DynamicCache(config=model.config), args.context)}
    for budget in budgets:
        runs[f"TOVACache {budget}"] = (lambda b=budget: TOVACache(b), args.context)
        runs[f"DynamicCache {budget} tokens"] = (lambda: DynamicCache(config=model.config), budget)
    for name, (make_cache, context) in runs.items():
        results["runs"][name] = run(model, make_cache, args.batch, context, args.steps, args.chunk)

    total = torch.cuda.get_device_properties(0).total_memory
    print(f"## ~{weights / 2 / 1e9:.2f}B Llama (16 layers, 32 heads, 8 KV heads), bf16, batch {args.batch}, "
          f"{args.context}-token prompt; {torch.cuda.get_device_name()}; cuDNN SDPA {'on' if args.cudnn_sdpa else 'off'}")
    print("| cache | tokens held | ms/token | tokens/s | GPU busy share | peak GiB | KV MiB/row | max batch (KV-bound) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results["runs"].items():
        # Largest batch, KV-bound: 90% of the device minus the weights, over the measured KV bytes per row.
        row["max_batch"] = int((0.9 * total - weights) // row["kv_bytes_per_row"])
        print(f"| {name} | {row['physical_tokens']} | {row['ms_per_token']:.2f} | {row['tokens_per_s']:,.0f} | "
              f"{row['gpu_busy_ms'] / row['ms_per_token']:.0%} | {row['peak_gib']:.1f} | "
              f"{row['kv_bytes_per_row'] / 2**20:.0f} | {row['max_batch']} |")
    print("\n| budget | TOVA ms/token | DynamicCache same length ms/token | score-and-evict overhead | speed-up vs full |")
    print("|---|---|---|---|---|")
    full = results["runs"]["DynamicCache (full)"]["ms_per_token"]
    for budget in budgets:
        tova = results["runs"][f"TOVACache {budget}"]["ms_per_token"]
        same = results["runs"][f"DynamicCache {budget} tokens"]["ms_per_token"]
        print(f"| {budget} | {tova:.2f} | {same:.2f} | {(tova - same) / tova:.0%} of a step | {full / tova:.2f}x |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    text, name = json.dumps(results, indent=2), "tova_cudnn_sdpa.json" if args.cudnn_sdpa else "tova.json"
    (RESULTS / name).write_text(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / name).write_text(text)


if __name__ == "__main__":
    main()
