"""transformers' automatic compilation of the decoding step on a CUDA device (skipped without one): inductor in
"reduce-overhead" mode (CUDA graphs). That the Triton step kernels run inside it as single operators is checked on
the CPU (tests/test_compile.py)."""

import pytest
import torch
from generation_testing import NEW_TOKENS, generation_model, greedy_without_cache
from model_testing import left_pad, random_ids

import ttt_hf  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]


@pytest.mark.parametrize(
    "family", ["ttt-linear-mamba", "ttt-mlp-mamba", "block_state-sh-s4d", "block_state-mh-s4d", "block_state-mf-s4d"]
)
def test_plain_generate_compiles_the_decoding_step_into_a_cuda_graph(family):
    """The tokens of the eager step and of full forwards without a cache, for beam search and sampling too, and
    one graph per batch size for every prompt length and padding."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = generation_model(family).cuda().eval()
    for lengths in ((9, 3, 6), (4, 2, 3), (8, 5), (12, 11, 5)):
        ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in lengths], max(lengths))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            eager = model.generate(ids, disable_compile=True, **kwargs)
            compiled = model.generate(ids, **kwargs)
        assert torch.equal(eager, greedy_without_cache(model, ids, mask, NEW_TOKENS))
        assert torch.equal(compiled, eager)
    assert hasattr(model, "_compiled_call")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # each step replays a CUDA graph

    beams = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    sampling = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, num_return_sequences=3)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **beams), model.generate(ids, use_cache=False, **beams))
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(5)
            runs.append(model.generate(ids, use_cache=use_cache, **sampling))
    assert torch.equal(runs[0], runs[1])
