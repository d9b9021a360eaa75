"""Block-State on a CUDA device (skipped without one): same numbers as the CPU, half precision."""

import pytest
import torch
from block_state_testing import VARIANT_IDS, VARIANTS, random_ids, tiny_model
from model_testing import check_cuda_matches_cpu_and_decodes, check_training_step_is_finite

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_cuda_fp32_matches_cpu_and_decodes_like_a_full_forward(variant):
    cpu = tiny_model(**variant)
    gpu = tiny_model(**variant).cuda()
    ids = random_ids(3, 29)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    check_cuda_matches_cpu_and_decodes(cpu, gpu, ids, mask, prefill=9)


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=VARIANT_IDS[:3])
def test_cuda_bf16_forward_train_generate(variant):
    model = tiny_model(**variant).cuda().to(torch.bfloat16)
    reference = tiny_model(**variant).cuda()
    ids = random_ids(2, 33).cuda()
    out = model(ids)
    expected = reference(ids, use_cache=False).logits
    assert (out.logits.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 0.02
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False).shape == (2, 41)
    check_training_step_is_finite(model, ids)
