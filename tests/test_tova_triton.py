"""The split-parallel TOVA score-and-evict Triton kernels against the torch path (the numerical definition):
scores, victims and the kept keys/values/positions after the swap-remove, exactly; the fused route's attention
output against SDPA (or a torch reference where SDPA lacks soft-capping and sinks).

CPU: Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU), tiny sizes and tiny splits. GPU-marked
tests repeat the comparisons at real sizes and in bf16.
"""

import argparse
import importlib
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_testing import cache_arg
from tova_testing import CASES, assert_kept_positions, official_generation
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
)
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.integrations.sdpa_paged import sdpa_attention_paged_forward

from ttt_hf import TOVACache
from ttt_hf.tova import tova_attention, tova_ops
from ttt_hf.tova.cache_tova import TOVALayer
from ttt_hf.tova.tova_ops import last_query_scores, victims

pytest.importorskip("triton")
from ttt_hf.tova import tova_triton
from ttt_hf.tova.tova_triton import tova_attention_evict_one_triton, tova_evict_one_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_eviction(
    query, keys, values, positions, mask, scaling, softcap=None, sinks=None, num_sink_tokens=0, policy="tova"
):
    """The torch path on copies: scores, the victim slots, and the kept keys/values/positions after the swap-remove."""
    n = keys.shape[2]
    scores = last_query_scores(None, query, keys, mask, scaling, softcap, sinks)
    evicted = victims(scores, positions, policy, num_sink_tokens)
    layer = TOVALayer(n)
    layer._hold((keys.clone(), values.clone(), positions.clone()), n)
    layer.swap_remove(evicted)
    return scores, evicted, layer.keys, layer.values, layer.positions


def reference_attention(query, keys, values, mask, scaling, softcap=None, sinks=None):
    """The last query's attention output [B, 1, Hq, dv] in fp64 from the same inputs, rounded to their dtype: SDPA,
    or by hand with soft-capping and gpt-oss sinks (an extra logit per head in the denominator only), which SDPA
    does not apply."""
    dtype = query.dtype
    query, keys, values = query[:, :, -1:].double(), keys.double(), values.double()
    if mask is not None:
        mask = mask[:, :, -1:] if mask.dtype == torch.bool else mask[:, :, -1:].double()
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.to(dtype).transpose(1, 2)
    group = query.shape[1] // keys.shape[1]
    keys, values = (t.repeat_interleave(group, dim=1) for t in (keys, values))
    logits = query @ keys.transpose(-1, -2) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    if sinks is not None:
        logits = torch.cat([logits, sinks.double().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., : keys.shape[2]]
    return (probs @ values).to(dtype).transpose(1, 2)


def kernel_eviction(
    query,
    keys,
    values,
    positions,
    mask,
    scaling,
    softcap=None,
    sinks=None,
    num_sink_tokens=0,
    policy="tova",
    fused=False,
):
    """The kernel on copies held in buffers one slot longer than the cache (as TOVALayer holds them); fused: the
    attention, score and evict kernel, whose output comes last (None otherwise)."""
    buffers = [
        torch.cat([t, torch.full_like(t.narrow(-2 if t.dim() == 4 else 1, 0, 1), 7)], dim=-2 if t.dim() == 4 else 1)
        for t in (keys, values, positions)
    ]
    n = keys.shape[2]
    k, v, p = buffers[0][:, :, :n], buffers[1][:, :, :n], buffers[2][:, :n]
    row = None if mask is None else mask[:, 0, -1]
    args = (query[:, :, -1], k, v, p, row, scaling, softcap, sinks, num_sink_tokens, policy == "window")
    output = None
    if fused:
        output, scores, evicted = tova_attention_evict_one_triton(*args)
    else:
        scores, evicted = tova_evict_one_triton(*args)
    return scores, evicted, k[:, :, : n - 1], v[:, :, : n - 1], p[:, : n - 1], buffers, output


def random_case(batch, q_heads, kv_heads, n, dim, dtype=torch.float32, mask_kind=None, seed=0, value_dim=None):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, 2, dim, generator=generator) * 2
    keys = torch.randn(batch, kv_heads, n, dim, generator=generator)
    values = torch.randn(batch, kv_heads, n, value_dim or dim, generator=generator)
    positions = torch.arange(n).expand(batch, n) + 5 * torch.arange(batch)[:, None]
    real = torch.ones(batch, n, dtype=torch.bool)
    if batch > 1:
        real[1, :3] = False  # row 1 is left-padded by 3 slots
    mask = None
    if mask_kind == "bool":
        mask = real[:, None, None, :].expand(batch, 1, 2, n)
    elif mask_kind == "additive":
        bias = torch.where(real, -0.25 * torch.rand(batch, n, generator=generator), torch.finfo(dtype).min)
        mask = bias.to(dtype)[:, None, None, :].expand(batch, 1, 2, n)
    return (
        query.to(DEVICE, dtype),
        keys.to(DEVICE, dtype),
        values.to(DEVICE, dtype),
        positions.contiguous().to(DEVICE),
        None if mask is None else mask.to(DEVICE),
    )


def check_against_reference(case, scaling, tolerance=1e-6, fused=False, **options):
    """The eviction exactly as the torch path's; fused: also the attention output, read before the eviction."""
    if fused:
        query, keys, values, _, mask = case
        attention = reference_attention(
            query, keys, values, mask, scaling, options.get("softcap"), options.get("sinks")
        )
    expected = reference_eviction(*case, scaling, **options)
    got = kernel_eviction(*case, scaling, fused=fused, **options)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=tolerance)
    assert torch.equal(torch.isinf(got[0]), torch.isinf(expected[0]))
    assert torch.equal(got[1].long(), expected[1])
    for tensor, reference in zip(got[2:5], expected[2:5]):
        assert torch.equal(tensor, reference)
    if fused:  # fp32: fp32 sums; 16-bit: the weights rounded for the product with the values, and the output
        assert got[6].dtype == attention.dtype and got[6].shape == attention.shape
        exact = attention.dtype == torch.float32
        torch.testing.assert_close(got[6], attention, rtol=1e-5 if exact else 1.6e-2, atol=1e-5 if exact else 1e-2)
    return got


@pytest.fixture(params=[8, tova_triton.SPLIT], ids=["split8", "split-default"])
def split(request, monkeypatch):
    """Tiny splits (several per row, combined two at a time) as well as the real split size."""
    monkeypatch.setattr(tova_triton, "SPLIT", request.param)
    if request.param == 8:
        monkeypatch.setattr(tova_triton, "MAX_CHUNK", 2)
    return request.param


@pytest.fixture(params=[False, True], ids=["evict", "fused"])
def fused(request):
    """The score-and-evict kernels alone, and fused with the attention (the same eviction, plus the output)."""
    return request.param


@pytest.mark.parametrize("q_heads, kv_heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_scores_and_eviction_match_the_torch_path(q_heads, kv_heads, mask_kind, split, fused):
    check_against_reference(random_case(2, q_heads, kv_heads, 11, 16, mask_kind=mask_kind), 0.3, fused=fused)


def test_softcapping_sinks_odd_head_dims_and_long_rows(split, fused):
    # 150 slots: 19 splits of 8 (the last one partial), or 2 of 128; head dims 24 / 40 are padded in the kernel;
    # groups of 3 query heads.
    case = random_case(2, 6, 2, 150, 24, mask_kind="bool", seed=1, value_dim=40)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -3.0], device=DEVICE)
    check_against_reference(case, 0.2, softcap=3.0, sinks=sinks, fused=fused)


@pytest.mark.parametrize("policy", ["tova", "window"])
def test_sink_tokens_and_window_policy(policy, split, fused):
    got = check_against_reference(
        random_case(2, 4, 2, 12, 16, mask_kind="bool", seed=2), 0.3, num_sink_tokens=2, policy=policy, fused=fused
    )
    if policy == "window":  # the oldest real token after the 2 sinks goes; row 1 first drops a pad
        assert got[1].tolist() == [2, 2]


@pytest.mark.parametrize("policy", ["tova", "window"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_positions_out_of_order_after_swap_removes(policy, mask_kind, split, fused):
    # As after decode steps: the real positions are shuffled (the newest token took evicted slots), pads stay left.
    query, keys, values, positions, mask = random_case(3, 4, 2, 37, 16, mask_kind=mask_kind, seed=9)
    generator = torch.Generator().manual_seed(9)
    for row in range(3):
        start = 3 if row == 1 else 0
        order = start + torch.randperm(37 - start, generator=generator).to(DEVICE)
        positions[row, start:] = positions[row, order]
    # Row 0's first real position (a sink) sits at slot 30 and is the least attended: it must stay.
    first = int(positions[0].argmin())
    positions[0, [first, 30]] = positions[0, [30, first]]
    keys[0, :, 30] = -query[0, :, -1].view(2, 2, -1).sum(1) * 4
    case = (query, keys, values, positions, mask)
    if policy == "tova":
        assert check_against_reference(case, 0.3, fused=fused)[1][0] == 30  # without sink tokens it goes
    got = check_against_reference(case, 0.3, num_sink_tokens=3, policy=policy, fused=fused)
    assert int(positions[0].min()) in got[4][0].tolist()
    assert got[1][1] == 2  # row 1: the highest pad goes first


def test_ties_across_splits_evict_the_highest_slot(split, fused):
    query, keys, values, positions, mask = random_case(2, 4, 2, 37, 16, seed=10)
    query[:, :, -1] = 1.0
    keys[:, :, [3, 13, 30]] = -1.0  # in splits 0, 1 and 3 of 8 slots
    got = check_against_reference((query, keys, values, positions, mask), 0.25, fused=fused)
    assert got[1].tolist() == [30, 30]


def test_ties_evict_the_highest_slot(split, fused):
    query, keys, values, positions, mask = random_case(2, 4, 2, 10, 16, mask_kind="bool", seed=3)
    query[:, :, -1] = 1.0
    keys[0, :, [1, 4, 6]] = -1.0  # three exactly equal least attended slots: slot 6 goes
    keys[1] = 0.5  # all equal: the pads (slots 0-2) tie at -inf, slot 2 goes, and the block stays on the left
    got = check_against_reference((query, keys, values, positions, mask), 0.25, fused=fused)
    assert got[1].tolist() == [6, 2]
    # Without padding every slot of row 1 ties: the newest (last) slot goes and nothing moves.
    got = check_against_reference((query, keys, values, positions, None), 0.25, fused=fused)
    assert got[1].tolist()[1] == 9
    assert torch.equal(got[5][0][1, :, :9], keys[1, :, :9])


def test_bf16_scores_are_exact_products(split, fused):
    check_against_reference(
        random_case(2, 4, 2, 40, 32, dtype=torch.bfloat16, mask_kind="additive", seed=4), 32**-0.5, fused=fused
    )


def tiny_model(config, attn_implementation="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).to(DEVICE).eval()
    with torch.no_grad():  # peaky attention, so that eviction decisions matter
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(4.0)
    return model


SMALL = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": None,
}
GEMMA2 = {**SMALL, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4, "final_logit_softcapping": None}
# name: (config, attn_implementation, cache options, the kernel each decode step of a full-attention layer runs)
MODELS = {
    "llama-gqa-padded": (lambda: LlamaConfig(**SMALL, num_key_value_heads=2), "sdpa", {}, "fused"),
    "llama-mha-window-sinks": (
        lambda: LlamaConfig(**SMALL, num_key_value_heads=4),
        "sdpa",
        {"num_sink_tokens": 2, "policy": "window"},
        "fused",
    ),
    "llama-mqa-window-sinks-eager": (
        lambda: LlamaConfig(**SMALL, num_key_value_heads=1),
        "eager",
        {"num_sink_tokens": 2, "policy": "window"},
        "evict",
    ),
    "gemma3-sliding-layers": (
        lambda: Gemma3TextConfig(**GEMMA2, layer_types=["sliding_attention", "full_attention"]),
        "sdpa",
        {},
        "fused",
    ),
    # SDPA ignores soft-capping (the scores apply it): the fused kernel would not compute what SDPA does.
    # (transformers >= 5.23 refuses sdpa for Gemma 2: the case is then skipped.)
    "gemma2-softcap-sdpa": (lambda: Gemma2Config(**GEMMA2, attn_logit_softcapping=5.0), "sdpa", {}, "evict"),
    "gemma2-softcap-eager": (lambda: Gemma2Config(**GEMMA2, attn_logit_softcapping=5.0), "eager", {}, "evict"),
}


def count_kernel_calls(monkeypatch) -> dict[str, list]:
    """Records the calls of the fused attention kernel and of the score-and-evict kernel by TOVACache."""
    calls = {"fused": [], "evict": []}
    for kind, name, kernel in (
        ("fused", "tova_attention_evict_one_triton", tova_attention_evict_one_triton),
        ("evict", "tova_evict_one_triton", tova_evict_one_triton),
    ):

        def counted(*args, kind=kind, kernel=kernel, **kwargs):
            calls[kind].append(1)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(tova_ops, name, counted)
    return calls


@pytest.mark.parametrize("name", MODELS)
def test_generation_with_the_kernel_equals_the_torch_path(name, monkeypatch):
    # The fused route for sdpa (unless the call applies what SDPA does not), score-and-evict after "eager".
    make_config, attn_implementation, options, kernel = MODELS[name]
    if name == "gemma2-softcap-sdpa" and not Gemma2ForCausalLM._supports_sdpa:
        pytest.skip("this transformers version has no sdpa attention for Gemma 2")
    model = tiny_model(make_config(), attn_implementation)
    prompt = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    calls = count_kernel_calls(monkeypatch)
    results = {}
    for backend in ("torch", "triton"):
        cache = TOVACache(6, kernel_backend=backend, **options)
        out = model.generate(prompt, attention_mask=mask, **cache_arg(cache), max_new_tokens=7, do_sample=False)
        results[backend] = out, [cache.kept_positions(i) for i in range(len(cache.layers))]
    full_layers = 1 if name.startswith("gemma") else 2  # a Gemma sliding layer keeps its window by torch
    # 9 -> 6 tokens by the torch path at prefill, then a kernel each step
    assert {kind: len(c) for kind, c in calls.items()} == {kind: 6 * full_layers * (kind == kernel) for kind in calls}
    assert torch.equal(results["torch"][0], results["triton"][0])
    for torch_kept, triton_kept in zip(results["torch"][1], results["triton"][1]):
        assert torch.equal(torch_kept, triton_kept)


def _user_flash_attention(module, query, key, value, attention_mask, **kwargs):
    """A user's function registered under a flash-like name (it could add a bias from module attributes)."""


@pytest.mark.parametrize(
    "function, kwargs, training, fusable",
    [
        (sdpa_attention_forward, {"dropout": 0.0, "scaling": 0.25}, False, True),
        (flash_attention_forward, {"softcap": 5.0, "s_aux": torch.zeros(4)}, False, True),  # also hub flash kernels
        (flex_attention_forward, {"softcap": 5.0}, False, True),
        (None, {}, False, False),  # eager: each model's own function
        (sdpa_attention_paged_forward, {}, False, False),
        (_user_flash_attention, {}, False, False),
        (sdpa_attention_forward, {"softcap": 5.0}, False, False),
        (sdpa_attention_forward, {"s_aux": torch.zeros(4)}, False, False),
        (sdpa_attention_forward, {"dropout": 0.1}, False, False),
        (sdpa_attention_forward, {}, True, False),
        (sdpa_attention_forward, {"sliding_window": 4}, False, False),
        (flash_attention_forward, {"cu_seq_lens_q": torch.zeros(2)}, False, False),
    ],
    ids=[
        "sdpa",
        "flash",
        "flex",
        "eager",
        "paged-sdpa",
        "user-function",
        "sdpa-softcap",
        "sdpa-sinks",
        "dropout",
        "training",
        "sliding-kwarg",
        "packed",
    ],
)
def test_which_attention_calls_fuse(function, kwargs, training, fusable):
    module = torch.nn.Module().train(training)
    assert tova_attention._fusable_call(function, module, torch.zeros(1, 4, 1, 8), (), kwargs) is fusable
    assert not tova_attention._fusable_call(function, module, torch.zeros(1, 4, 2, 8), (), kwargs)  # one query only
    module.sliding_window = 4
    assert not tova_attention._fusable_call(function, module, torch.zeros(1, 4, 1, 8), (), kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_at_the_budget_keeps_its_buffers(backend):
    # What a CUDA graph of the step needs: the same buffers every step, positions from the device counter.
    model = tiny_model(LlamaConfig(**SMALL, num_key_value_heads=2))
    cache = TOVACache(6, kernel_backend=backend)
    prompt = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    with torch.no_grad():
        token = model(prompt, **cache_arg(cache)).logits[:, -1:].argmax(-1)
        pointers = None
        for step in range(5):
            position = torch.full((2, 1), 9 + step, device=DEVICE)
            token = model(token, position_ids=position, **cache_arg(cache)).logits[:, -1:].argmax(-1)
            now = [
                tuple(t.data_ptr() for t in (layer.keys, layer.values, layer.positions, layer._next_position))
                for layer in cache.layers
            ]
            assert pointers in (None, now)
            pointers = now
    for layer in cache.layers:
        assert layer.physical_length == 6 and int(layer._next_position) == 14 == layer.seen


def test_reproduces_an_official_generation_with_the_kernel():
    out, data, cache = official_generation("prompt_shorter", device=DEVICE, kernel_backend="triton")
    assert torch.equal(out, data["generated"])
    assert_kept_positions(cache, data)


def test_auto_uses_the_kernels_only_on_cuda(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    model = tiny_model(LlamaConfig(**SMALL, num_key_value_heads=2))
    cache = TOVACache(7)
    with torch.no_grad():
        token = model(torch.randint(3, 128, (1, 8), device=DEVICE), **cache_arg(cache)).logits[:, -1:].argmax(-1)
        model(token, **cache_arg(cache))  # 8 -> 7 slots after SDPA by score-and-evict, then the fused decode step
    per_layer = 1 if DEVICE == "cuda" else 0
    assert {kind: len(c) for kind, c in calls.items()} == {"fused": 2 * per_layer, "evict": 2 * per_layer}


def test_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="kernel_backend"):
        TOVACache(4, kernel_backend="cuda")
    monkeypatch.setattr(tova_ops, "tova_evict_one_triton", None)
    with pytest.raises(ImportError, match="triton"):
        TOVACache(4, kernel_backend="triton")
    monkeypatch.undo()
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        model = tiny_model(LlamaConfig(**SMALL, num_key_value_heads=2))
        with torch.no_grad(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            model(torch.randint(3, 128, (1, 8)), **cache_arg(TOVACache(7, kernel_backend="triton")))


@pytest.mark.parametrize("kernel", [tova_evict_one_triton, tova_attention_evict_one_triton])
def test_kernel_input_errors(kernel):
    query, keys, values, positions, _ = random_case(2, 4, 2, 11, 16)
    query = query[:, :, -1]
    with pytest.raises(ValueError, match="must match query"):
        kernel(query[..., :8], keys, values, positions, None, 0.25)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        kernel(query[:, :3], keys, values, positions, None, 0.25)
    with pytest.raises(ValueError, match="positions must be int64"):
        kernel(query, keys, values, positions.int(), None, 0.25)
    with pytest.raises(ValueError, match="mask_row"):
        kernel(query, keys, values, positions, torch.ones(2, 10, dtype=torch.bool, device=DEVICE), 0.25)
    with pytest.raises(ValueError, match="sinks"):
        kernel(query, keys, values, positions, None, 0.25, sinks=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        kernel(query, keys.transpose(-1, -2).contiguous().transpose(-1, -2), values, positions, None, 0.25)


def test_gradients_and_training_take_the_torch_path(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    model = tiny_model(LlamaConfig(**SMALL, num_key_value_heads=2))
    cache = TOVACache(7, kernel_backend="triton")
    ids = torch.randint(3, 128, (1, 10), device=DEVICE)
    loss = model(ids[:, :8], **cache_arg(cache)).logits.sum()  # a prompt over the budget
    (loss + model(ids[:, 8:9], **cache_arg(cache)).logits.sum()).backward()  # and a decode step at the budget
    assert calls == {"fused": [], "evict": []} and cache.layers[0].physical_length == 7
    model.train()  # no gradients, but attention dropout may apply: the model's attention, then score-and-evict
    with torch.no_grad():
        model(ids[:, 9:], **cache_arg(cache))
    assert {kind: len(c) for kind, c in calls.items()} == {"fused": 0, "evict": 2}


@pytest.mark.skipif(DEVICE == "cuda", reason="the benchmark itself runs on the GPU")
def test_benchmark_model_loop_runs_on_cpu(monkeypatch):
    # kernels/bench_tova.py's model part with a tiny Llama, the "graph" being the step itself: every cache runs,
    # the graph check restores the state (equal tokens), and the tables fill.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "kernels"))
    bench = importlib.import_module("bench_tova")

    def wall_time(fn, repeats, warmup=1):
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    monkeypatch.setattr(bench, "llama_1b", lambda: tiny_model(LlamaConfig(**SMALL, num_key_value_heads=2)))
    monkeypatch.setattr(bench, "capture", lambda step, warm_up=None: [(warm_up or step)() for _ in range(3)] and step)
    monkeypatch.setattr(bench, "cuda_time", wall_time)
    monkeypatch.setattr(bench, "ProfilerActivity", types.SimpleNamespace(CUDA=torch.profiler.ProfilerActivity.CPU))
    for name, value in (
        ("empty_cache", None),
        ("reset_peak_memory_stats", None),
        ("synchronize", None),
        ("max_memory_allocated", 0),
        ("get_device_name", "cpu"),
        ("get_device_properties", types.SimpleNamespace(total_memory=2**30)),
    ):
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    real_fits = bench.fits  # a device of 5 rows: the real fill and decode steps below, "out of memory" above
    monkeypatch.setattr(
        bench, "fits", lambda model, make_cache, batch, held: batch <= 5 and real_fits(model, make_cache, batch, held)
    )
    args = argparse.Namespace(context=40, batch=2, steps=3, chunk=16, cudnn_sdpa=False)
    measured = bench.max_batch_benchmark(args, [8, 12])
    assert measured == {"DynamicCache (full)": 5, "TOVACache 8, Triton": 5, "TOVACache 12, Triton": 5}
    out = bench.model_benchmark(args, [8, 12], measured)
    assert len(out["runs"]) == 8
    for name, row in out["runs"].items():
        assert "error" not in row and "graph_error" not in row, name
        assert row.get("graph_matches_eager", True) is True, name
        assert row.get("max_batch_measured", 5) == 5, name
    assert sum("max_batch_measured" in row for row in out["runs"].values()) == 3
    assert not any("failed" in line for line in out["tables"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_real_sizes_on_cuda(dtype, mask_kind, fused, no_tf32):
    check_against_reference(
        random_case(4, 32, 8, 1025, 64, dtype=dtype, mask_kind=mask_kind, seed=6), 0.125, fused=fused
    )
    case = random_case(2, 32, 8, 4097, 128, dtype=dtype, mask_kind=mask_kind, seed=7)
    check_against_reference(case, 128**-0.5, num_sink_tokens=4, fused=fused)
    # The benchmark's layer: 16 rows, 32 query and 8 KV heads, d = 64, 4097 slots
    case = random_case(16, 32, 8, 4097, 64, dtype=dtype, mask_kind=mask_kind, seed=8)
    check_against_reference(case, 0.125, fused=fused)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_softcapping_sinks_and_wide_heads_on_cuda(dtype, no_tf32):
    # Soft-capping and sinks (flash / flex kinds of Gemma 2 and gpt-oss), head dims up to 256 (smaller splits)
    sinks = torch.linspace(-2.0, 2.0, 16, device="cuda")
    for head_dim, value_dim in ((64, 64), (256, 256), (96, 160)):
        case = random_case(4, 16, 2, 2049, head_dim, dtype=dtype, mask_kind="bool", seed=head_dim, value_dim=value_dim)
        check_against_reference(case, head_dim**-0.5, softcap=20.0, sinks=sinks.to(dtype), fused=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_official_generations_with_the_kernel_on_cuda(case, no_tf32):
    out, data, _ = official_generation(case, device="cuda", kernel_backend="triton")
    assert torch.equal(out, data["generated"])


@pytest.mark.gpu
def test_bf16_generation_auto_equals_torch_on_cuda(monkeypatch):
    # SDPA, then score-and-evict: the same attention as the torch path, so the tokens are equal even in bf16 (the
    # fused kernel's bf16 output differs from SDPA's by rounding; see the next test)
    monkeypatch.setattr(tova_attention, "_FUSABLE_KINDS", {})
    model = tiny_model(LlamaConfig(**SMALL, num_key_value_heads=2)).to(torch.bfloat16)
    prompt = torch.randint(3, 128, (4, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    mask = torch.ones_like(prompt)
    mask[1, :13] = 0
    results = {}
    for backend in ("torch", "auto"):
        cache = TOVACache(16, kernel_backend=backend)
        out = model.generate(prompt, attention_mask=mask, **cache_arg(cache), max_new_tokens=48, do_sample=False)
        results[backend] = out, [cache.kept_positions(i) for i in range(len(cache.layers))]
    assert torch.equal(results["torch"][0], results["auto"][0])
    for torch_kept, auto_kept in zip(results["torch"][1], results["auto"][1]):
        assert torch.equal(torch_kept, auto_kept)


@pytest.mark.gpu
def test_bf16_fused_decode_step_on_cuda():
    # From the same bf16 state: the fused step's logits are SDPA's within bf16 rounding, its eviction is the torch
    # path's exactly (the scores of the same query and keys).
    model = tiny_model(LlamaConfig(**SMALL, num_key_value_heads=2)).to(torch.bfloat16)
    prompt = torch.randint(3, 128, (4, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    mask = torch.ones_like(prompt)
    mask[1, :13] = 0
    results = {}
    with torch.no_grad():
        for backend in ("torch", "auto"):
            cache = TOVACache(16, kernel_backend=backend)
            token = model(prompt, attention_mask=mask, **cache_arg(cache)).logits[:, -1:].argmax(-1)
            step_mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = model(token, attention_mask=step_mask, **cache_arg(cache)).logits
            results[backend] = logits, [cache.kept_positions(i).clone() for i in range(len(cache.layers))]
    torch.testing.assert_close(results["auto"][0], results["torch"][0], rtol=2e-2, atol=2e-2)
    for torch_kept, auto_kept in zip(results["torch"][1], results["auto"][1]):
        assert torch.equal(torch_kept, auto_kept)
