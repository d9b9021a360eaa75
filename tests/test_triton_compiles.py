"""Every Triton kernel, as tiny forwards, backwards and decoding steps of each family launch it, compiled for sm_90.

The CPU tests run the kernels in Triton's interpreter, which executes their Python without the compiler's type
checks: a loop-carried variable that changes shape or a block where a scalar belongs passes there and fails to
compile on a GPU. Here each launch's specialization (argument types, constexprs, warps) is recorded from the
interpreter and compiled for sm_90 down to a cubin, no GPU needed (`kernels/triton_launches.py`).
"""

import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
from block_state_testing import tiny_model as block_state_model  # noqa: E402
from triton_launches import compile_for_hopper, gpu_products, recorded_launches  # noqa: E402
from ttt_testing import random_ids  # noqa: E402
from ttt_testing import tiny_model as ttt_model  # noqa: E402

from ttt_hf.tova.tova_triton import tova_attention_evict_one_triton, tova_evict_one_triton  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernels themselves")


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
    with recorded_launches() as launches, gpu_products():  # the half-precision products the GPU takes
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
    failures = [report["error"] for report in compile_for_hopper(list(launches.values())) if "error" in report]
    assert not failures, "\n\n".join(failures)
