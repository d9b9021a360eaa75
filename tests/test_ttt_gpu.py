"""TTT on a CUDA device (skipped without one): same numbers as the CPU, half precision, accelerate placement."""

import pytest
import torch
from generation_testing import NEW_TOKENS, generation_model, greedy_without_cache
from model_testing import check_cuda_matches_cpu_and_decodes, check_training_step_is_finite, left_pad
from transformers import AutoModelForCausalLM
from ttt_testing import VARIANTS, random_ids, tiny_model

import ttt_hf  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_cuda_fp32_matches_cpu_and_decodes_like_a_full_forward(variant):
    cpu = tiny_model(*variant)
    gpu = tiny_model(*variant).cuda()
    ids = random_ids(3, 37)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    check_cuda_matches_cpu_and_decodes(cpu, gpu, ids, mask, prefill=11)


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_cuda_bf16_forward_train_generate(variant):
    model = tiny_model(*variant).cuda().to(torch.bfloat16)
    reference = tiny_model(*variant).cuda()
    ids = random_ids(2, 33).cuda()
    out = model(ids, use_cache=True)
    assert all(t.dtype == torch.float32 and t.is_cuda for t in out.cache.layers[0].ttt_state)
    expected = reference(ids, use_cache=False).logits
    assert (out.logits.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 0.02
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert generated.shape == (2, 41)
    check_training_step_is_finite(model, ids)


def test_device_map_auto_on_cuda(tmp_path):
    model = tiny_model("linear", "mamba")
    model.save_pretrained(tmp_path)
    # transformers >= 5.25 swaps in hub kernels (activations, norms) when loading onto CUDA, fetched from the Hub:
    # offline, as here, loading then fails for any model unless told not to.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", use_kernels=False)
    assert next(loaded.parameters()).is_cuda
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert (loaded(ids.cuda()).logits.cpu() - model(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_plain_generate_compiles_the_decoding_step_into_a_cuda_graph(layer_type):
    """transformers' automatic compilation (inductor, "reduce-overhead": CUDA graphs) of the decoding step, with
    the Triton step kernel as one operator: the tokens of the eager step and of full forwards without a cache,
    for beam search and sampling too, and one graph for every prompt length."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = generation_model(f"ttt-{layer_type}-mamba").cuda().eval()
    for lengths in ((9, 3, 6), (4, 2, 3), (12, 11, 5)):
        ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in lengths], max(lengths))
        ids, mask = ids.cuda(), mask.cuda()
        kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            eager = model.generate(ids, disable_compile=True, **kwargs)
            compiled = model.generate(ids, **kwargs)
        assert torch.equal(eager, greedy_without_cache(model, ids, mask, NEW_TOKENS))
        assert torch.equal(compiled, eager)
    assert hasattr(model, "_compiled_call")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]

    beams = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2, do_sample=False)
    sampling = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, num_return_sequences=3)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **beams), model.generate(ids, use_cache=False, **beams))
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(5)
            runs.append(model.generate(ids, use_cache=use_cache, **sampling))
    assert torch.equal(runs[0], runs[1])
