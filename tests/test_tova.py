"""TOVACache on tiny random decoders of every supported family, and against the official TOVA code."""

import weakref

import pytest
import torch
from model_testing import cache_arg, returned_cache
from tova_testing import CASES, SMALL, assert_kept_positions, official_generation
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from ttt_hf import CACHE_NAME, TOVACache, TTTConfig, TTTForCausalLM
from ttt_hf.tova.tova_ops import last_query_scores

FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=16),
    "phi3": lambda: Phi3Config(**SMALL),
    "gemma2": lambda: Gemma2Config(
        **SMALL, head_dim=16, sliding_window=8, attn_logit_softcapping=None, final_logit_softcapping=None
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **SMALL, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
    ),
    "mqa": lambda: LlamaConfig(**{**SMALL, "num_key_value_heads": 1}),
}


SDPA_FAMILIES = [name for name in FAMILIES if name != "gemma2"]  # Gemma 2 supports eager attention only


def family_model(name: str, attn_implementation: str = "sdpa", seed: int = 0):
    if name not in SDPA_FAMILIES:
        attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[name](), attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # peaky attention, so that eviction decisions matter
        for module_name, param in model.named_parameters():
            if any(k in module_name for k in ("q_proj", "k_proj", "qkv_proj")):
                param.mul_(4.0)
    return model


def ids(batch, length, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_reproduces_the_official_generations(case, attn_implementation):
    out, data, cache = official_generation(case, attn_implementation)
    assert torch.equal(out, data["generated"])
    assert_kept_positions(cache, data)


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_above_all_tokens_equals_dynamic_cache(family):
    model = family_model(family)
    prompt = ids(2, 9)
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    tova = model.generate(prompt, **cache_arg(TOVACache(64)), **kwargs)
    dynamic = model.generate(prompt, **cache_arg(DynamicCache(config=model.config)), **kwargs)
    assert torch.equal(tova.sequences, dynamic.sequences)
    # Decode steps attend over budget + 1 slots under a mask: the same function, summed in another order.
    torch.testing.assert_close(torch.stack(tova.logits), torch.stack(dynamic.logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_eager_and_sdpa_keep_the_same_tokens(family):
    prompt = ids(1, 20, seed=1)
    outs = []
    for impl in ("eager", "sdpa"):
        cache = TOVACache(6)
        outs.append(
            (family_model(family, impl).generate(prompt, **cache_arg(cache), max_new_tokens=15, do_sample=False), cache)
        )
    assert torch.equal(outs[0][0], outs[1][0])
    for layer in range(2):
        assert torch.equal(outs[0][1].kept_positions(layer), outs[1][1].kept_positions(layer))


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_physical_length_and_memory_stay_flat(family):
    model = family_model(family)
    budget = 8
    cache = TOVACache(budget)
    sizes = {}
    with torch.no_grad():
        out = model(ids(2, 3), **cache_arg(cache))
        token = out.logits[:, -1:].argmax(-1)
        for step in range(4 * budget):
            out = model(token, **cache_arg(cache))
            token = out.logits[:, -1:].argmax(-1)
            assert all(layer.physical_length <= budget for layer in cache.layers)
            sizes[cache.get_seq_length()] = cache.nbytes
    assert cache.get_seq_length() == 3 + 4 * budget
    assert sizes[budget + 1] == sizes[4 * budget + 3]


def test_a_cache_is_freed_with_its_last_reference():
    # An update that no attention call follows (a cache filled by hand, an error inside the forward) leaves the
    # cache pending for the next attention call: only weakly, so deleting the cache frees its tensors.
    cache = TOVACache(4)
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    alive = weakref.ref(cache)
    del cache
    assert alive() is None
    model = family_model("llama")
    with torch.no_grad():  # and the pending call still finds its cache in a forward
        assert model(ids(1, 5), **cache_arg(TOVACache(4))).logits.shape[1] == 5


def padded_batch():
    """Rows of 17 and 6 tokens, left-padded to 17: (rows, ids, attention mask)."""
    rows = [ids(1, 17, seed=2)[0], ids(1, 6, seed=3)[0]]
    batch = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, row in enumerate(rows):
        batch[r, 17 - len(row) :], mask[r, 17 - len(row) :] = row, 1
    return rows, batch, mask


# Budget 7: the prompt compression drops all but one pad; budget 12: six pads stay and the decode steps drop them
# one by one (swap-remove), each time the highest pad slot, which the newest token then fills.
@pytest.mark.parametrize("budget", [7, 12])
@pytest.mark.parametrize(
    "family, attn_implementation",
    [("llama", "eager"), ("llama", "sdpa"), ("qwen3", "sdpa"), ("gemma2", "eager"), ("gemma3", "sdpa")],
)
def test_left_padded_batch_equals_rows_alone(family, attn_implementation, budget):
    model = family_model(family, attn_implementation)
    rows, batch, mask = padded_batch()
    together = model.generate(
        batch, attention_mask=mask, **cache_arg(TOVACache(budget)), max_new_tokens=12, do_sample=False
    )
    for r, row in enumerate(rows):
        alone = model.generate(row[None], **cache_arg(TOVACache(budget)), max_new_tokens=12, do_sample=False)
        assert torch.equal(together[r, 17 - len(row) :], alone[0])


@pytest.mark.parametrize("policy", ["tova", "window"])
def test_pads_stay_left_and_sink_tokens_survive_decode_evictions(policy):
    model = family_model("llama")
    rows, batch, mask = padded_batch()
    cache = TOVACache(12, num_sink_tokens=2, policy=policy)
    with torch.no_grad():
        out = model(batch, attention_mask=mask, **cache_arg(cache))
        for _ in range(12):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, **cache_arg(cache))
            for layer in range(len(cache.layers)):
                held = cache.kept_positions(layer)
                pads = held[1] < 11  # row 1's columns 0-10 are padding
                assert pads[: int(pads.sum())].all()
                for r, first in enumerate((0, 11)):  # each row's first two real columns are sinks
                    assert {first, first + 1} <= set(held[r].tolist())
    assert not pads.any() and cache.layers[0].physical_length == 12


def test_sink_tokens_and_window_policy():
    model = family_model("llama")
    prompt = ids(1, 30, seed=4)
    sinks = TOVACache(8, num_sink_tokens=4, policy="window")
    with torch.no_grad():
        model(prompt, **cache_arg(sinks))
    assert sinks.kept_positions(0)[0].tolist() == [0, 1, 2, 3, 26, 27, 28, 29]
    tova = TOVACache(8, num_sink_tokens=2)
    with torch.no_grad():
        model(prompt, **cache_arg(tova))
    assert tova.kept_positions(1)[0, :2].tolist() == [0, 1] and tova.kept_positions(1).shape[-1] == 8


def test_scores_are_what_attention_computed_with_softcapping():
    config = Gemma2Config(**SMALL, head_dim=16, sliding_window=64, attn_logit_softcapping=5.0, query_pre_attn_scalar=7)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    attention = model.model.layers[0].self_attn
    captured = {}

    def capture(module, args, kwargs, output):
        captured["weights"] = output[1]

    handle = attention.register_forward_hook(capture, with_kwargs=True)
    recorded = {}
    original = TOVACache.after_attention

    def spy(self, module, query, key, attention_mask, scaling, softcap=None, sinks=None):
        if module.layer_idx == 0:
            recorded["scores"] = last_query_scores(module, query, key, attention_mask, scaling, softcap, sinks)
        return original(self, module, query, key, attention_mask, scaling, softcap, sinks)

    TOVACache.after_attention = spy
    try:
        with torch.no_grad():
            model(ids(1, 12), **cache_arg(TOVACache(4)), output_attentions=True)
    finally:
        TOVACache.after_attention = original
        handle.remove()
    expected = captured["weights"][:, :, -1].float().mean(1)
    torch.testing.assert_close(recorded["scores"], expected, rtol=0, atol=1e-6)


def test_beam_search_sampling_and_continuation():
    model = family_model("llama")
    prompt = ids(2, 10, seed=5)
    mask = torch.ones_like(prompt)
    beams = model.generate(
        prompt, attention_mask=mask, **cache_arg(TOVACache(6)), num_beams=3, max_new_tokens=8, do_sample=False
    )
    assert beams.shape == (2, 18)
    torch.manual_seed(0)
    sampled = model.generate(
        prompt, attention_mask=mask, **cache_arg(TOVACache(6)), do_sample=True, num_return_sequences=2, max_new_tokens=8
    )
    assert sampled.shape == (4, 18)
    first = model.generate(
        prompt,
        attention_mask=mask,
        **cache_arg(TOVACache(6)),
        max_new_tokens=5,
        do_sample=False,
        return_dict_in_generate=True,
    )
    cache = returned_cache(first)
    follow = torch.cat([first.sequences, ids(2, 4, seed=6)], 1)
    more = model.generate(
        follow, attention_mask=torch.ones_like(follow), **cache_arg(cache), max_new_tokens=5, do_sample=False
    )
    assert torch.equal(more[:, : follow.shape[1]], follow) and more.shape[1] == follow.shape[1] + 5
    assert cache.get_seq_length() == follow.shape[1] + 4
    assert all(layer.physical_length == 6 for layer in cache.layers)


@pytest.mark.skipif(CACHE_NAME != "cache", reason="transformers before 5.24 takes the cache as `past_key_values` only")
def test_cache_is_the_primary_name_and_past_key_values_still_works():
    model = family_model("llama")
    prompt = ids(2, 10, seed=7)
    inputs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt))
    generated = model.generate(**inputs, cache=TOVACache(budget=6), max_new_tokens=8, do_sample=False)
    with pytest.warns(FutureWarning, match="past_key_values"):
        old_name = model.generate(**inputs, past_key_values=TOVACache(budget=6), max_new_tokens=8, do_sample=False)
    assert torch.equal(old_name, generated)
    # The forward, a token at a time.
    tova = TOVACache(budget=6)
    with torch.no_grad():
        token = model(prompt, cache=tova).logits[:, -1:].argmax(-1)
        stepped = [token]
        for _ in range(7):
            token = model(token, cache=tova).logits[:, -1:].argmax(-1)
            stepped.append(token)
    assert torch.equal(torch.cat(stepped, 1), generated[:, 10:])
    assert tova.get_seq_length() == 17 and all(layer.physical_length == 6 for layer in tova.layers)


def test_crop_and_assisted_decoding_are_refused():
    model = family_model("llama")
    cache = TOVACache(4)
    with torch.no_grad():
        model(ids(1, 6), **cache_arg(cache))
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    assistant = family_model("llama", seed=1)
    # transformers >= 5.24 refuses a non-croppable cache itself, before any crop.
    with pytest.raises((NotImplementedError, ValueError), match="be cropped"):
        model.generate(
            ids(1, 6), **cache_arg(TOVACache(4)), assistant_model=assistant, max_new_tokens=6, do_sample=False
        )


def test_clear_errors():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            TOVACache(bad)
    with pytest.raises(ValueError, match="num_sink_tokens"):
        TOVACache(4, num_sink_tokens=4)
    with pytest.raises(ValueError, match="policy"):
        TOVACache(4, policy="h2o")
    with pytest.raises(TypeError, match="without attention"):
        TOVACache(4).update_recurrent_state(torch.zeros(1), layer_idx=0)
    with pytest.raises(TypeError, match="TTTCache"):  # a model without attention layers refuses it
        TTTForCausalLM(
            TTTConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
        )(ids(1, 4) % 32, **cache_arg(TOVACache(4)))
    cache = TOVACache(4)
    with torch.no_grad():
        family_model("llama")(ids(1, 6), **cache_arg(cache))
        with pytest.raises(ValueError, match="another model"):
            family_model("qwen2")(ids(1, 6), **cache_arg(cache))


def test_another_model_is_refused_before_any_layer_changes():
    config = FAMILIES["llama"]()
    torch.manual_seed(0)
    first, second = (AutoModelForCausalLM.from_config(config).eval() for _ in range(2))  # one config object
    assert first.config is second.config
    prompt, step = ids(1, 9), ids(1, 1, seed=1)
    cache, untouched = TOVACache(6), TOVACache(6)
    with torch.no_grad():
        first(prompt, **cache_arg(cache))
        first(prompt, **cache_arg(untouched))
        with pytest.raises(ValueError, match="another model"):
            second(step, **cache_arg(cache))
        assert [layer.seen for layer in cache.layers] == [9, 9]
        assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, untouched.layers))
        got, want = (first(step, **cache_arg(c)).logits for c in (cache, untouched))
    assert torch.equal(got, want)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_finished_cache_given_a_new_prompt_is_refused_and_left_as_it_was(attn_implementation):
    """Handed a used cache and a new prompt, generate keeps only the prompt's tail (or nothing): refused with the fix
    named, before any layer changes. Without padding transformers passes no mask at all: nothing can tell a new
    prompt from a continuation then, as with DynamicCache."""
    model = family_model("llama")
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = 0
    prompt, mask = ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    cache = TOVACache(8)
    with torch.no_grad():
        model.generate(prompt, attention_mask=mask, **cache_arg(cache), max_new_tokens=5, do_sample=False)
        kept = [(layer.keys.clone(), layer.positions.clone(), layer.seen) for layer in cache.layers]
        new_prompt, new_mask = ids(2, 10, seed=1), mask[:, 2:]
        with pytest.raises(
            ValueError,
            match=r"has seen 16 tokens, but the attention mask does not cover them and "
            r"the 4 new ones: .*use a new cache or call cache.reset\(\)",
        ):
            model.generate(new_prompt, attention_mask=new_mask, **cache_arg(cache), max_new_tokens=3)
        with pytest.raises(ValueError, match="TOVACache got no new tokens"):  # a prompt up to half the seen length
            model.generate(new_prompt[:, :6], attention_mask=new_mask[:, :6], **cache_arg(cache), max_new_tokens=3)
        assert all(
            torch.equal(layer.keys, keys) and torch.equal(layer.positions, positions) and layer.seen == seen
            for layer, (keys, positions, seen) in zip(cache.layers, kept, strict=True)
        )
        cache.reset()
        reused = model.generate(new_prompt, attention_mask=new_mask, **cache_arg(cache), max_new_tokens=3)
        fresh = model.generate(new_prompt, attention_mask=new_mask, **cache_arg(TOVACache(8)), max_new_tokens=3)
    assert torch.equal(reused, fresh)


def test_a_first_prompt_padded_to_a_fixed_length_is_not_taken_for_a_short_mask():
    model, cache = family_model("llama"), TOVACache(8)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[:, 5:] = 0  # every row ends in padding, as with padding="max_length"
    with torch.no_grad():
        want = model(ids(2, 7), attention_mask=mask).logits
        got = model(ids(2, 7), attention_mask=mask, **cache_arg(cache)).logits
    torch.testing.assert_close(got[:, :5], want[:, :5])
    assert cache.get_seq_length() == 7


def test_a_used_cache_pickles_and_continues():
    import pickle

    model, cache = family_model("llama"), TOVACache(4)
    with torch.no_grad():
        model(ids(1, 6), **cache_arg(cache))
        copy = pickle.loads(pickle.dumps(cache))
        assert torch.equal(copy.kept_positions(0), cache.kept_positions(0))
        step = ids(1, 1)
        want, got = (model(step, **cache_arg(c)).logits for c in (cache, copy))
    assert torch.equal(want, got) and torch.equal(copy.kept_positions(0), cache.kept_positions(0))


def test_flex_block_mask_gives_the_same_scores_as_the_dense_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    batch, q_heads, kv_heads, q_len, kv_len, dim = 2, 4, 2, 3, 10, 16
    torch.manual_seed(0)
    query, key = torch.randn(batch, q_heads, q_len, dim), torch.randn(batch, kv_heads, kv_len, dim)
    first_real = torch.tensor([0, 4])  # row 1 is left-padded by 4 slots

    def mask_mod(b, h, q_idx, kv_idx):  # causal with the queries at the last positions, minus the padding
        return (kv_idx <= q_idx + kv_len - q_len) & (kv_idx >= first_real[b])

    block_mask = create_block_mask(mask_mod, batch, None, q_len, kv_len, device="cpu", _compile=False)
    dense = mask_mod(
        torch.arange(batch)[:, None, None, None],
        0,
        torch.arange(q_len)[None, None, :, None],
        torch.arange(kv_len)[None, None, None, :],
    )
    attention = family_model("llama").model.layers[0].self_attn
    expected = last_query_scores(attention, query, key, dense, 0.25)
    torch.testing.assert_close(last_query_scores(attention, query, key, block_mask, 0.25), expected, rtol=0, atol=0)
    assert torch.isinf(expected[1, :4]).all() and torch.isfinite(expected[1, 4:]).all()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("capturing", [False, True])
def test_a_decode_step_attends_over_every_slot_under_the_caches_own_mask(padded, capturing, monkeypatch):
    # A decode step has a fixed shape: attention sees budget + 1 slots, the free ones and padding hidden by a mask
    # the cache builds from its positions on the device. Under capture (faked: the check is device-bound) the step
    # advances the device alone and the host's counts catch up on their next read. Logits equal DynamicCache's.
    from ttt_hf.tova import cache_tova

    model, budget = family_model("llama"), 16
    prompt = ids(2, 10)
    prompt_mask = torch.ones_like(prompt)
    if padded:
        prompt_mask[1, :3] = 0
    step_mask = torch.cat([prompt_mask, torch.ones(2, 1, dtype=prompt_mask.dtype)], 1)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        masks.append((key.shape[2], attn_mask))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    logits = []
    for cache in (TOVACache(budget), DynamicCache(config=model.config)):
        with torch.no_grad():
            token = model(prompt, attention_mask=prompt_mask, **cache_arg(cache)).logits[:, -1:].argmax(-1)
            monkeypatch.setattr(cache_tova, "_capturing", lambda tensor: capturing)
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
            masks.clear()
            step = dict(attention_mask=step_mask, position_ids=torch.full((2, 1), 10))
            logits.append(model(token, **step, **cache_arg(cache)).logits)
            monkeypatch.undo()
        if isinstance(cache, TOVACache):
            visible = torch.zeros(2, budget + 1, dtype=torch.bool)
            visible[:, :11] = True
            visible[1, :3] = not padded
            assert [(length, mask[:, 0, 0].tolist()) for length, mask in masks] == [(budget + 1, visible.tolist())] * 2
            assert cache.layers[0]._device_ahead == capturing
            assert cache.get_seq_length() == 11 and not cache.layers[0]._device_ahead
            assert torch.equal(cache.kept_positions(0), torch.arange(11).expand(2, -1))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)
