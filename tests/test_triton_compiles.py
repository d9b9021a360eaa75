"""Every Triton kernel, as tiny forwards, backwards and decoding steps of each family launch it, compiled for sm_90.

The CPU tests run the kernels in Triton's interpreter, which executes their Python without the compiler's type
checks: a loop-carried variable that changes shape or a block where a scalar belongs passes there and fails to
compile on a GPU. Here each launch's specialization (argument types, constexprs, warps) is recorded from the
interpreter and compiled for sm_90 down to a cubin, no GPU needed, in a process of its own (the compiler does not
run where the interpreter is switched on).
"""

import inspect
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
from block_state_testing import tiny_model as block_state_model  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from ttt_testing import random_ids  # noqa: E402
from ttt_testing import tiny_model as ttt_model  # noqa: E402

from ttt_hf.tova.tova_triton import tova_attention_evict_one_triton, tova_evict_one_triton  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")

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

COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures = []
for launch in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    signature = launch["signature"] | dict.fromkeys(launch["constexprs"], "constexpr")
    source = ASTSource(kernel, signature, constexprs=launch["constexprs"])
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        assert compiled.asm["cubin"]
    except Exception as error:
        failures.append(f"{launch['module']}.{launch['name']} {launch['constexprs']}: {error}"[-4000:])
print(json.dumps(failures))
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
    """Records every distinct kernel launch of the interpreter (and still runs it)."""
    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launch = _launch(self, args, kwargs)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    with mock.patch.object(InterpretedFunction, "run", recording_run):
        yield launches


def _train_and_decode(model, dtype: torch.dtype, length: int) -> None:
    """A training step over `length` tokens, then a prefill of all but the last two and two decoding steps."""
    model = model.to(dtype)
    ids = random_ids(1, length)
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    model.eval()
    with torch.no_grad():
        model.generate(ids[:, :-2], attention_mask=torch.ones_like(ids[:, :-2]), max_new_tokens=2, do_sample=False)


def _tova_steps(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(2, h, n, 16, generator=generator).to(dtype) for h, n in ((4, 1), (2, 9), (2, 9)))
    positions = torch.arange(9).expand(2, 9).contiguous()
    for fn in (tova_attention_evict_one_triton, tova_evict_one_triton):
        fn(query[:, :, -1], keys, values, positions, None, 0.25, None, None, 0, False)


def test_every_kernel_compiles_for_hopper():
    with recorded_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            for layer_type in ("linear", "mlp"):  # the chunk kernels take mini-batches and heads of 16 or more
                model = ttt_model(
                    layer_type, "mamba", kernel_backend="triton", mini_batch_size=16, num_attention_heads=2
                )
                _train_and_decode(model, dtype, length=20)
            _train_and_decode(block_state_model(context_mode="sh", kernel_backend="triton"), dtype, length=9)
            _tova_steps(dtype)
    modules = {launch["module"] for launch in launches.values()}
    assert {"ttt_hf.ttt.ttt_triton_linear", "ttt_hf.ttt.ttt_triton_mlp", "ttt_hf.ttt.ttt_triton_decode"} <= modules
    assert {"ttt_hf.block_state.block_state_triton", "ttt_hf.tova.tova_triton"} <= modules
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE],
        input=json.dumps(list(launches.values())),
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    failures = json.loads(result.stdout.splitlines()[-1])
    assert not failures, "\n\n".join(failures)
