"""TTTForCausalLM behaviour: caching, padding, generation, precision, causality and input checks."""

import pytest
import torch
from model_testing import (
    cache_arg,
    check_cache_batch_operations,
    check_recomputation_keeps_the_gradients,
    check_training_step_is_finite,
    chunked_logits,
    full_logits,
    left_pad,
    prefill_then_decode_logits,
    returned_cache,
)
from transformers import DynamicCache
from ttt_testing import VARIANTS, random_ids, tiny_config, tiny_model

from ttt_hf import TTTCache, TTTConfig

MB = 4  # tiny_config's mini_batch_size


@pytest.fixture(scope="module", params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
def model(request):
    model = tiny_model(*request.param)
    model.generation_config.eos_token_id = None  # fixed-length generations compare position by position
    return model


@pytest.mark.parametrize("prefill", [1, MB - 1, MB, MB + 1, 3 * MB + 2])
def test_prefill_then_decode_equals_full_forward(model, prefill):
    ids = random_ids(2, 3 * MB + 5)
    full = full_logits(model, ids)
    assert (prefill_then_decode_logits(model, ids, prefill) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("splits", [(3, 4, 11, 12, 13), (5, 6, 7, 8, 15), (1, 2, 9)])
def test_appends_of_any_length_at_any_offset(model, splits):
    ids = random_ids(2, 21, seed=1)
    full = full_logits(model, ids)
    cache = TTTCache(model.config)
    logits = chunked_logits(model, cache, ids, splits)
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.positions.tolist() == [ids.shape[1]] * 2
    assert (logits - full).abs().max().item() <= 1e-5


def test_left_padded_batch_equals_rows_alone(model):
    rows = [random_ids(1, n, seed=n)[0] for n in (13, 9, 4)]
    ids, mask = left_pad(rows, 13)
    padded = full_logits(model, ids, attention_mask=mask)
    for r, row in enumerate(rows):
        alone = full_logits(model, row[None])
        assert (padded[r, 13 - len(row) :] - alone[0]).abs().max().item() <= 1e-5


def test_padding_inside_a_continuation(model):
    """A second, left-padded turn: the pads sit in the middle of the sequence and must be skipped."""
    first = random_ids(2, 6, seed=2)
    second = [random_ids(1, n, seed=10 + n)[0] for n in (5, 2)]
    ids2, mask2 = left_pad(second, 5)
    cache = TTTCache(model.config)
    with torch.no_grad():
        model(first, cache=cache)
        out = model(ids2, attention_mask=torch.cat([torch.ones_like(first), mask2], 1), cache=cache)
    assert cache.positions.tolist() == [11, 8]
    for r, row in enumerate(second):
        alone = full_logits(model, torch.cat([first[r], row])[None])
        assert (out.logits[r, 5 - len(row) :] - alone[0, 6:]).abs().max().item() <= 1e-5


def test_causality_by_gradients(model):
    ids = random_ids(1, 2 * MB + 3, seed=3)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    for t in range(ids.shape[1]):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), embeds, retain_graph=True)
        assert grad[0, t + 1 :].abs().max().item() == 0.0 if t + 1 < ids.shape[1] else True
        assert grad[0, : t + 1].abs().sum().item() > 0


def test_cache_size_does_not_grow(model):
    short, long = TTTCache(model.config), TTTCache(model.config)
    with torch.no_grad():
        model(random_ids(2, 5), cache=short)
        model(random_ids(2, 50), cache=long)
    assert short.nbytes == long.nbytes > 0
    for layer in long.layers:
        assert all(t.dtype == torch.float32 for t in layer.ttt_state + layer.ttt_acc)


def test_cache_batch_operations(model):
    ids, more = random_ids(3, 7, seed=4), random_ids(3, 3, seed=5)
    positions_after_reset = check_cache_batch_operations(model, lambda: TTTCache(model.config), ids, more)
    assert positions_after_reset is None
    cache = TTTCache(model.config)
    with torch.no_grad():
        model(random_ids(3, 7, seed=4), cache=cache)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)


def test_greedy_generate_equals_argmax_loop(model):
    ids = random_ids(2, 6, seed=6)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    manual = ids
    for _ in range(8):
        manual = torch.cat([manual, full_logits(model, manual)[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, manual)


def test_left_padded_generate_equals_rows_alone(model):
    rows = [random_ids(1, n, seed=20 + n)[0] for n in (7, 3)]
    ids, mask = left_pad(rows, 7)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for r, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(batch[r, 7 - len(row) :], alone[0])


def test_beam_search_and_sampling_match_the_uncached_model(model):
    ids = random_ids(2, 5, seed=7)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outs.append(
            model.generate(
                ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=3, use_cache=use_cache
            )
        )
    assert outs[0].shape == (6, 11) and torch.equal(*outs)


def test_continue_from_returned_cache(model):
    ids = random_ids(1, 5, seed=8)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(returned_cache(first), TTTCache)
    follow_up = torch.cat([first.sequences, random_ids(1, 3, seed=9)], 1)
    continued = model.generate(follow_up, **cache_arg(returned_cache(first)), max_new_tokens=5, do_sample=False)
    assert torch.equal(continued, model.generate(follow_up, max_new_tokens=5, do_sample=False))


def test_output_options(model):
    ids = random_ids(2, 6, seed=10)
    out = model(ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    assert out.logits.shape == (2, 1, model.config.vocab_size)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    as_tuple = model(ids, return_dict=False, use_cache=False)
    assert torch.equal(as_tuple[0], full_logits(model, ids))
    embeds = model.get_input_embeddings()(ids)
    assert torch.allclose(model(inputs_embeds=embeds, use_cache=False).logits, full_logits(model, ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_half_precision_models_keep_fp32_state(variant, dtype):
    reference = tiny_model(*variant)
    model = tiny_model(*variant).to(dtype)
    ids = random_ids(2, 2 * MB + 1, seed=11)
    out = model(ids, use_cache=True)
    assert out.logits.dtype == dtype
    for layer in out.cache.layers:
        assert all(t.dtype == torch.float32 for t in layer.ttt_state + layer.ttt_acc)
        for conv_state in (layer.pre_conv_state, layer.qk_conv_state):
            assert conv_state is None or conv_state.dtype == dtype
    error = (out.logits.float() - full_logits(reference, ids)).abs().max().item()
    assert error < 0.05 * full_logits(reference, ids).abs().max().item() + 0.02
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 4)
    check_training_step_is_finite(model, ids)


def test_fp64_model_matches_fp32():
    model = tiny_model("mlp", "mamba")
    ids = random_ids(2, 9, seed=12)
    double = tiny_model("mlp", "mamba").double()
    assert (double(ids).logits - full_logits(model, ids).double()).abs().max().item() < 1e-5


def test_rope_gradient_is_the_inverse_rotation():
    # The written-out backward against autograd through the rotation itself, fp64, random positions and inputs.
    from ttt_hf.ttt.modeling_ttt import InterleavedRope, _rotate_pairs, rope_angles

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_angles(torch.randint(0, 16, (2, 7), generator=g), 8, 10000.0, torch.float64)
    assert torch.autograd.gradcheck(lambda x: InterleavedRope.apply(x, cos, sin), (x,))
    d_out = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (mine,) = torch.autograd.grad(InterleavedRope.apply(x, cos, sin), x, d_out)
    (want,) = torch.autograd.grad(_rotate_pairs(x, cos, sin), x, d_out)
    assert torch.allclose(mine, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mini_batch_size=0), "mini_batch_size"),
        (dict(hidden_size=30), "num_attention_heads"),
        (dict(hidden_size=12, num_attention_heads=4), "head_dim"),
        (dict(ttt_layer_type="conv"), "ttt_layer_type"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(conv_kernel=0), "conv_kernel"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(ttt_base_lr=-1.0), "ttt_base_lr"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(pre_conv="yes"), "pre_conv"),
        (dict(scan_checkpoint_group_size=-2), "scan_checkpoint_group_size"),
        (dict(pretraining_tp=2), "pretraining_tp"),
        (dict(max_position_embeddings=-5), "max_position_embeddings"),
        (dict(max_position_embeddings="abc"), "max_position_embeddings"),
        (dict(ttt_base_lr=float("nan")), "ttt_base_lr"),
        (dict(rope_theta=float("inf")), "rope_theta"),
        (dict(hidden_act="nope"), "hidden_act"),
    ],
)
def test_invalid_config_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_bad_inputs_raise_clear_errors(model):
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(ids[0])
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        model(inputs_embeds=torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="attention_mask must be a 2-D"):
        model(ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="attention_mask must be a 2-D"):
        model(ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5)[None])
    with pytest.raises(TypeError, match="cache must be a TTTCache"):
        model(ids, cache=DynamicCache())
    cache = TTTCache(model.config)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids[:1], cache=cache)
    other = TTTCache(tiny_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"num_hidden_layers=3 \(this model: 2\)"):
        model(ids, cache=other)


def test_official_config_field_names_round_trip(tmp_path):
    config = TTTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32, vocab_size=50)
    config.save_pretrained(tmp_path)
    loaded = TTTConfig.from_pretrained(tmp_path)
    for name in (
        "ttt_layer_type",
        "pre_conv",
        "share_qk",
        "use_gate",
        "mini_batch_size",
        "ttt_base_lr",
        "conv_kernel",
        "scan_checkpoint_group_size",
        "kernel_backend",
    ):
        assert getattr(loaded, name) == getattr(config, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activations_are_recomputed_with_the_same_gradients(monkeypatch, dtype):
    """Training recomputes the gated output norm and the MLP's gated activation in the backward instead of keeping
    their activations; the gradients are those of the plain forward."""
    import ttt_hf.ttt.modeling_ttt as modeling

    model = tiny_model("linear", "mamba").to(dtype).train()
    regions = 2 * model.config.num_hidden_layers
    kept = check_recomputation_keeps_the_gradients(model, random_ids(2, 13), modeling, monkeypatch, regions)
    assert {"model.layers.0.ttt.g_proj.weight", "model.layers.0.mlp.gate_proj.weight"} <= kept.keys()
