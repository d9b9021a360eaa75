"""TOVA decode benchmark on the GPU: the TOVA kernels, and TOVACache in a ~1B Llama, eager and as CUDA graphs.

    python kernels/bench_tova.py [--context 32768] [--batch 16] [--budgets 1024,2048,4096] [--skip-model] [--max-batch]

1. Op level, per layer and decode step (B=16, 32 query heads, 8 KV heads, head_dim 64, bf16, n = budget + 1
   slots): the fused attention + score + evict kernel (what a decode step of an sdpa model runs) vs the step's
   attention alone (SDPA, one query over the same n keys, GQA without a mask): "fused / SDPA" is the cost of
   TOVA's scoring at equal physical length; next to them the score-and-evict kernel alone (after the model's own
   attention: the "eager" route) and the torch path (scores, victim, swap-remove). GPU time in a CUDA graph after
   an L2 flush (and triton's do_bench, eager), the kernels' bandwidth (keys, and values for the fused one, read
   once; fp32 logits written and read back), host time to issue one call.
2. Model level: a random-weight ~1B Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads) in bf16, batch 16,
   a long prompt prefilled in chunks (TOVA compresses after each), then greedy decode steps through the model's
   forward with explicit `position_ids` (a device tensor advanced in place): eagerly, and captured in a CUDA
   graph and replayed (the graph's tokens are checked against eager steps from the same state). Caches: the
   full context in a DynamicCache (eager) and in a StaticCache (eager and graph); TOVACache at each budget with
   the kernels (the fused attention kernel in each decode step) and with the torch path (SDPA, then scores);
   TOVACache without scoring (SDPA, then each step drops the newest slot: the same physical length): the
   score-and-evict overhead is (TOVA step - that step) / TOVA step, both captured. Under capture transformers
   materialises the all-True causal mask; TOVACache drops it for unpadded caches, so TOVA's captured steps attend
   as the eager ones do (the fused kernel without a mask row; SDPA's GQA path for the baseline).
3. With --max-batch (first, while the process holds nothing else): the largest batch that decodes with each cache
   at the context (the full DynamicCache; TOVA at each budget), by bisection: the caches are filled with random keys
   and values of the length a prompt of the context leaves them (instead of a prefill, which would run in
   micro-batches), then two eager decode steps run.
Prints markdown tables and writes kernels/results/tova.json.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_common import capture, cuda_time, save_results
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache
from triton.testing import do_bench

from ttt_hf import CACHE_NAME, TOVACache
from ttt_hf.tova.cache_tova import TOVALayer
from ttt_hf.tova.tova_ops import last_query_scores, victims
from ttt_hf.tova.tova_triton import tova_attention_evict_one_triton, tova_evict_one_triton

CHECK_STEPS = 16  # decode steps compared between the graph and eager


class UnscoredTOVACache(TOVACache):
    """TOVACache whose decode steps run the model's attention (SDPA) and drop the newest slot instead of scoring:
    TOVA's physical length without the score-and-evict, the baseline of its overhead. Prompts are compressed as
    TOVA does."""

    def fused_attention(self, *args, **kwargs) -> None:
        return None  # never the fused kernel: the model's own attention runs, then after_attention

    def after_attention(self, module, query, key, attention_mask, scaling, softcap=None, sinks=None) -> None:
        layer = self.layers[module.layer_idx]
        if query.shape[2] > 1 or layer.physical_length != self.budget + 1:
            return super().after_attention(module, query, key, attention_mask, scaling, softcap, sinks)
        layer.drop_last()


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


def graph_us(fn: Callable[[], object], calls: int = 20) -> float:
    """GPU time of one call of `fn` with no host gaps: a CUDA graph of `calls` calls, each after an L2 flush (as in
    a model, where the other layers evict this one's keys), minus a graph of the flushes alone."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def per_call(with_fn: bool) -> float:
        body = (lambda: (flush.zero_(), fn())) if with_fn else flush.zero_
        replay = capture(lambda: [body() for _ in range(calls)], warm_up=body)
        return cuda_time(replay, 5, warmup=1) / calls

    return (per_call(True) - per_call(False)) * 1e6


def op_row(batch: int, budget: int, q_heads: int = 32, kv_heads: int = 8, dim: int = 64) -> dict:
    """One layer's decode step with budget + 1 slots: the fused kernel, the score-and-evict kernel, the torch path
    and the attention itself. The kernels evict in place: every call drops a slot of the same n (the data does
    not change the work)."""
    n = budget + 1
    query = torch.randn(batch, q_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, kv_heads, n, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    positions = torch.arange(n, device="cuda").expand(batch, n).contiguous()
    layer = TOVALayer(n)

    def fused():
        tova_attention_evict_one_triton(query[:, :, -1], keys, values, positions, None, dim**-0.5)

    def kernel():
        tova_evict_one_triton(query[:, :, -1], keys, values, positions, None, dim**-0.5)

    def torch_path():
        layer._hold((keys, values, positions), n)  # the n slots again: the eviction drops one
        scores = last_query_scores(None, query, keys, None, dim**-0.5)
        layer.swap_remove(victims(scores, positions, "tova", 0))

    def attention():
        F.scaled_dot_product_attention(query, keys, values, scale=dim**-0.5, enable_gqa=True)

    row = {
        name: {"graph_us": graph_us(fn), "gpu_us": do_bench(fn, warmup=25, rep=200) * 1e3, "host_us": host_us(fn)}
        for name, fn in (("fused", fused), ("kernel", kernel), ("torch", torch_path), ("sdpa", attention))
    }
    logits = 2 * batch * q_heads * n * 4  # fp32 logits written and read back
    row["kernel"]["gb_per_s"] = (keys.numel() * keys.element_size() + logits) / row["kernel"]["graph_us"] / 1e3
    moved = 2 * keys.numel() * keys.element_size() + logits  # plus the values; split outputs are ~1% of it
    row["fused"]["gb_per_s"] = moved / row["fused"]["graph_us"] / 1e3
    return row


def op_benchmark(batch: int, budgets: list[int]) -> dict:
    rows = {budget: op_row(batch, budget) for budget in budgets}
    lines = [
        f"## Attention, score and evict, one layer and decode step (B={batch}, 32 heads, 8 KV heads, d=64, bf16)",
        "GPU us in a CUDA graph after an L2 flush (do_bench's eager figure, which includes launch gaps, in brackets). "
        "Fused: the step's attention, scores and eviction in one pass (sdpa models); SDPA: the attention alone (TOVA "
        "without scoring); score-and-evict: the kernel alone, after the model's attention (eager models).",
        "",
        "| slots | fused GPU us | fused GB/s | SDPA decode attention GPU us | fused / SDPA | score-and-evict GPU us | "
        "score-and-evict GB/s | score-and-evict / SDPA | torch path GPU us | fused host us | "
        "score-and-evict host us | torch path host us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for budget, row in rows.items():
        fused, kernel, torch_path, sdpa = row["fused"], row["kernel"], row["torch"], row["sdpa"]
        lines.append(
            f"| {budget + 1} | {fused['graph_us']:.1f} ({fused['gpu_us']:.1f}) | {fused['gb_per_s']:,.0f} | "
            f"{sdpa['graph_us']:.1f} ({sdpa['gpu_us']:.1f}) | {fused['graph_us'] / sdpa['graph_us']:.2f} | "
            f"{kernel['graph_us']:.1f} ({kernel['gpu_us']:.1f}) | {kernel['gb_per_s']:,.0f} | "
            f"{kernel['graph_us'] / sdpa['graph_us']:.2f} | "
            f"{torch_path['graph_us']:.1f} ({torch_path['gpu_us']:.1f}) | "
            f"{fused['host_us']:.0f} | {kernel['host_us']:.0f} | {torch_path['host_us']:.0f} |"
        )
    print("\n".join(lines), flush=True)
    return {"rows": rows, "table": lines}


def llama_1b() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=1 << 17,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


def prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start : start + chunk], use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
    return out.logits[:, -1:].argmax(-1)


def greedy_step(model, cache, token: torch.Tensor, position: torch.Tensor) -> Callable[[], None]:
    """One greedy decode step, all in place on device tensors (so a CUDA graph of it replays correctly): the
    next token into `token` [B, 1], `position` [B, 1] (the RoPE position) advanced by one."""

    def step():
        logits = model(token, position_ids=position, use_cache=True, **{CACHE_NAME: cache}).logits
        token.copy_(logits[:, -1:].argmax(-1))
        position.add_(1)

    return step


def state_tensors(cache) -> list[torch.Tensor]:
    """The device tensors a decode step of `cache` reads and writes (to restore a state for the token check).
    A StaticCache's slots past its length are written before they are attended, so its lengths suffice."""
    if isinstance(cache, TOVACache):
        return [t for layer in cache.layers for t in (*layer._buffers, layer._next_position)]
    return [layer.cumulative_length for layer in cache.layers]


def greedy_tokens(step: Callable[[], None], token: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = []
    for _ in range(steps):
        step()
        tokens.append(token.clone())
    return torch.cat(tokens, dim=1)


def graph_row(model, cache, token: torch.Tensor, position: torch.Tensor, steps: int) -> dict:
    """ms/token of the captured step, and whether its tokens equal eager steps from the same state."""
    eager_step = greedy_step(model, cache, token, position)
    replay = capture(eager_step)
    tensors = state_tensors(cache) + [token, position]
    snapshot = [t.clone() for t in tensors]
    eager = greedy_tokens(eager_step, token, CHECK_STEPS)
    for tensor, saved in zip(tensors, snapshot):
        tensor.copy_(saved)
    graph = greedy_tokens(replay, token, CHECK_STEPS)
    ms = cuda_time(replay, steps, warmup=3) * 1e3
    return {
        "graph_ms_per_token": ms,
        "graph_tokens_per_s": token.shape[0] * 1e3 / ms,
        "graph_matches_eager": bool(torch.equal(graph, eager)),
    }


def eager_row(model, cache, token: torch.Tensor, position: torch.Tensor, steps: int) -> dict:
    step = greedy_step(model, cache, token, position)
    ms = cuda_time(step, steps, warmup=3) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    busy_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return {"ms_per_token": ms, "tokens_per_s": token.shape[0] * 1e3 / ms, "gpu_busy_ms": busy_ms}


def generate_ms(model, cache, token: torch.Tensor, steps: int) -> float:
    """`generate` continuing from the cache: it feeds only the uncached last token, so the earlier ids are
    placeholders of the right length."""
    ids = torch.cat([token.new_zeros(token.shape[0], cache.get_seq_length()), token], dim=1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        **{CACHE_NAME: cache},
    )
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


@torch.no_grad()
def run(model, name: str, make_cache, context: int, args, graph: bool) -> dict:
    """Prefill `context` tokens, then eager steps, `generate` (caches it supports), and the CUDA graph."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, context), device=model.device)
    cache = make_cache()
    token = prefill(model, cache, ids, args.chunk)
    position = torch.full_like(token, context)
    row = eager_row(model, cache, token, position, args.steps)
    layer = cache.layers[0]
    row.update(physical_tokens=layer.keys.shape[-2], kv_bytes_per_row=cache_bytes(cache) / args.batch)
    if not isinstance(cache, StaticCache):  # generate would compile a StaticCache's step
        row["generate_ms_per_token"] = generate_ms(model, cache, token, args.steps)
        position.fill_(cache.get_seq_length())
    if graph:
        try:
            row.update(graph_row(model, cache, token, position, args.steps))
        except Exception as error:  # report it and go on with the other caches
            traceback.print_exc()
            row["graph_error"] = f"{type(error).__name__}: {error}"
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
        flush=True,
    )
    return row


def cache_bytes(cache) -> int:
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )


def fill_and_decode(model, make_cache, batch: int, held: int) -> None:
    """Decodes two eager steps of `batch` rows with the cache a long prompt leaves: `held` random keys and values
    per layer (the full context for the full cache, the budget for TOVA), filled directly instead of prefilled
    (the step's activations, the fused kernel's buffers and a growing cache's copy all count)."""
    config = model.config
    shape = (batch, config.num_key_value_heads, held, config.hidden_size // config.num_attention_heads)
    cache = make_cache()
    for layer_idx in range(config.num_hidden_layers):
        keys = torch.randn(shape, device=model.device, dtype=model.dtype)
        cache.update(keys, torch.randn_like(keys), layer_idx)
        del keys
    token = torch.randint(3, config.vocab_size, (batch, 1), device=model.device)
    step = greedy_step(model, cache, token, torch.full_like(token, held))
    with torch.no_grad():
        step()
        step()
    torch.cuda.synchronize()


def fits(model, make_cache, batch: int, held: int) -> bool:
    """Whether `fill_and_decode` runs; its tensors are gone when this returns (the next probe needs the memory)."""
    try:
        fill_and_decode(model, make_cache, batch, held)
        return True
    except RuntimeError as error:  # torch.OutOfMemoryError, or a library's failed allocation (cuBLAS)
        if isinstance(error, torch.OutOfMemoryError) or "ALLOC" in str(error) or "out of memory" in str(error):
            print(f"  batch {batch}: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
            return False
        raise
    finally:
        gc.collect()  # a failed probe's traceback keeps its frames (and their tensors) in reference cycles
        torch.cuda.empty_cache()


def measured_max_batch(model, make_cache, held: int, estimate: int) -> int:
    """The largest batch that `fits`, by bisection below twice the KV-bound estimate (whose KV bytes alone exceed
    the device), to 1%."""
    low, high = 0, 2 * estimate + 2
    while high - low > max(1, low // 100):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(model, make_cache, middle, held) else (low, middle)
    return low


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bound_batch(weights: int, row_bytes: float) -> int:
    """The largest batch by KV bytes alone: 90% of the device minus the weights, over the KV bytes per row."""
    return int((0.9 * torch.cuda.get_device_properties(0).total_memory - weights) // row_bytes)


def max_batch_benchmark(args, budgets: list[int]) -> dict[str, int]:
    """The largest batch that decodes at the context with the full DynamicCache and with TOVA at each budget, in a
    process that holds nothing else yet (the other runs' freed memory fragments the allocator)."""
    model = llama_1b()
    config = model.config
    weights = weight_bytes(model)
    token_bytes = (
        4 * config.num_hidden_layers * config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    )
    caches = {"DynamicCache (full)": (lambda: DynamicCache(config=config), args.context)}
    for budget in budgets:
        caches[f"TOVACache {budget}, Triton"] = (lambda b=budget: TOVACache(b, kernel_backend="auto"), budget)
    measured = {}
    for name, (make_cache, held) in caches.items():
        estimate = kv_bound_batch(weights, token_bytes * held)  # bf16 keys and values of `held` tokens
        measured[name] = measured_max_batch(model, make_cache, held, estimate)
        print(f"{name}: largest batch that decodes {measured[name]} (KV-bound estimate {estimate})", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return measured


def model_benchmark(args, budgets: list[int], measured_batches: dict[str, int] | None = None) -> dict:
    measured_batches = measured_batches or {}
    model = llama_1b()
    config = model.config
    weights = weight_bytes(model)
    room = args.context + 2 * args.steps + 2 * CHECK_STEPS + 64  # every step a run takes, with a margin
    runs = {
        "DynamicCache (full)": (lambda: DynamicCache(config=config), args.context, False),
        "StaticCache (full)": (lambda: StaticCache(config=config, max_cache_len=room), args.context, True),
    }
    for budget in budgets:
        runs[f"TOVACache {budget}, Triton"] = (lambda b=budget: TOVACache(b, kernel_backend="auto"), args.context, True)
        runs[f"TOVACache {budget}, torch path"] = (
            lambda b=budget: TOVACache(b, kernel_backend="torch"),
            args.context,
            True,
        )
        runs[f"TOVACache {budget}, no scoring"] = (lambda b=budget: UnscoredTOVACache(b), args.context, True)
    results = {}
    for name, (make_cache, context, graph) in runs.items():
        try:
            results[name] = run(model, name, make_cache, context, args, graph)
        except Exception as error:
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    for name, row in results.items():
        if "kv_bytes_per_row" in row:
            row["max_batch"] = kv_bound_batch(weights, row["kv_bytes_per_row"])
        if name in measured_batches:
            row["max_batch_measured"] = measured_batches[name]
    return {"params": weights // 2, "runs": results, "tables": model_tables(args, budgets, weights, results)}


def _ms(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def _ratio(numerator: dict, key_n: str, denominator: dict, key_d: str, percent: bool = False) -> str:
    if key_n not in numerator or key_d not in denominator:
        return "-"
    if percent:
        return f"{(numerator[key_n] - denominator[key_d]) / numerator[key_n]:.0%}"
    return f"{numerator[key_n] / denominator[key_d]:.2f}x"


def model_tables(args, budgets: list[int], weights: int, results: dict) -> list[str]:
    lines = [
        f"## ~{weights / 2 / 1e9:.2f}B Llama (16 layers, 32 heads, 8 KV heads), bf16, batch {args.batch}, "
        f"{args.context}-token prompt; {torch.cuda.get_device_name()}; cuDNN SDPA {'on' if args.cudnn_sdpa else 'off'}",
        "| cache | tokens held | eager ms/token | eager tokens/s | CUDA graph ms/token | graph tokens/s | "
        "graph == eager tokens | generate ms/token | GPU busy share (eager) | peak GiB | KV MiB/row | "
        "max batch: KV-bound estimate | max batch: measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:120]} |" + " |" * 11)
            continue
        if "graph_ms_per_token" in row:
            graph_ms, graph_rate = f"{row['graph_ms_per_token']:.2f}", f"{row['graph_tokens_per_s']:,.0f}"
        else:
            graph_ms = graph_rate = "failed" if "graph_error" in row else "-"
        lines.append(
            f"| {name} | {row['physical_tokens']} | {row['ms_per_token']:.2f} | {row['tokens_per_s']:,.0f} | "
            f"{graph_ms} | {graph_rate} | {row.get('graph_matches_eager', '-')} | "
            f"{_ms(row, 'generate_ms_per_token')} | {row['gpu_busy_ms'] / row['ms_per_token']:.0%} | "
            f"{row['peak_gib']:.1f} | {row['kv_bytes_per_row'] / 2**20:.0f} | "
            f"{row['max_batch'] if 'no scoring' not in name else ''} | {row.get('max_batch_measured', '')} |"
        )
    lines += [
        "",
        "| budget | path | TOVA graph ms/token | TOVA without scoring, graph ms/token | score-and-evict overhead "
        "(graphs) | TOVA graph vs full DynamicCache eager | vs full StaticCache graph | eager vs eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    static_full, dynamic_full = results["StaticCache (full)"], results["DynamicCache (full)"]
    for budget in budgets:
        same = results[f"TOVACache {budget}, no scoring"]
        for path in ("Triton", "torch path"):
            tova = results[f"TOVACache {budget}, {path}"]
            lines.append(
                f"| {budget} | {path} | {_ms(tova, 'graph_ms_per_token')} | {_ms(same, 'graph_ms_per_token')} | "
                f"{_ratio(tova, 'graph_ms_per_token', same, 'graph_ms_per_token', percent=True)} of a step | "
                f"{_ratio(dynamic_full, 'ms_per_token', tova, 'graph_ms_per_token')} | "
                f"{_ratio(static_full, 'graph_ms_per_token', tova, 'graph_ms_per_token')} | "
                f"{_ratio(dynamic_full, 'ms_per_token', tova, 'ms_per_token')} |"
            )
    lines.append(
        "\nUnder CUDA-graph capture transformers materialises the causal mask and, with a mask, its SDPA integration "
        "repeats K/V per query head: the full StaticCache attends that way; TOVACache drops the all-True mask of an "
        "unpadded cache, so its captured steps attend like the eager steps (the fused kernel; SDPA's GQA path "
        "without scoring)."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (TOVA compresses after each)")
    parser.add_argument("--skip-model", action="store_true", help="op-level benchmark only")
    parser.add_argument(
        "--max-batch",
        action="store_true",
        help="also measure the largest batch that decodes with each cache at the context (bisection)",
    )
    parser.add_argument(
        "--cudnn-sdpa",
        action="store_true",
        help="keep SDPA's cuDNN backend: it builds a plan per new KV length (CPU-heavy), which penalises a "
        "growing cache",
    )
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_sdpa)
    budgets = [int(b) for b in args.budgets.split(",")]
    started = time.perf_counter()
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
        "context": args.context,
        "cudnn_sdpa": args.cudnn_sdpa,
        "ops": op_benchmark(args.batch, budgets),
    }
    if args.max_batch:
        results["max_batch_measured"] = max_batch_benchmark(args, budgets)
    if not args.skip_model:
        results.update(model_benchmark(args, budgets, results.get("max_batch_measured")))
    results["seconds"] = time.perf_counter() - started
    save_results("tova_cudnn_sdpa.json" if args.cudnn_sdpa else "tova.json", results)
    print("\n" + "\n".join(results["ops"]["table"]))
    if not args.skip_model:
        print("\n" + "\n".join(results["tables"]))
    elif args.max_batch:
        print(
            "\n"
            + "\n".join(
                f"{name}: largest batch that decodes {batch}" for name, batch in results["max_batch_measured"].items()
            )
        )
    print(f"\n{results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
