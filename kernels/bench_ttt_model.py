"""Model-level TTT benchmark on the GPU: training throughput and decode latency, side by side with a Llama
of the same width and depth (SDPA attention, DynamicCache).

    python kernels/bench_ttt_model.py [--train-lens 8192,32768] [--train-batches 1,2,4,8]
        [--decode-contexts 2048,8192,32768] [--train-only]

Prints markdown tables and writes kernels/results/ttt_model.json (with --train-only: ttt_model_train.json) and a
plot of the training tokens/s and peak memory (ttt_model_train.png). A batch that does not fit is reported as out
of memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_common import ROOT, cuda_time, pyplot, result_paths, save_results, ttt_model
from bench_ttt_decode import capture_decode_step
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ttt_hf import TTTConfig
from ttt_hf.ttt.cache_ttt import TTTCache


def llama_like(
    config, dtype: torch.dtype, intermediate_size: int | None = None, device: str = "cuda"
) -> LlamaForCausalLM:
    """A Llama with the model's width, depth, heads, FFN (or `intermediate_size`) and vocabulary: attention
    instead of TTT or Block-State layers."""
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=intermediate_size or config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=1 << 16,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(llama).to(device, dtype)


def training_throughput(model, batch: int, length: int, repeats: int) -> dict:
    """Tokens/s of forward + backward (loss on all tokens) and peak memory."""
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device="cuda")
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    torch.cuda.reset_peak_memory_stats()
    seconds = cuda_time(step, repeats)
    return {
        "tokens_per_s": batch * length / seconds,
        "step_ms": seconds * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


@torch.no_grad()
def decode_latency(
    model, cache, batch: int, context: int, steps: int, prefill_chunk: int = 8192, graph: bool = False
) -> dict:
    """Per-token latency of greedy decoding at `batch` rows after `context` tokens (prefilled in chunks), eagerly
    and (`graph`, TTT models) with the whole step captured in a CUDA graph."""
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device="cuda")
    for start in range(0, context, prefill_chunk):
        out = model(ids[:, start : start + prefill_chunk], cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)

    def step():
        token.copy_(model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1))

    seconds = cuda_time(step, steps, warmup=3)
    row = {"ms_per_token": seconds * 1e3, "tokens_per_s": batch / seconds}
    if graph:
        row["graph_ms_per_token"] = cuda_time(capture_decode_step(model, cache, token), steps, warmup=3) * 1e3
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-lens", default="8192", help="tokens per row of the training table")
    parser.add_argument(
        "--train-batches",
        default="1",
        help="the training table's batch sizes (each model skips those above its largest)",
    )
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-contexts", default="2048,8192,32768")
    parser.add_argument("--llama-decode-context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--train-only", action="store_true", help="only the training table")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "train": {}, "decode": {}}
    dtype = torch.bfloat16

    batches = list(map(int, args.train_batches.split(",")))
    lengths = list(map(int, args.train_lens.split(",")))
    print(f"## Training, TTT (Mamba backbone) vs Llama, bf16, batch x {args.train_lens} tokens")
    print("(TTT trains through the Triton chunk kernels, forward and backward, recomputing inside groups of 16")
    print(" mini-batches, or with 'kept states' (scan_checkpoint_group_size=1) keeping every start state; TTT-Linear")
    print(" 125M's torch reference took 40.7 s a step on the H100, 202 tokens/s)")
    print("| model | tokens per row | batch | tokens/s | step ms | peak GiB |\n|---|---|---|---|---|---|")
    configs = {
        size: TTTConfig.from_json_file(ROOT / "configs" / f"ttt-{size}-linear-mamba.json") for size in ("125m", "1.3b")
    }

    def ttt(name: str, group: int):
        return lambda: ttt_model(name, "triton", dtype, scan_checkpoint_group_size=group)

    # name: (constructor, timed steps at 8k (fewer at longer rows))
    candidates = {
        "TTT-Linear 125M (Triton)": (ttt("ttt-125m-linear-mamba", 16), 2),
        "TTT-Linear 125M (Triton, kept states)": (ttt("ttt-125m-linear-mamba", 1), 2),
        "Llama 125M (SDPA)": (lambda: llama_like(configs["125m"], dtype), 5),
        "TTT-Linear 1.3B (Triton)": (ttt("ttt-1.3b-linear-mamba", 16), 1),
        "TTT-Linear 1.3B (Triton, kept states)": (ttt("ttt-1.3b-linear-mamba", 1), 1),
        "Llama 1.3B (SDPA)": (lambda: llama_like(configs["1.3b"], dtype), 2),
        "TTT-MLP 125M (Triton)": (ttt("ttt-125m-mlp-mamba", 16), 1),
    }
    for name, (make, repeats) in candidates.items():
        model = make()
        for length in lengths:
            for batch in batches:
                try:
                    row = training_throughput(model, batch, length, max(1, repeats * 8192 // length))
                except torch.OutOfMemoryError:
                    row = None  # freed once the exception is gone
                if row is None:
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    print(f"| {name} | {length} | {batch} | out of memory | | |")
                    break  # larger batches do not fit either
                results["train"][f"{name} @ {length} x {batch}"] = {
                    "model": name,
                    "length": length,
                    "batch": batch,
                    **row,
                }
                print(
                    f"| {name} | {length} | {batch} | {row['tokens_per_s']:,.0f} | {row['step_ms']:.1f} | "
                    f"{row['peak_gib']:.1f} |",
                    flush=True,
                )
                save_results("ttt_model_train.json" if args.train_only else "ttt_model.json", results)
        del model
        torch.cuda.empty_cache()
    plot_training(results, result_paths("ttt_model_train.png"))
    if args.train_only:
        return

    print(f"\n## Greedy decode, 125M TTT-Linear, bf16, batch {args.decode_batch}, after 2048 tokens")
    print("| backend | ms/token | tokens/s | peak GiB |\n|---|---|---|---|")
    for backend in ("triton", "torch"):
        model = ttt_model("ttt-125m-linear-mamba", backend, dtype)
        row = decode_latency(model, TTTCache(model.config), args.decode_batch, 2048, args.steps)
        results["decode"][f"TTT-Linear 125M ({backend}) @ 2048"] = row
        print(f"| {backend} | {row['ms_per_token']:.2f} | {row['tokens_per_s']:,.0f} | {row['peak_gib']:.1f} |")
        del model
        torch.cuda.empty_cache()

    print(f"\n## Greedy decode, 1.3B, bf16, batch {args.decode_batch}: per-token latency after a context")
    print(
        "| model | context | ms/token | CUDA graph ms/token | tokens/s (eager) | peak GiB |\n|---|---|---|---|---|---|"
    )
    model = ttt_model("ttt-1.3b-linear-mamba", "auto", dtype)
    for context in map(int, args.decode_contexts.split(",")):
        torch.cuda.reset_peak_memory_stats()
        row = decode_latency(model, TTTCache(model.config), args.decode_batch, context, args.steps, graph=True)
        results["decode"][f"TTT-Linear 1.3B @ {context}"] = row
        print(
            f"| TTT-Linear 1.3B | {context} | {row['ms_per_token']:.2f} | {row['graph_ms_per_token']:.2f} | "
            f"{row['tokens_per_s']:,.0f} | {row['peak_gib']:.1f} |"
        )
    config = model.config
    del model
    torch.cuda.empty_cache()
    llama = llama_like(config, dtype)
    torch.cuda.reset_peak_memory_stats()
    context = args.llama_decode_context
    row = decode_latency(llama, DynamicCache(config=llama.config), args.decode_batch, context, args.steps)
    results["decode"][f"Llama 1.3B DynamicCache @ {context}"] = row
    print(
        f"| Llama 1.3B (DynamicCache) | {context} | {row['ms_per_token']:.2f} | n/a | {row['tokens_per_s']:,.0f} | "
        f"{row['peak_gib']:.1f} |"
    )

    save_results("ttt_model.json", results)


def plot_training(results: dict, paths: list[Path]) -> None:
    """Training tokens/s (top) and peak memory (bottom) against the batch, one column per row length."""
    plt = pyplot()
    if plt is None:
        return
    rows = list(results["train"].values())
    lengths = sorted({row["length"] for row in rows})
    if not lengths:
        return
    fig, axes = plt.subplots(2, len(lengths), figsize=(6.5 * len(lengths), 8.0), squeeze=False)  # [2, L]
    for column, length in enumerate(lengths):
        for name in dict.fromkeys(row["model"] for row in rows):
            measured = sorted((r["batch"], r) for r in rows if r["model"] == name and r["length"] == length)
            if not measured:
                continue
            style = "--" if "Llama" in name else "-"
            batch_sizes = [b for b, _ in measured]
            axes[0][column].plot(batch_sizes, [r["tokens_per_s"] for _, r in measured], style, marker="o", label=name)
            axes[1][column].plot(batch_sizes, [r["peak_gib"] for _, r in measured], style, marker="o", label=name)
        axes[0][column].set(title=f"{length} tokens per row", ylabel="training tokens/s", yscale="log")
        axes[1][column].set(xlabel="batch", ylabel="peak GiB")
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["batch"] for r in rows}), [str(b) for b in sorted({r["batch"] for r in rows})])
            ax.minorticks_off()
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"forward + backward, bf16 ({results['device']})")
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
