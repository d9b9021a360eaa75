"""TOVA on a CUDA device (skipped without one): the official generations under sdpa, bf16 models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tova_testing import CASES, official_generation
from ttt_hf import TOVACache

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", CASES)
def test_official_generations_on_cuda(case):
    torch.backends.cuda.matmul.allow_tf32 = False
    out, data, _ = official_generation(case, device="cuda")
    assert torch.equal(out, data["generated"])


def test_bf16_padded_batch_stays_within_budget():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=None)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, 128, (3, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    cache = TOVACache(8)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert out.shape == (3, 36)
    assert all(layer.physical_length == 8 and layer.keys.dtype == torch.bfloat16 for layer in cache.layers)


def test_flex_attention_keeps_the_same_tokens_as_sdpa():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(3, 128, (2, 20), device="cuda")
    results = {}
    for implementation in ("sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        cache = TOVACache(8)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=False)
        results[implementation] = (out, [cache.kept_positions(i) for i in range(len(cache.layers))])
    assert torch.equal(results["sdpa"][0], results["flex_attention"][0])
    for sdpa_kept, flex_kept in zip(results["sdpa"][1], results["flex_attention"][1]):
        assert torch.equal(sdpa_kept, flex_kept)
