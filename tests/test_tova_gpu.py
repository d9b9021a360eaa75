"""TOVA on a CUDA device (skipped without one): the official generations under sdpa, bf16 models."""

import pytest
import torch
from model_testing import cache_arg
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
    # Positions come from a device tensor updated in place (a Python int would be frozen into the graph). Both
    # runs pass the all-True mask transformers materialises under capture; the captured steps drop it (an
    # unpadded cache), so the two attend to the same slots with and without a mask row ("auto": the fused
    # attention kernel; "torch": different SDPA kernels).
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
