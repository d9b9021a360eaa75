"""TOVA decode benchmark on the GPU: the fused score-and-evict kernel, and TOVACache in a ~1B Llama.

    python kernels/bench_tova.py [--context 32768] [--batch 16] [--budgets 1024,2048,4096] [--skip-model]

1. Op level, per layer and decode step (B=16, 32 query heads, 8 KV heads, head_dim 64, bf16, n = budget + 1
   slots): the Triton kernel vs the torch path (scores, kept slots, compaction) vs the step's own attention
   (SDPA, one query over the same n keys); GPU time (triton's do_bench) and host time to issue one call.
2. Model level: a random-weight ~1B Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads) in bf16, batch 16,
   a long prompt prefilled in chunks with the cache (TOVA compresses after each chunk), then decode steps
   (model forward in a manual loop, and `generate` for reference). For each cache: ms/token, tokens/s, peak
   memory, KV bytes per row; the score-and-evict overhead (TOVA at budget N vs a DynamicCache holding N
   tokens); the GPU-busy share of a step (the rest is launch and Python overhead); the largest batch at the
   full context, computed from the measured KV bytes per row.
Prints markdown tables and writes kernels/results/tova.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from triton.testing import do_bench

from ttt_hf import TOVACache
from ttt_hf.tova.tova_attention import last_query_scores
from ttt_hf.tova.tova_triton import tova_evict_one_triton

from bench_common import cuda_time, save_results


def host_us(fn, calls: int = 50) -> float:
    """Host time to issue one call (the GPU queue is deep enough not to block)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def op_row(batch: int, budget: int, q_heads: int = 32, kv_heads: int = 8, dim: int = 64) -> dict:
    """One layer's decode step with budget + 1 slots: kernel, torch path and the attention itself."""
    n = budget + 1
    query = torch.randn(batch, q_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, kv_heads, n, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    positions = torch.arange(n, device="cuda").expand(batch, n).contiguous()
    reference = TOVACache(budget, kernel_backend="torch")

    def kernel():
        tova_evict_one_triton(query[:, :, -1], keys, values, positions, None, dim**-0.5)

    def torch_path():
        kept = reference._kept_slots(last_query_scores(None, query, keys, None, dim**-0.5), positions)
        gather = kept[:, None, :, None].expand(-1, kv_heads, -1, dim)
        return keys.gather(2, gather), values.gather(2, gather), positions.gather(1, kept)

    def attention():
        F.scaled_dot_product_attention(query, keys, values, scale=dim**-0.5, enable_gqa=True)

    return {name: {"gpu_us": do_bench(fn, warmup=25, rep=200) * 1e3, "host_us": host_us(fn)}
            for name, fn in (("kernel", kernel), ("torch", torch_path), ("sdpa", attention))}


def op_benchmark(batch: int, budgets: list[int]) -> dict:
    rows = {budget: op_row(batch, budget) for budget in budgets}
    print(f"## Score and evict, one layer and decode step (B={batch}, 32 heads, 8 KV heads, d=64, bf16)")
    print("| slots | Triton kernel GPU us | torch path GPU us | SDPA decode attention GPU us | kernel / attention | "
          "kernel host us | torch path host us |")
    print("|---|---|---|---|---|---|---|")
    for budget, row in rows.items():
        print(f"| {budget + 1} | {row['kernel']['gpu_us']:.1f} | {row['torch']['gpu_us']:.1f} | {row['sdpa']['gpu_us']:.1f} | "
              f"{row['kernel']['gpu_us'] / row['sdpa']['gpu_us']:.2f} | {row['kernel']['host_us']:.0f} | "
              f"{row['torch']['host_us']:.0f} |")
    return rows


def llama_1b() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=1 << 17, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


@torch.no_grad()
def prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token: torch.Tensor, steps: int) -> dict:
    def step():
        nonlocal token
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    ms = cuda_time(step, steps, warmup=3) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    busy_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return {"ms_per_token": ms, "tokens_per_s": token.shape[0] * 1e3 / ms, "gpu_busy_ms": busy_ms}


@torch.no_grad()
def generate_ms(model, cache, token: torch.Tensor, steps: int) -> float:
    """`generate` continuing from the cache: it feeds only the uncached last token, so the earlier ids are
    placeholders of the right length."""
    ids = torch.cat([token.new_zeros(token.shape[0], cache.get_seq_length()), token], dim=1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=steps,
                   min_new_tokens=steps, do_sample=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def run(model, make_cache, batch: int, context: int, steps: int, chunk: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device="cuda")
    cache = make_cache()
    token = prefill(model, cache, ids, chunk)
    row = decode(model, cache, token, steps)
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    row.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, kv_bytes_per_row=kv_bytes / batch,
               physical_tokens=cache.layers[0].keys.shape[-2])
    row["generate_ms_per_token"] = generate_ms(model, cache, token, steps)
    return row


def model_benchmark(args, budgets: list[int]) -> dict:
    model = llama_1b()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    runs = {"DynamicCache (full)": (lambda: DynamicCache(config=model.config), args.context)}
    for budget in budgets:
        runs[f"TOVACache {budget}, Triton"] = (lambda b=budget: TOVACache(b, kernel_backend="auto"), args.context)
        runs[f"TOVACache {budget}, torch path"] = (lambda b=budget: TOVACache(b, kernel_backend="torch"), args.context)
        runs[f"DynamicCache holding {budget}"] = (lambda: DynamicCache(config=model.config), budget)
    results = {name: run(model, make_cache, args.batch, context, args.steps, args.chunk)
               for name, (make_cache, context) in runs.items()}

    total = torch.cuda.get_device_properties(0).total_memory
    print(f"\n## ~{weights / 2 / 1e9:.2f}B Llama (16 layers, 32 heads, 8 KV heads), bf16, batch {args.batch}, "
          f"{args.context}-token prompt; {torch.cuda.get_device_name()}; cuDNN SDPA {'on' if args.cudnn_sdpa else 'off'}")
    print("| cache | tokens held | ms/token | tokens/s | generate ms/token | GPU busy share | peak GiB | KV MiB/row | "
          "max batch at full context (KV-bound) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        # Largest batch, KV-bound: 90% of the device minus the weights, over the measured KV bytes per row.
        row["max_batch"] = int((0.9 * total - weights) // row["kv_bytes_per_row"])
        print(f"| {name} | {row['physical_tokens']} | {row['ms_per_token']:.2f} | {row['tokens_per_s']:,.0f} | "
              f"{row['generate_ms_per_token']:.2f} | {row['gpu_busy_ms'] / row['ms_per_token']:.0%} | {row['peak_gib']:.1f} | "
              f"{row['kv_bytes_per_row'] / 2**20:.0f} | {row['max_batch'] if 'holding' not in name else ''} |")
    print("\n| budget | path | TOVA ms/token | DynamicCache same length ms/token | score-and-evict overhead | "
          "speed-up vs full cache |")
    print("|---|---|---|---|---|---|")
    full = results["DynamicCache (full)"]["ms_per_token"]
    for budget in budgets:
        same = results[f"DynamicCache holding {budget}"]["ms_per_token"]
        for path in ("Triton", "torch path"):
            tova = results[f"TOVACache {budget}, {path}"]["ms_per_token"]
            print(f"| {budget} | {path} | {tova:.2f} | {same:.2f} | {(tova - same) / tova:.0%} of a step | "
                  f"{full / tova:.2f}x |")
    return {"params": weights // 2, "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (TOVA compresses after each)")
    parser.add_argument("--skip-model", action="store_true", help="op-level benchmark only")
    parser.add_argument(
        "--cudnn-sdpa", action="store_true",
        help="keep SDPA's cuDNN backend: it builds a plan per new KV length (CPU-heavy), which penalises a growing cache",
    )
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_sdpa)
    budgets = [int(b) for b in args.budgets.split(",")]
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                     "context": args.context, "cudnn_sdpa": args.cudnn_sdpa,
                     "ops": op_benchmark(args.batch, budgets)}
    if not args.skip_model:
        results.update(model_benchmark(args, budgets))

    save_results("tova_cudnn_sdpa.json" if args.cudnn_sdpa else "tova.json", results)


if __name__ == "__main__":
    main()
