"""Where a decoding step of plain `model.generate` spends its GPU time, for the models of bench_generate.py.

    python kernels/profile_generate.py [--models block-state-200m-sh,llama-200m] [--batch 1] [--prompt 8192]
        [--new 33] [--top 20]

Per model, in its compiled mode: generate(new) and generate(1) are profiled after two warm-up calls; their
difference over new - 1 is one decoding step (the prefill cancels). Prints the step's wall time, its GPU busy time
(the sum of its kernels) and its kernels by GPU time.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from bench_generate import MODELS, build, generate_tokens, random_prompt


def kernel_times(model, ids, tokens: int, kwargs) -> tuple[float, Counter, Counter]:
    """Wall seconds of generate(tokens), and per kernel its GPU microseconds and launches."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate_tokens(model, ids, tokens, kwargs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    busy, launches = Counter(), Counter()
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            busy[event.name] += event.device_time
            launches[event.name] += 1
    return wall, busy, launches


def profile(name: str, mode: str, batch: int, prompt: int, new: int, top: int) -> None:
    model = build(name, torch.bfloat16)
    kwargs = MODELS[name][1][mode]
    ids = random_prompt(model, batch, prompt)
    for _ in range(2):
        generate_tokens(model, ids, new, kwargs)
    wall_one, busy_one, launches_one = kernel_times(model, ids, 1, kwargs)
    wall, busy, launches = kernel_times(model, ids, new, kwargs)
    steps = new - 1
    busy.subtract(busy_one)
    launches.subtract(launches_one)
    step_busy = sum(busy.values()) / steps / 1e3
    print(
        f"## {name}, {mode}, batch {batch}, prompt {prompt}: one decoding step {1e3 * (wall - wall_one) / steps:.2f} "
        f"ms wall (profiled), GPU busy {step_busy:.2f} ms in {sum(launches.values()) / steps:.0f} kernels"
    )
    for kernel, micros in busy.most_common(top):
        print(f"{micros / steps:9.1f} us {launches[kernel] / steps:5.1f}x  {kernel[:100]}")
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="block-state-200m-sh,llama-200m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--new", type=int, default=33)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    for name in args.models.split(","):
        compiled = next(mode for mode in MODELS[name][1] if "compiled" in mode)
        profile(name, compiled, args.batch, args.prompt, args.new, args.top)


if __name__ == "__main__":
    main()
