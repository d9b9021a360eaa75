"""Helpers shared by the benchmark scripts of this folder (run them as `python kernels/<script>.py`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ttt_hf import TTTConfig, TTTForCausalLM

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "kernels" / "results"


def cuda_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Mean seconds of `fn()` over `repeats` runs after `warmup` runs, between CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def capture(step: Callable[[], object], warm_up: Callable[[], object] | None = None) -> Callable[[], None]:
    """`step` captured in a CUDA graph after three `warm_up` calls (default: `step` itself) on a side stream, so
    that Triton compiles and allocators settle outside the capture; returns the replay."""
    warm_up = warm_up or step
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            warm_up()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def ttt_model(name: str, backend: str, dtype: torch.dtype, **overrides) -> TTTForCausalLM:
    """A random-weight TTT model of configs/<name>.json on the GPU, in eval mode, with `kernel_backend` and
    any other config field set."""
    config = TTTConfig.from_json_file(ROOT / "configs" / f"{name}.json")
    config.kernel_backend = backend
    config.max_position_embeddings = 1 << 16
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return TTTForCausalLM(config).to("cuda", dtype).eval()


def pyplot():
    """matplotlib's pyplot drawing to files only, or None where matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def result_paths(name: str) -> list[Path]:
    """Where a result file goes: kernels/results/, and $OUT when set (a second folder for the results)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return [RESULTS / name] + ([Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else [])


def save_results(name: str, results: dict) -> None:
    text = json.dumps(results, indent=2)
    for path in result_paths(name):
        path.write_text(text)
