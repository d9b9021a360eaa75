"""`generate` with a compiled decoding step (transformers' automatic compilation for compileable caches), TTT and
Block-State (S4D filter; the implicit filter's history grows with every token, so its cache is not compileable).

transformers compiles `generate`'s decoding step on CUDA only; `CompileConfig._compile_all_devices` makes it do
so on the CPU, here with a backend that records each graph it is handed and runs it as traced (fullgraph: a
graph break fails). Checked: the compiled step gives the tokens of the eager step and of full forwards without a
cache (greedy on a left-padded batch, beam search, seeded sampling with several return sequences), it is traced
once for prompts of any length, the cache's tensors keep their addresses across steps, and the Triton decode
kernel (in Triton's interpreter) runs inside the compiled step as one operator. On CUDA with inductor and CUDA
graphs: tests/test_ttt_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import ttt_testing
from compile_testing import GraphRecorder, compile_config, fresh_dynamo  # noqa: F401 (an autouse fixture)
from generation_testing import NEW_TOKENS, ROWS, generation_model, greedy_without_cache, new_cache, padded_prompts
from model_testing import left_pad, random_ids, returned_cache

from ttt_hf import BlockStateCache, TTTCache

VARIANTS = [f"ttt-{layer}-{backbone}" for layer, backbone in ttt_testing.VARIANTS] + [
    f"block_state-{mode}-s4d" for mode in ("sh", "mh", "mf")
]


@pytest.fixture(params=VARIANTS, scope="module")
def model(request):
    return generation_model(request.param).eval()


def test_the_compiled_step_gives_the_eager_tokens_and_compiles_once(model):
    recorder = GraphRecorder()
    config = compile_config(recorder.backend)
    for seed, lengths in ((0, ROWS), (50, (4, 2, 3)), (70, (8, 5)), (60, (12, 11, 5))):
        ids, mask = left_pad([random_ids(1, n, seed=seed + n)[0] for n in lengths], max(lengths))
        expected = greedy_without_cache(model, ids, mask, NEW_TOKENS)
        kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            eager = model.generate(ids, disable_compile=True, **kwargs)
            compiled = model.generate(ids, compile_config=config, **kwargs)
        assert torch.equal(eager, expected)
        assert torch.equal(compiled, expected)
    # One graph per batch size for every step of every prompt length: the step reads no host counter and has
    # fixed shapes (transformers compiles with static shapes, so a new batch size compiles again).
    assert len(recorder.graphs) == 2


def test_beam_search_and_sampling_in_the_compiled_step(model):
    config = compile_config(GraphRecorder().backend)
    ids, mask = padded_prompts(seed=10)
    beams = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        compiled = model.generate(ids, compile_config=config, return_dict_in_generate=True, **beams)
        uncached = model.generate(ids, use_cache=False, return_dict_in_generate=True, **beams)
    assert torch.equal(compiled.sequences, uncached.sequences)
    assert (compiled.beam_indices[:, :NEW_TOKENS] != compiled.beam_indices[:, :1]).any()  # beams were reordered

    sampling = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, num_return_sequences=3)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        with torch.no_grad():
            runs.append(model.generate(ids, use_cache=use_cache, compile_config=config, **sampling))
    assert torch.equal(runs[0], runs[1])


def cache_tensors(cache) -> list[torch.Tensor]:
    tensors = [cache.positions, cache.columns]
    for layer in cache.layers:
        if isinstance(cache, TTTCache):
            tensors += layer.ttt_state + layer.ttt_acc
            tensors += [t for t in (layer.pre_conv_state, layer.qk_conv_state) if t is not None]
        else:
            tensors += list(layer.tensors.values())
    return tensors


def test_decoding_steps_update_the_cache_in_place(model):
    ids, mask = padded_prompts(seed=40)
    cache = new_cache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        addresses = [t.data_ptr() for t in cache_tensors(cache)]
        step = torch.ones(len(ROWS), 1, dtype=torch.long)
        for _ in range(5):  # crosses a mini-batch or block boundary (4 tokens), where the state is committed
            model(step, attention_mask=torch.ones_like(step), cache=cache)
    assert [t.data_ptr() for t in cache_tensors(cache)] == addresses
    assert cache.get_seq_length() == max(ROWS) + 5 and cache.positions.tolist() == [n + 5 for n in ROWS]


def test_plain_generate_on_the_cpu_compiles_nothing(model):
    """transformers compiles only on CUDA: on the CPU plain generate stays eager, with the model's own cache."""
    ids, mask = padded_prompts(seed=45)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(returned_cache(out), (TTTCache, BlockStateCache)) and returned_cache(out).is_compileable
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("family", ["ttt-linear-mamba", "ttt-mlp-mamba", "block_state-sh-s4d"])
def test_the_triton_step_runs_inside_the_compiled_step(family, monkeypatch):
    """kernel_backend="triton" under Triton's interpreter: each decode kernel is one operator of the graph that writes
    the cache in place (through AOTAutograd's functionalization), with the reference's tokens."""
    from ttt_hf.block_state import block_state_triton
    from ttt_hf.ttt import ttt_triton_decode

    kernels = (
        [(ttt_triton_decode, "ttt_step_triton")]
        if family.startswith("ttt")
        else [(block_state_triton, "s4d_step_triton"), (block_state_triton, "slot_attention_step_triton")]
    )
    calls = []
    for module, name in kernels:
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, name=name, kernel=kernel: calls.append(name) or kernel(*args))
    model = generation_model(family).eval()
    ids, mask = padded_prompts(seed=55)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, disable_compile=True, **kwargs)
        for holder in (model.config, *model.modules()):  # Block-State's SSM keeps its own copy
            if hasattr(holder, "kernel_backend"):
                holder.kernel_backend = "triton"
        compiled = model.generate(ids, compile_config=compile_config("aot_eager"), **kwargs)
    assert torch.equal(compiled, expected)
    assert {name for _, name in kernels} <= set(calls)  # the compiled steps ran the kernels


def test_the_implicit_filters_cache_is_not_compileable():
    """Its decoding convolves the whole history, which grows with every token: generate keeps its steps eager."""
    model = generation_model("block_state-sh-implicit")
    ids, mask = padded_prompts(seed=65)
    recorder = GraphRecorder()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=3,
            compile_config=compile_config(recorder.backend),
            return_dict_in_generate=True,
        )
    assert not returned_cache(out).is_compileable and not recorder.graphs
