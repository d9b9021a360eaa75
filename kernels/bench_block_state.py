"""Block-State benchmark on the GPU: one BST-SH attention layer (SSM + fused 2H-head block attention) against a
full causal attention layer and a sliding-window attention layer of the same width, and against our torch
reference path; then whole-model training/inference tokens/s of the 200M BST-SH config against a Llama of
the same size.

    python kernels/bench_block_state.py [--lengths 4096,16384,65536] [--batch 4] [--model-lengths 4096,16384]

Layers: D=1024, H=8 (head dim 128), W=512, N=16, bf16 weights and activations, SSM in fp32.
- full: q/k/v/o projections + RoPE + SDPA `is_causal` (flash).
- window: the same with a sliding window of W keys, blockwise: each block of W queries attends to its own
  and the previous block under one band mask (SDPA with a mask: the memory-efficient kernel), or
  flash-attn's `window_size` when the flash_attn package is installed (the table says which ran).
- bst: BlockStateAttention, kernel_backend "auto" (the Triton S4D scan and rotary pass, one 2H-head
  is_causal SDPA call) and "torch" (the reference: exactly-causal FFT convolution).
Checks the fast path against the reference on the first length, prints markdown tables and writes
kernels/results/block_state.json.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from bench_common import RESULTS, ROOT, cuda_time, save_results
from torch import nn

from ttt_hf import BlockStateConfig, BlockStateForCausalLM
from ttt_hf.block_state.modeling_block_state import (
    BlockStateAttention,
    BlockStateModel,
    apply_rope,
)

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class CausalAttention(nn.Module):
    """Llama-style attention of width D: full causal, or a sliding window of `window` keys."""

    def __init__(self, width: int, heads: int, window: int | None = None) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (p(x).view(batch, length, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, position, 10000.0), apply_rope(k, position, 10000.0)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif flash_attn_func is not None:
            out = flash_attn_func(
                *(t.transpose(1, 2) for t in (q, k, v)), causal=True, window_size=(self.window - 1, 0)
            )
            out = out.transpose(1, 2)
        else:
            out = _blockwise_window(q, k, v, self.window)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, width))


def _blockwise_window(q, k, v, window):
    """Query i sees keys (i - window, i]: blocks of `window` queries against their own and the previous block."""
    batch, heads, length, dim = q.shape
    blocks = length // window

    def split(t):
        return t.reshape(batch, heads, blocks, window, dim)

    k_b, v_b = split(k), split(v)
    k2 = torch.cat([F.pad(k_b[:, :, :-1], (0, 0, 0, 0, 1, 0)), k_b], dim=3)
    v2 = torch.cat([F.pad(v_b[:, :, :-1], (0, 0, 0, 0, 1, 0)), v_b], dim=3)
    i = torch.arange(window, device=q.device)[:, None] + window
    j = torch.arange(2 * window, device=q.device)[None]
    band = (j <= i) & (j > i - window)
    first = torch.arange(blocks, device=q.device)[:, None, None] > 0  # block 0 has no previous block
    mask = band & ((j >= window) | first)
    return F.scaled_dot_product_attention(split(q), k2, v2, attn_mask=mask).reshape(batch, heads, length, dim)


def measure(fn, reps: int) -> float | str:
    try:
        return round(cuda_time(fn, reps) * 1e3, 3)
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        torch.cuda.empty_cache()


def bst_layer(args, backend: str) -> BlockStateAttention:
    config = BlockStateConfig(
        hidden_size=args.width,
        num_attention_heads=args.heads,
        block_size=args.block,
        ssm_state_size=args.state,
        context_mode="sh",
        kernel_backend=backend,
        num_hidden_layers=1,
    )
    torch.manual_seed(0)
    layer = BlockStateForCausalLM(config).model.layers[0].attn.cuda()  # initialised as in a model
    for name, child in layer.named_children():
        if name != "ssm":  # the SSM parameters stay fp32
            child.to(torch.bfloat16)
    return layer


def layer_benchmark(args) -> list[dict]:
    rows = []
    fast, reference = bst_layer(args, "auto"), bst_layer(args, "torch")
    reference.load_state_dict(fast.state_dict())
    full = CausalAttention(args.width, args.heads).cuda().to(torch.bfloat16)
    window = CausalAttention(args.width, args.heads, args.block).cuda().to(torch.bfloat16)
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(args.batch, length, dtype=torch.bool, device="cuda")
        layout, _ = BlockStateModel._layout(
            SimpleNamespace(config=fast.config), mask, torch.zeros_like(mask[:, 0], dtype=torch.long)
        )
        position = layout.position
        candidates = {
            "bst (auto)": partial(fast, x, layout),
            "bst (torch reference)": partial(reference, x, layout),
            "full attention": partial(full, x, position),
            "sliding window": partial(window, x, position),
        }
        if length == args.lengths[0]:
            with torch.no_grad():
                expected = reference(x, layout).float()
                error = ((fast(x, layout).float() - expected).abs().max() / expected.abs().max()).item()
            print(f"check at L={length}: bst auto vs torch reference, max relative error {error:.2e}")
        for name, forward in candidates.items():
            slow = name == "bst (torch reference)" and length > args.reference_max_length
            reps = 2 if length >= 16384 or "reference" in name else 5

            def fwd(forward=forward):
                with torch.no_grad():
                    forward()

            def fwd_bwd(forward=forward, x=x):
                forward().float().sum().backward()
                x.grad = None

            rows.append(
                dict(
                    layer=name,
                    length=length,
                    batch=args.batch,
                    forward_ms="skipped" if slow else measure(fwd, reps),
                    forward_backward_ms="skipped" if slow else measure(fwd_bwd, reps),
                )
            )
            print(rows[-1], flush=True)
    return rows


def model_benchmark(args) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    bst_config = BlockStateConfig.from_pretrained(ROOT / "configs" / "block-state-200m-sh.json")
    llama_config = LlamaConfig(
        vocab_size=bst_config.vocab_size,
        hidden_size=bst_config.hidden_size,
        num_hidden_layers=bst_config.num_hidden_layers,
        num_attention_heads=bst_config.num_attention_heads,
        num_key_value_heads=bst_config.num_attention_heads,
        intermediate_size=args.llama_intermediate,
        max_position_embeddings=max(args.model_lengths),
        tie_word_embeddings=True,
    )
    models = {}
    for name, build in (
        ("bst-sh-200m", lambda: BlockStateForCausalLM(bst_config)),
        ("llama", lambda: LlamaForCausalLM(llama_config)),
    ):
        torch.manual_seed(0)
        models[name] = build().cuda().to(torch.bfloat16)
    rows = []
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for length in args.model_lengths:
            for batch in args.model_batches:
                ids = torch.randint(3, bst_config.vocab_size, (batch, length), device="cuda")

                def fwd(model=model, ids=ids):
                    with torch.no_grad():
                        model(ids, use_cache=False)

                def fwd_bwd(model=model, ids=ids):
                    model(ids, labels=ids, use_cache=False).loss.backward()
                    model.zero_grad(set_to_none=True)

                attention = model.config._attn_implementation if name == "llama" else "blocks: 2H-head is_causal SDPA"
                result = dict(model=name, attention=attention, params_m=round(params, 1), length=length, batch=batch)
                for key, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
                    ms = measure(fn, 2)
                    result[f"{key}_tokens_per_s"] = ms if isinstance(ms, str) else round(batch * length / ms * 1e3)
                rows.append(result)
                print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=ints, default=[4096, 16384, 65536])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument(
        "--reference-max-length",
        type=int,
        default=16384,
        help="skip the torch reference layer above this length (its FFT recursion is slow)",
    )
    parser.add_argument("--model-lengths", type=ints, default=[4096, 16384])
    parser.add_argument("--model-batches", type=ints, default=[1, 4])
    parser.add_argument(
        "--llama-intermediate",
        type=int,
        default=4096,
        help="Llama FFN width: 4096 matches the BST's parameter count (its cross-attention weights)",
    )
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    started = time.time()
    layers = layer_benchmark(args)
    models = [] if args.skip_model else model_benchmark(args)
    device = torch.cuda.get_device_name()
    window = "flash_attn window_size" if flash_attn_func else "blockwise SDPA band mask"
    print(
        f"\n## BST-SH layer vs attention ({device}; B={args.batch}, D={args.width}, H={args.heads}, W={args.block}, "
        f"N={args.state}; window attention: {window})\n"
    )
    print(markdown(layers))
    if models:
        print("\n## Whole model tokens/s (bf16)\n")
        print(markdown(models))
    payload = dict(
        device=device,
        torch=torch.__version__,
        args=vars(args),
        layers=layers,
        models=models,
        window_impl="flash_attn" if flash_attn_func else "blockwise_sdpa",
        seconds=round(time.time() - started),
    )
    save_results("block_state.json", payload)
    print(f"\nwrote {RESULTS / 'block_state.json'} in {payload['seconds']} s")


if __name__ == "__main__":
    main()
