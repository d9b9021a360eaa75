"""Block-State on a CUDA device (skipped without one): same numbers as the CPU, half precision."""

import pytest
import torch

from block_state_testing import VARIANT_IDS, VARIANTS, random_ids, tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_cuda_fp32_matches_cpu_and_decodes_like_a_full_forward(variant):
    cpu = tiny_model(**variant)
    gpu = tiny_model(**variant).cuda()
    ids = random_ids(3, 29)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        expected = cpu(ids, attention_mask=mask, use_cache=False).logits
        full = gpu(ids.cuda(), attention_mask=mask.cuda(), use_cache=False).logits
        assert (full.cpu() - expected).abs().max().item() <= 1e-4
        out = gpu(ids[:, :9].cuda(), attention_mask=mask[:, :9].cuda())
        steps = [out.logits]
        for j in range(9, ids.shape[1]):
            out = gpu(ids[:, j : j + 1].cuda(), attention_mask=mask[:, : j + 1].cuda(), past_key_values=out.past_key_values)
            steps.append(out.logits)
    real = mask.bool().cuda()
    assert (torch.cat(steps, 1) - full)[real].abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=VARIANT_IDS[:3])
def test_cuda_bf16_forward_train_generate(variant):
    model = tiny_model(**variant).cuda().to(torch.bfloat16)
    reference = tiny_model(**variant).cuda()
    ids = random_ids(2, 33).cuda()
    out = model(ids)
    expected = reference(ids, use_cache=False).logits
    assert (out.logits.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 0.02
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False).shape == (2, 41)
    model.train()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
