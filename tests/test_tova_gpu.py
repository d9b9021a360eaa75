"""TOVA on a CUDA device (skipped without one): the official generations under sdpa, bf16 models."""

import pytest
import torch
from model_testing import cache_arg, left_pad, random_ids
from tova_testing import CASES, SMALL, official_generation
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_hf import TOVACache
from ttt_hf.tova import tova_ops

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", CASES)
def test_official_generations_on_cuda(case):
    torch.backends.cuda.matmul.allow_tf32 = False
    out, data, _ = official_generation(case, device="cuda")
    assert torch.equal(out, data["generated"])


def test_bf16_padded_batch_stays_within_budget():
    config = LlamaConfig(**SMALL)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, 128, (3, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    cache = TOVACache(8)
    out = model.generate(ids, attention_mask=mask, **cache_arg(cache), max_new_tokens=16, do_sample=False)
    assert out.shape == (3, 36)
    assert all(layer.physical_length == 8 and layer.keys.dtype == torch.bfloat16 for layer in cache.layers)


def test_flex_attention_keeps_the_same_tokens_as_sdpa():
    config = LlamaConfig(**SMALL)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(3, 128, (2, 20), device="cuda")
    results = {}
    for implementation in ("sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        cache = TOVACache(8)
        out = model.generate(ids, **cache_arg(cache), max_new_tokens=16, do_sample=False)
        results[implementation] = (out, [cache.kept_positions(i) for i in range(len(cache.layers))])
    assert torch.equal(results["sdpa"][0], results["flex_attention"][0])
    for sdpa_kept, flex_kept in zip(results["sdpa"][1], results["flex_attention"][1]):
        assert torch.equal(sdpa_kept, flex_kept)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_decode_step_replays_in_a_cuda_graph(backend, no_tf32, monkeypatch):
    # Positions come from a device tensor updated in place (a Python int would be frozen into the graph). The steps
    # attend under the cache's own mask of its slots, whatever mask they are given ("auto": the fused attention
    # kernel; "torch": SDPA); replays advance the device alone, and the host's counts catch up when read.
    fused = []
    kernel = tova_ops.tova_attention_evict_one_triton
    monkeypatch.setattr(
        tova_ops, "tova_attention_evict_one_triton", lambda *args, **kwargs: fused.append(1) or kernel(*args, **kwargs)
    )
    config = LlamaConfig(**SMALL)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().eval()
    budget, prompt = 8, torch.randint(3, 128, (2, 20), device="cuda")
    mask = torch.ones(2, 1, 1, budget + 1, dtype=torch.bool, device="cuda")

    def decode(graph: bool):
        cache = TOVACache(budget, kernel_backend=backend)
        with torch.no_grad():
            token = model(prompt, **cache_arg(cache)).logits[:, -1:].argmax(-1)
            position = torch.full((2, 1), prompt.shape[1], device="cuda")

            def step():
                token.copy_(
                    model(token, attention_mask=mask, position_ids=position, **cache_arg(cache))
                    .logits[:, -1:]
                    .argmax(-1)
                )
                position.add_(1)

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            if graph:
                captured = torch.cuda.CUDAGraph()
                with torch.cuda.graph(captured):
                    step()
                step = captured.replay
            tokens = []
            torch.cuda.set_sync_debug_mode("error")  # a host synchronisation in the step raises
            try:
                for _ in range(12):
                    step()
                    tokens.append(token.clone())
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return torch.cat(tokens, 1), [cache.kept_positions(i).clone() for i in range(len(cache.layers))]

    eager, graph = decode(graph=False), decode(graph=True)
    assert bool(fused) == (backend == "auto")  # sdpa decode steps at the budget take the fused route
    assert torch.equal(eager[0], graph[0])
    for eager_kept, graph_kept in zip(eager[1], graph[1]):
        assert torch.equal(eager_kept, graph_kept)
        assert int(graph_kept.max()) > prompt.shape[1] + 2  # tokens of the replays, with their own positions


def test_plain_generate_compiles_the_decoding_step_into_a_cuda_graph(no_tf32):
    """transformers' automatic compilation (inductor, "reduce-overhead": CUDA graphs) of the decoding step with a
    TOVACache, the fused Triton step inside as one operator: the eager steps' tokens and kept positions on left-padded
    batches, prompts shorter and longer than the budget, one graph per batch size for all of them."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).cuda().eval()
    for lengths in ((20, 9, 14), (5, 3, 7), (13, 6), (11, 2, 8)):
        ids, mask = left_pad([random_ids(1, n, seed=n, vocab=SMALL["vocab_size"])[0] for n in lengths], max(lengths))
        runs = []
        for compile_kwargs in ({"disable_compile": True}, {}):
            cache = TOVACache(8)
            with torch.no_grad():
                out = model.generate(
                    ids.cuda(),
                    attention_mask=mask.cuda(),
                    **cache_arg(cache),
                    max_new_tokens=12,
                    do_sample=False,
                    **compile_kwargs,
                )
            runs.append((out, [cache.kept_positions(i).sort(-1).values for i in range(len(cache.layers))]))
        assert torch.equal(runs[0][0], runs[1][0])
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert hasattr(model, "_compiled_call")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # each step replays a CUDA graph
