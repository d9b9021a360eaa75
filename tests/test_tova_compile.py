"""`generate` with a TOVACache and a compiled decoding step (transformers' automatic compilation for compileable
caches, made to run on the CPU; see compile_testing).

A decode step has a fixed shape (budget + 1 slots under the cache's own mask, the slot to write on the device), so
one graph serves prompts shorter and longer than the budget, padded or not, and every step. Checked: the compiled
step gives the eager step's tokens for both policies, sink tokens, sdpa and eager attention, beam search and
sampling; the cache keeps its tensors' addresses, and afterwards counts what it has seen and can be continued; the
Triton decode step (in Triton's interpreter) runs inside the compiled step as one operator. On CUDA with inductor
and CUDA graphs: tests/test_tova_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from compile_testing import GraphRecorder, compile_config, fresh_dynamo  # noqa: F401 (an autouse fixture)
from model_testing import cache_arg, left_pad, random_ids, returned_cache
from tova_testing import SMALL
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_hf import TOVACache

BUDGET = 8
NEW_TOKENS = 12  # fills the cache from prompts shorter than the budget, then evicts
# left-padded rows: longer than the budget, shorter, both; two batch sizes
PROMPTS = ((20, 9, 14), (5, 3, 7), (13, 6), (11, 2, 8))


def tova_model(attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A tiny Llama whose greedy tokens depend on which tokens the cache keeps (sharp attention and logits)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation=attn_implementation)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("q_proj", "k_proj", "lm_head", "embed_tokens")):
                param.mul_(4.0)
    return model


def prompts(lengths, seed: int = 0):
    return left_pad([random_ids(1, n, seed=seed + n, vocab=SMALL["vocab_size"])[0] for n in lengths], max(lengths))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("cache_kwargs", [{}, {"policy": "window", "num_sink_tokens": 2}], ids=["tova", "window"])
def test_the_compiled_step_gives_the_eager_tokens_and_compiles_once(attn_implementation, cache_kwargs):
    model = tova_model(attn_implementation)
    recorder = GraphRecorder()
    config = compile_config(recorder.backend)
    for seed, lengths in enumerate(PROMPTS):
        ids, mask = prompts(lengths, seed=10 * seed)
        runs = []
        for compile_kwargs in ({"disable_compile": True}, {"compile_config": config}):
            cache = TOVACache(BUDGET, **cache_kwargs)
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    **cache_arg(cache),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    **compile_kwargs,
                )
            runs.append((out, [cache.kept_positions(i).sort(-1).values for i in range(len(cache.layers))]))
        (eager, eager_kept), (compiled, compiled_kept) = runs
        assert torch.equal(compiled, eager)
        assert all(torch.equal(a, b) for a, b in zip(compiled_kept, eager_kept))
        assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1  # the last token is not fed back
    # One graph per batch size for every step of every prompt: shapes and addresses are fixed, no host count is
    # read (transformers compiles with static shapes, so a new batch size compiles again).
    assert len(recorder.graphs) == 2


def test_beam_search_and_sampling_in_the_compiled_step():
    model = tova_model()
    config = compile_config(GraphRecorder().backend)
    ids, mask = prompts(PROMPTS[0], seed=30)
    beams = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    sampling = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, num_return_sequences=3)
    for kwargs in (beams, sampling):
        runs = []
        for compile_kwargs in ({"disable_compile": True}, {"compile_config": config}):
            torch.manual_seed(5)
            with torch.no_grad():
                runs.append(model.generate(ids, **cache_arg(TOVACache(BUDGET)), **kwargs, **compile_kwargs))
        assert torch.equal(runs[0], runs[1])


def test_compiled_steps_keep_the_caches_tensors_and_the_cache_continues():
    model = tova_model()
    config = compile_config(GraphRecorder().backend)
    ids, mask = prompts(PROMPTS[1], seed=40)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    cache = TOVACache(BUDGET)
    with torch.no_grad():
        model(ids[:, :-1], attention_mask=mask[:, :-1], **cache_arg(cache))
        addresses = cache_addresses(cache)
        first = model.generate(ids, attention_mask=mask, **cache_arg(cache), compile_config=config, **kwargs)
        assert cache_addresses(cache) == addresses
        assert cache.get_seq_length() == first.shape[1] - 1
        # Continuing: the whole sequence so far, then new tokens, as with any cache.
        more = torch.cat([first, random_ids(3, 2, seed=41, vocab=SMALL["vocab_size"])], dim=1)
        more_mask = torch.cat([mask, torch.ones(3, more.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        continued = model.generate(more, attention_mask=more_mask, **cache_arg(cache), compile_config=config, **kwargs)
        eager_cache = TOVACache(BUDGET)
        model(ids[:, :-1], attention_mask=mask[:, :-1], **cache_arg(eager_cache))
        model.generate(ids, attention_mask=mask, **cache_arg(eager_cache), disable_compile=True, **kwargs)
        expected = model.generate(
            more, attention_mask=more_mask, **cache_arg(eager_cache), disable_compile=True, **kwargs
        )
    assert torch.equal(continued, expected)


def cache_addresses(cache: TOVACache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for t in (*layer._buffers, layer._next_position, layer._held)]


def test_plain_generate_on_the_cpu_compiles_nothing():
    """transformers compiles only on CUDA: on the CPU plain generate with a TOVACache stays eager."""
    model = tova_model()
    ids, mask = prompts(PROMPTS[0], seed=50)
    cache = TOVACache(BUDGET)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, **cache_arg(cache), max_new_tokens=3, return_dict_in_generate=True
        )
    assert returned_cache(out) is cache and cache.is_compileable
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_the_triton_step_runs_inside_the_compiled_step(attn_implementation):
    """kernel_backend="triton" under Triton's interpreter: the decode step's kernels (with sdpa: attention, scores
    and eviction fused; with eager: the eviction after the model's attention) are one operator of the graph that
    writes the cache in place, with the torch path's tokens."""
    model = tova_model(attn_implementation)
    recorder = GraphRecorder()
    ids, mask = prompts(PROMPTS[0], seed=60)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        expected = model.generate(
            ids, **cache_arg(TOVACache(BUDGET, kernel_backend="torch")), disable_compile=True, **kwargs
        )
        triton_cache = TOVACache(BUDGET, kernel_backend="triton")
        compiled = model.generate(
            ids, **cache_arg(triton_cache), compile_config=compile_config(recorder.backend), **kwargs
        )
    assert torch.equal(compiled, expected)
    (graph,) = recorder.graphs
    assert "tova_decode_step_" in graph.code
