"""Bytes one decoder layer keeps for its backward, per token and by module: TTT-Linear and TTT-MLP layers of the
125M or 1.3B configs (Mamba backbone, Triton kernels) against a Llama layer of the same width and FFN (SDPA), bf16,
no GPU needed.

One-layer models train one step over `--length` tokens with every tensor saved for backward counted once (by
storage), parameters excluded, and charged to the innermost module whose forward saved it. Peak training memory
also holds what the backward allocates; this counts what a long sequence keeps alive between the passes.

    TRITON_INTERPRET=1 python kernels/saved_activations.py [--size 125m] [--length 512] [--group 0]
        [--out saved_activations.md]
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from datetime import date

import torch
from bench_common import ROOT, result_paths
from bench_ttt_model import llama_like

from ttt_hf import TTTConfig, TTTForCausalLM


def one_layer_models(group: int, size: str = "125m") -> dict[str, torch.nn.Module]:
    models = {}
    for layer_type, name in (("linear", "TTT-Linear"), ("mlp", "TTT-MLP")):
        config = TTTConfig.from_json_file(ROOT / "configs" / f"ttt-{size}-{layer_type}-mamba.json")
        config.num_hidden_layers, config.kernel_backend = 1, "triton"
        config.scan_checkpoint_group_size = group
        models[f"{name} {size.upper()}"] = TTTForCausalLM(config)
    models[f"Llama {size.upper()} (SDPA)"] = llama_like(config, torch.bfloat16, device="cpu")
    return models


def saved_bytes_by_module(model: torch.nn.Module, length: int) -> Counter:
    """Bytes saved for backward by each module of the model's layer 0 (innermost module that saved them)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[tuple[int, torch.dtype]] = set()
    scope = ["(outside the layer)"]
    by_module: Counter = Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and key[0] not in parameters:
            seen.add(key)
            by_module[scope[-1]] += t.untyped_storage().nbytes()
        return t

    handles = []
    for name, module in model.model.layers[0].named_modules(prefix="layer"):
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: scope.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: scope.pop() and None))
    ids = torch.randint(3, model.config.vocab_size, (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    for handle in handles:
        handle.remove()
    return by_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("125m", "1.3b"), default="125m", help="the TTT config's size")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--group", type=int, default=0, help="TTT's scan_checkpoint_group_size (0: groups of 16)")
    parser.add_argument("--out", default="saved_activations.md", help="result file name in kernels/results/")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run with TRITON_INTERPRET=1 (the Triton kernels run in the interpreter)")
    lines = [
        f"`TRITON_INTERPRET=1 python kernels/saved_activations.py --size {args.size} --length {args.length} "
        f"--group {args.group}` on "
        f"{date.today()} (CPU, torch {torch.__version__}).",
        "",
        f"## Bytes saved for backward per token by one decoder layer, {args.length} tokens, bf16",
    ]
    for name, model in one_layer_models(args.group, args.size).items():
        torch.manual_seed(0)
        by_module = saved_bytes_by_module(model.to(torch.bfloat16).train(), args.length)
        layer = {module: nbytes for module, nbytes in by_module.items() if module.startswith("layer")}
        lines += ["", f"### {name}: {sum(layer.values()) / args.length:,.0f} B per token", ""]
        lines += ["| module | B per token |", "|---|---|"]
        lines += [f"| {module} | {nbytes / args.length:,.0f} |" for module, nbytes in Counter(layer).most_common()]
    text = "\n".join(lines) + "\n"
    print(text)
    for path in result_paths(args.out):
        path.write_text(text)


if __name__ == "__main__":
    main()
