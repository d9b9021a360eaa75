"""TTT on a CUDA device (skipped without one): same numbers as the CPU, half precision, accelerate placement."""

import pytest
import torch
from model_testing import check_cuda_matches_cpu_and_decodes, check_training_step_is_finite
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
