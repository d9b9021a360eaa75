"""BlockStateForCausalLM behaviour: caching, padding, causality, length generalisation, precision, checks."""

import pytest
import torch
from block_state_testing import VARIANT_IDS, VARIANTS, random_ids, tiny_config, tiny_model
from model_testing import (
    check_cache_batch_operations,
    check_recomputation_keeps_the_gradients,
    check_training_step_is_finite,
    chunked_logits,
    full_logits,
    left_pad,
    prefill_then_decode_logits,
)
from transformers import DynamicCache

import ttt_hf.block_state.modeling_block_state as modeling
from ttt_hf import BlockStateCache, BlockStateForCausalLM

W = 4  # tiny_config's block_size


@pytest.fixture(scope="module", params=VARIANTS, ids=VARIANT_IDS)
def model(request):
    return tiny_model(**request.param)


@pytest.mark.parametrize("prefill", [1, W - 1, W, W + 1, 3 * W + 7])
def test_prefill_then_decode_equals_full_forward(model, prefill):
    ids = random_ids(2, 3 * W + 12)
    full = full_logits(model, ids)
    assert (prefill_then_decode_logits(model, ids, prefill) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("splits", [(3, 9, 10, 17), (4, 8, 13), (1, 2, 3, 11)])
def test_appends_of_any_length_at_any_offset(model, splits):
    ids = random_ids(2, 21, seed=1)
    full = full_logits(model, ids)
    cache = BlockStateCache(model.config)
    logits = chunked_logits(model, cache, ids, splits)
    assert cache.get_seq_length() == 21 and cache.positions.tolist() == [21, 21]
    assert (logits - full).abs().max().item() <= 1e-4


def test_left_padded_batch_equals_rows_alone(model):
    rows = [random_ids(1, n, seed=n)[0] for n in (15, 10, 3)]
    ids, mask = left_pad(rows, 15)
    padded = full_logits(model, ids, attention_mask=mask)
    for r, row in enumerate(rows):
        alone = full_logits(model, row[None])
        assert (padded[r, 15 - len(row) :] - alone[0]).abs().max().item() <= 1e-4


def test_padded_prefill_then_decode_equals_rows_alone(model):
    rows = [random_ids(1, n, seed=30 + n)[0] for n in (11, 6)]
    ids, mask = left_pad(rows, 11)
    extra = random_ids(2, 6, seed=3)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        steps = []
        for j in range(extra.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            out = model(extra[:, j : j + 1], attention_mask=mask, cache=out.cache)
            steps.append(out.logits)
    for r, row in enumerate(rows):
        alone = full_logits(model, torch.cat([row, extra[r]])[None])
        assert (torch.cat(steps, 1)[r] - alone[0, len(row) :]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_causality_by_gradients_across_blocks(variant):
    model = tiny_model(**variant)
    ids = random_ids(1, 3 * W + 2, seed=4)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    for t in range(ids.shape[1]):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), embeds, retain_graph=True)
        assert grad[0, t + 1 :].abs().max().item() == 0.0 if t + 1 < ids.shape[1] else True
    # Information crosses blocks: the last position depends on the first block (through the SSM context).
    assert grad[0, :W].abs().sum().item() > 0


def test_s4d_runs_at_8x_the_configured_length_and_reaches_back():
    model = tiny_model(max_position_embeddings=16)
    ids = random_ids(1, 8 * 16, seed=5)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    assert torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(logits[0, -1].sum(), embeds)
    assert grad[0, 0].abs().sum().item() > 0  # the kernel covers every lag: no truncation


def test_mf_never_builds_per_position_filter_outputs(monkeypatch):
    model = tiny_model(context_mode="mf")
    calls = []
    monkeypatch.setattr(modeling, "fft_causal_conv", lambda *a: calls.append(a) or None)
    monkeypatch.setattr(modeling, "s4d_causal_conv", lambda *a: calls.append(a) or None)
    ids = random_ids(2, 5 * W + 1, seed=6)
    with torch.no_grad():
        out = model(ids)
        model(ids[:, :1], cache=out.cache)
    assert calls == []


S4D_VARIANTS = [v for v in VARIANTS if v.get("ssm_kind") != "implicit"]
S4D_VARIANT_IDS = [i for v, i in zip(VARIANTS, VARIANT_IDS) if v.get("ssm_kind") != "implicit"]


@pytest.mark.parametrize("variant", S4D_VARIANTS, ids=S4D_VARIANT_IDS)
def test_a_decoding_step_computes_its_token_alone(variant):
    """Every layer of a decoding step sees one column per row, not its token's whole block."""
    model = tiny_model(block_size=64, **variant)
    widths = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda module, args, output: widths.append(output.shape[1]))
    with torch.no_grad():
        out = model(random_ids(2, 70))
        widths.clear()
        model(random_ids(2, 1, seed=1), cache=out.cache)
    assert widths == [1] * model.config.num_hidden_layers


@pytest.mark.parametrize("variant", S4D_VARIANTS, ids=S4D_VARIANT_IDS)
def test_gradients_reach_back_through_a_decoding_step(variant):
    """A loss on a decoding step's logits differentiates through the cache as through one full forward."""
    model = tiny_model(**variant)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = random_ids(2, 2 * W + 3, seed=4)
    cache = model(ids[:, :-1]).cache
    step = model(ids[:, -1:], cache=cache).logits[:, -1]
    full = model(ids).logits[:, -1]
    assert (step - full).abs().max().item() <= 1e-4
    step_grads = torch.autograd.grad(step.square().sum(), params, allow_unused=True)
    full_grads = torch.autograd.grad(full.square().sum(), params, allow_unused=True)
    for a, b in zip(step_grads, full_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("variant", S4D_VARIANTS, ids=S4D_VARIANT_IDS)
def test_cache_memory_does_not_grow(variant):
    model = tiny_model(**variant)
    sizes = []
    with torch.no_grad():
        for length in (W + 1, 4 * W + 3, 16 * W + 2):
            out = model(random_ids(2, length, seed=length))
            sizes.append(out.cache.nbytes)
            out = model(random_ids(2, 1, seed=1), cache=out.cache)
            sizes.append(out.cache.nbytes)
    assert len(set(sizes)) == 1
    layer = out.cache.layers[-1]  # every variant computes an SSM in its last layer
    assert layer.get("ssm_state").dtype == torch.complex64


def test_implicit_filter_cache_keeps_the_history():
    model = tiny_model(ssm_kind="implicit")
    with torch.no_grad():
        out = model(random_ids(2, 9))
        out = model(random_ids(2, 3), cache=out.cache)
    assert out.cache.layers[0].get("history").shape == (2, 12, model.config.hidden_size)


def test_cache_batch_operations_and_crop():
    model = tiny_model(context_mode="mh", attend_previous_block=True)
    ids, more = random_ids(3, 7, seed=7), random_ids(3, 3, seed=8)
    check_cache_batch_operations(model, lambda: BlockStateCache(model.config), ids, more)
    reset = BlockStateCache(model.config)
    with torch.no_grad():
        model(ids, cache=reset)
    reset.reset()
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        reset.crop(2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS[:3], ids=VARIANT_IDS[:3])
def test_half_precision_models(variant, dtype):
    reference = tiny_model(**variant)
    model = tiny_model(**variant).to(dtype)
    ids = random_ids(2, 3 * W + 1, seed=9)
    out = model(ids)
    assert out.logits.dtype == dtype
    assert out.cache.layers[0].get("ssm_state").dtype == torch.complex64
    expected = full_logits(reference, ids)
    assert (out.logits.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 0.02
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False).shape == (2, 16)
    check_training_step_is_finite(model, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_activation_is_recomputed_with_the_same_gradients(monkeypatch, dtype):
    """Training recomputes the MLP's gated activation in the backward instead of keeping it; the gradients are those
    of the plain forward."""
    model = tiny_model().to(dtype).train()
    ids = random_ids(2, 3 * W + 1, seed=4)
    kept = check_recomputation_keeps_the_gradients(model, ids, modeling, monkeypatch, model.config.num_hidden_layers)
    assert "model.layers.0.mlp.up_proj.weight" in kept


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(block_size=0), "block_size"),
        (dict(num_context_states=0, context_mode="mf"), "num_context_states"),
        (dict(context_mode="xx"), "context_mode"),
        (dict(ssm_kind="s5"), "ssm_kind"),
        (dict(hidden_size=30), "num_attention_heads"),
        (dict(ssm_state_size=7), "ssm_state_size"),
        (dict(ssm_layers=[0, 5]), "ssm_layers"),
        (dict(ssm_layers=[1, 1]), "ssm_layers"),
        (dict(attend_previous_block="no"), "attend_previous_block"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(rope_theta=0), "rope_theta"),
        (dict(max_position_embeddings=-5), "max_position_embeddings"),
        (dict(max_position_embeddings="abc"), "max_position_embeddings"),
        (dict(initializer_range=float("nan")), "initializer_range"),
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
        (dict(hidden_act="nope"), "hidden_act"),
    ],
)
def test_invalid_config_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    model = tiny_model()
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(ids[0])
    with pytest.raises(ValueError, match="attention_mask must be a 2-D"):
        model(ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5)[None])
    with pytest.raises(TypeError, match="must be a BlockStateCache"):
        model(ids, cache=DynamicCache())
    cache = BlockStateCache(model.config)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids[:1], cache=cache)
    # kernel_backend="triton" on CPU needs the Triton interpreter (tests/test_block_state_triton.py runs it there).
    model = BlockStateForCausalLM(tiny_config(kernel_backend="triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        model(ids)
