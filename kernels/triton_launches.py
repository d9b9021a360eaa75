"""Triton kernel launches recorded in the interpreter and compiled for sm_90 on any machine, no GPU needed.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which executes their Python without the
compiler's type checks: a loop-carried variable that changes shape passes there and fails to compile on a GPU.
`recorded_launches` records each distinct launch's specialization (argument types, constexprs, warps) while the
interpreter runs it; `compile_for_hopper` compiles the records for sm_90a down to a cubin, in a process of its own
(the compiler does not run where the interpreter is switched on), and returns per launch its failure or what ptxas
reports: registers per thread, stack frame and spill bytes.

    TRITON_INTERPRET=1 python kernels/triton_launches.py [--head-dim 64] [--out triton_registers.md]

prints that report for the TTT kernels at a real head size: a training step and two decoding steps of one-layer
TTT-Linear and TTT-MLP models (Mamba backbone, mini-batch 16, bf16, the products the GPU takes), then for the TTT-MLP
chunk kernels' candidate launches that kernels/tune_ttt.py times on a GPU, and writes it to kernels/results/<--out>.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from datetime import date
from types import SimpleNamespace
from unittest import mock

import torch
from bench_common import result_paths
from triton.runtime.interpreter import InterpretedFunction

POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.bool: "*i1",
}

COMPILE = r"""
import contextlib, importlib, io, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed as each launch compiles
reports = []
for launch in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature = launch["signature"] | dict.fromkeys(launch["constexprs"], "constexpr")
    source = ASTSource(kernel, signature, constexprs=launch["constexprs"])
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        assert compiled.asm["cubin"]
    except Exception as error:
        reports.append({"error": f"{launch['module']}.{launch['name']} {launch['constexprs']}: {error}"[-4000:]})
        continue
    text = log.getvalue()
    numbers = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None
    reports.append({
        "registers": numbers(r"Used (\d+) registers"),
        "stack_bytes": numbers(r"(\d+) bytes stack frame"),
        "spill_store_bytes": numbers(r"(\d+) bytes spill stores"),
        "spill_load_bytes": numbers(r"(\d+) bytes spill loads"),
    })
print(json.dumps(reports))
"""


def _argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _launch(kernel: InterpretedFunction, args: tuple, kwargs: dict) -> dict:
    """A launch's specialization, as `triton.compile` takes it."""
    parameters = inspect.signature(kernel.fn).parameters
    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k in parameters}
    signature, constexprs = {}, {}
    for name, parameter in parameters.items():
        value = values.get(name, parameter.default)
        if "constexpr" in str(parameter.annotation) or value is None:
            constexprs[name] = value
        else:
            signature[name] = _argument_type(value)
    options = {k: v for k, v in kwargs.items() if k not in parameters}
    module, name = kernel.fn.__module__, kernel.fn.__name__
    return dict(module=module, name=name, signature=signature, constexprs=constexprs, options=options)


@contextmanager
def recorded_launches():
    """Yields a dict that fills with every distinct kernel launch of the interpreter (which still runs them)."""
    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launch = _launch(self, args, kwargs)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    with mock.patch.object(InterpretedFunction, "run", recording_run):
        yield launches


def compile_for_hopper(launches: list[dict]) -> list[dict]:
    """Per launch, {"error": ...} or ptxas's registers, stack_bytes, spill_store_bytes and spill_load_bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_ALWAYS_COMPILE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE], input=json.dumps(launches), env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    return json.loads(result.stdout.splitlines()[-1])


@contextmanager
def gpu_products():
    """The products the TTT kernels take on the GPU for half-precision inputs, instead of the interpreter's TF32
    (only the specializations are wanted: the interpreter's bf16 products are not meaningful numbers)."""
    from ttt_hf.ttt import ttt_triton_common, ttt_triton_linear, ttt_triton_mlp

    def on_gpu(x: torch.Tensor, half: str = "bf16") -> str:  # the rule itself, asked about a CUDA tensor
        return ttt_triton_common._precision(SimpleNamespace(dtype=x.dtype, is_cuda=True), half)

    with ExitStack() as stack:
        for module in (ttt_triton_linear, ttt_triton_mlp):  # the modules whose launches choose products
            stack.enter_context(mock.patch.object(module, "_precision", on_gpu))
        yield


def ttt_step_launches(head_dim: int) -> list[dict]:
    """The launches of a training step over two mini-batches and two decoding steps of one-layer TTT-Linear and
    TTT-MLP models with one head of `head_dim`, in bf16."""
    from ttt_hf import TTTConfig, TTTForCausalLM

    with recorded_launches() as launches, gpu_products(), torch.no_grad():
        for layer_type in ("linear", "mlp"):
            config = TTTConfig(
                vocab_size=96,
                hidden_size=head_dim,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=1,
                mini_batch_size=16,
                ttt_layer_type=layer_type,
                kernel_backend="triton",
                pad_token_id=0,
            )
            torch.manual_seed(0)
            model = TTTForCausalLM(config).to(torch.bfloat16)
            ids = torch.randint(1, 96, (1, 32))
            with torch.enable_grad():
                model.train()
                model(ids, labels=ids, use_cache=False).loss.backward()
            model.eval()
            model.generate(ids[:, :30], attention_mask=torch.ones_like(ids[:, :30]), max_new_tokens=2)
    return list(launches.values())


def mlp_candidate_launches(launches: list[dict]) -> list[tuple[tuple[str, dict], dict]]:
    """(kernel, change) and the launch of each TTT-MLP chunk kernel with each of `tune_ttt.MLP_CANDIDATES`' changes
    to its default (the forward as it runs without the backward's recomputation), from the recorded `launches`."""
    from tune_ttt import MLP_CANDIDATES

    from ttt_hf.ttt import ttt_triton_mlp

    variants = []
    for kernel, changes in MLP_CANDIDATES.items():
        name = f"_ttt_mlp_chunk_{kernel}_kernel"
        recorded = next(x for x in launches if x["name"] == name and not x["constexprs"].get("STARTS"))
        constexprs = recorded["constexprs"]
        q = torch.empty(1, 1, 1, constexprs["MB"], constexprs["F"], dtype=torch.bfloat16)
        for change in [{}, *changes]:
            launch = ttt_triton_mlp.LAUNCH | {kernel: ttt_triton_mlp.LAUNCH[kernel] | change}
            with mock.patch.object(ttt_triton_mlp, "LAUNCH", launch), gpu_products():
                meta = ttt_triton_mlp._meta(q, kernel)
            options = {key: meta.pop(key) for key in ("num_warps", "num_stages")}
            variant = recorded | {"constexprs": constexprs | meta, "options": recorded["options"] | options}
            variants.append(((kernel, change), variant))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", default="triton_registers.md", help="result file name in kernels/results/")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run with TRITON_INTERPRET=1: the launches are recorded in Triton's interpreter")
    launches = ttt_step_launches(args.head_dim)
    lines = [
        f"`TRITON_INTERPRET=1 python kernels/triton_launches.py --head-dim {args.head_dim}` on {date.today()}: no "
        f"GPU, ptxas of triton {sys.modules['triton'].__version__} for sm_90a.",
        "",
        f"## TTT kernels compiled for sm_90a, head dim {args.head_dim}, mini-batch 16, bf16",
        "",
        "| kernel | constexprs | warps | stages | registers | stack B | spill stores B | spill loads B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    candidates = mlp_candidate_launches(launches)
    reports = compile_for_hopper(launches + [launch for _, launch in candidates])
    for report in reports:
        if "error" in report:
            raise RuntimeError(report["error"])
    for launch, report in zip(launches, reports):
        constexprs = ", ".join(f"{k}={v}" for k, v in launch["constexprs"].items() if k.isupper() and v is not None)
        lines.append(
            f"| {launch['name']} | {constexprs} | {launch['options'].get('num_warps', 4)} | "
            f"{launch['options'].get('num_stages', 3)} | {report['registers']} | {report['stack_bytes']} | "
            f"{report['spill_store_bytes']} | {report['spill_load_bytes']} |"
        )
    lines += [
        "",
        "## TTT-MLP chunk kernels with the candidate launches of kernels/tune_ttt.py",
        "",
        "| kernel | change to the default | BLOCK | warps | stages | products | registers | stack B | spill stores B "
        "| spill loads B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ((kernel, change), launch), report in zip(candidates, reports[len(launches) :]):
        options, constexprs = launch["options"], launch["constexprs"]
        lines.append(
            f"| {kernel} | {change or 'default'} | {constexprs['BLOCK']} | {options['num_warps']} | "
            f"{options['num_stages']} | {constexprs['PRECISION']} | {report['registers']} | {report['stack_bytes']} | "
            f"{report['spill_store_bytes']} | {report['spill_load_bytes']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    for path in result_paths(args.out):
        path.write_text(text)


if __name__ == "__main__":
    main()
