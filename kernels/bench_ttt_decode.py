"""TTT decode benchmark on the GPU: the fused Triton decode step against the torch reference, per layer and
step (TTT-Linear and TTT-MLP), and greedy decoding of random-weight 125M TTT models through the model's own
forward with a TTTCache, eagerly and captured in a CUDA graph.

    python kernels/bench_ttt_decode.py [--batch 16] [--context 512] [--steps 64]

Prints markdown tables and writes kernels/results/ttt_decode.json (and $OUT/ttt_decode.json when $OUT is set).
"""

from __future__ import annotations

import argparse

import torch
from bench_common import capture, cuda_time, save_results, ttt_model

from ttt_hf import TTTForCausalLM
from ttt_hf.ttt.cache_ttt import TTTCache
from ttt_hf.ttt.ttt_ops import ttt_step_reference
from ttt_hf.ttt.ttt_triton_decode import ttt_step_triton

MINI_BATCH = 16


def step_inputs(layer_type: str, batch: int, heads: int, head_dim: int, dtype: torch.dtype):
    hidden = 4 * head_dim if layer_type == "mlp" else head_dim
    shapes = [(head_dim, hidden), (1, hidden)] + ([(hidden, head_dim), (1, head_dim)] if layer_type == "mlp" else [])
    state = [0.02 * torch.randn(batch, heads, *s, device="cuda") for s in shapes]
    acc = [torch.zeros_like(s) for s in state]
    q, k, v = (torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    lr = torch.full((batch, heads), 1.0 / head_dim, device="cuda")
    tau = 1.0 / torch.arange(1, MINI_BATCH + 1, device="cuda", dtype=torch.float32)
    ln_w, ln_b = torch.ones(heads, 1, head_dim, device="cuda"), torch.zeros(heads, 1, head_dim, device="cuda")
    position = torch.arange(batch, device="cuda")  # one row in 16 commits in each step, as on average
    active = torch.ones(batch, dtype=torch.bool, device="cuda")
    return state, acc, (q, k, v, lr, tau, ln_w, ln_b, position, active)


def state_bytes(state: list[torch.Tensor]) -> int:
    """Least HBM traffic of one step: read state and accumulator, write the accumulator (W only on commit)."""
    return 3 * sum(t.numel() * t.element_size() for t in state)


def bench_step(layer_type: str, batch: int, heads: int, head_dim: int, dtype: torch.dtype, repeats: int) -> dict:
    state, acc, args = step_inputs(layer_type, batch, heads, head_dim, dtype)
    triton_step = lambda: ttt_step_triton(state, acc, *args)  # in place

    def torch_step():  # the reference returns new tensors: carry them as the cache does (eagerly; a graph
        # replays its captured step from the same state, at the same cost)
        _, state[:], acc[:] = ttt_step_reference(state, acc, *args)

    row = {}
    for name, fn in (("triton", triton_step), ("torch", torch_step)):
        row[f"{name}_us"] = cuda_time(fn, repeats, warmup=3) * 1e6
        row[f"{name}_graph_us"] = cuda_time(capture(fn), repeats, warmup=3) * 1e6
    row["triton_graph_gb_per_s"] = state_bytes(state) / row["triton_graph_us"] / 1e3
    return row


_CACHE_FIELDS = ("ttt_state", "ttt_acc", "pre_conv_state", "qk_conv_state")


def cache_tensors(cache: TTTCache) -> list[torch.Tensor]:
    """Every tensor a decode step reads from the cache, in a fixed order."""
    tensors = []
    for layer in cache.layers:
        for field in _CACHE_FIELDS:
            value = getattr(layer, field)
            tensors += value if isinstance(value, list) else [value] if value is not None else []
    return tensors + [cache.positions]


def set_cache_tensors(cache: TTTCache, tensors: list[torch.Tensor]) -> None:
    tensors = iter(tensors)
    for layer in cache.layers:
        for field in _CACHE_FIELDS:
            value = getattr(layer, field)
            if isinstance(value, list):
                setattr(layer, field, [next(tensors) for _ in value])
            elif value is not None:
                setattr(layer, field, next(tensors))
    cache.positions = next(tensors)


def capture_decode_step(model: TTTForCausalLM, cache: TTTCache, token: torch.Tensor):
    """A greedy step (token -> next token, in `token`) captured in a CUDA graph. The model replaces some cache
    tensors (positions; all of them with the torch backend) instead of updating them in place: the graph copies
    each new one back into the tensor it read, so that every replay continues from the last."""
    inputs = cache_tensors(cache)

    def step():
        token.copy_(model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1))
        for old, new in zip(inputs, cache_tensors(cache)):
            if new is not old:
                old.copy_(new)
        set_cache_tensors(cache, inputs)

    return capture(step)


@torch.no_grad()
def bench_model(name: str, backend: str, batch: int, context: int, steps: int) -> dict:
    """Greedy decode tokens/s after a `context`-token prefill, eager and as a CUDA graph; checks that both
    produce the same tokens."""
    model = ttt_model(name, backend, torch.bfloat16)
    cache = TTTCache(model.config)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device="cuda")
    token = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def eager_step():
        token.copy_(model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1))

    row = {"eager_tokens_per_s": batch / cuda_time(eager_step, steps, warmup=3)}
    replay = capture_decode_step(model, cache, token)
    start, snapshot = token.clone(), [t.clone() for t in cache_tensors(cache)]
    inputs = cache_tensors(cache)
    tokens = {}
    for variant, fn in (("eager", eager_step), ("graph", replay)):
        for t, s in zip(inputs, snapshot):
            t.copy_(s)
        set_cache_tensors(cache, inputs)
        token.copy_(start)
        generated = []
        for _ in range(16):
            fn()
            generated.append(token.clone())
        tokens[variant] = torch.cat(generated, 1)
    row["graph_matches_eager"] = bool(torch.equal(tokens["graph"], tokens["eager"]))
    row["graph_tokens_per_s"] = batch / cuda_time(replay, steps, warmup=3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=512, help="prefill length before decoding")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per op-level measurement")
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "step": {}, "model": {}}

    print(f"## One layer's decode step, batch {args.batch}, f=64, bf16 q/k/v, fp32 state (us per step)")
    print("| layer | heads | triton | triton graph | torch | torch graph | speed-up (graphs) | triton GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for layer_type in ("linear", "mlp"):
        for heads in (12, 32):
            row = bench_step(layer_type, args.batch, heads, 64, torch.bfloat16, args.repeats)
            results["step"][f"{layer_type} H={heads}"] = row
            print(
                f"| {layer_type} | {heads} | {row['triton_us']:.1f} | {row['triton_graph_us']:.1f} "
                f"| {row['torch_us']:.1f} | {row['torch_graph_us']:.1f} "
                f"| {row['torch_graph_us'] / row['triton_graph_us']:.1f}x | {row['triton_graph_gb_per_s']:.0f} |"
            )

    print(
        f"\n## Greedy decode, random-weight 125M (Mamba backbone), bf16, batch {args.batch}, "
        f"after {args.context} tokens"
    )
    print("| model | backend | eager tokens/s | CUDA graph tokens/s | graph == eager tokens |\n|---|---|---|---|---|")
    for name in ("ttt-125m-linear-mamba", "ttt-125m-mlp-mamba"):
        for backend in ("torch", "triton"):
            row = bench_model(name, backend, args.batch, args.context, args.steps)
            results["model"][f"{name} {backend}"] = row
            print(
                f"| {name} | {backend} | {row['eager_tokens_per_s']:,.0f} | {row['graph_tokens_per_s']:,.0f} "
                f"| {row['graph_matches_eager']} |"
            )
            torch.cuda.empty_cache()

    save_results("ttt_decode.json", results)


if __name__ == "__main__":
    main()
