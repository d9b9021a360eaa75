"""`generate` contract of every model family, under whichever transformers release runs the suite.

Every TTT variant (Linear/MLP x Mamba/Transformer backbone) and every Block-State one (SH/MH/MF context x S4D /
implicit-filter SSM): greedy tokens on a left-padded batch equal a loop of full forwards without a cache, with
the cache `generate` makes and with one passed in; beam search, seeded sampling with several return sequences
and a continuation from the returned cache equal the same generation without a cache. Also the cache argument's
two names (`cache`, and `past_key_values` as transformers before 5.24 and older user code spell it).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers
from generation_testing import (
    FAMILIES,
    NEW_TOKENS,
    ROWS,
    generation_model,
    greedy_without_cache,
    new_cache,
    padded_prompts,
)
from model_testing import cache_arg, left_pad, random_ids, returned_cache

from ttt_hf import CACHE_NAME, BlockStateCache, TTTCache


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return generation_model(family)


def test_greedy_left_padded_equals_full_forwards_without_cache(model):
    ids, mask = padded_prompts()
    expected = greedy_without_cache(model, ids, mask, NEW_TOKENS)
    # Not a degenerate model: the rows' continuations differ from one another.
    assert len({tuple(row) for row in expected[:, -NEW_TOKENS:].tolist()}) == len(ROWS)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        default = model.generate(ids, **kwargs)
        passed = new_cache(model)
        given = model.generate(ids, **cache_arg(passed), **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(default.sequences, expected)
    assert torch.equal(given.sequences, expected)
    assert torch.equal(uncached.sequences, expected)
    assert isinstance(returned_cache(default), type(passed)) and returned_cache(given) is passed
    # Every token but the last generated one went through the cache; padding did not move the rows' positions.
    assert passed.get_seq_length() == max(ROWS) + NEW_TOKENS - 1
    assert passed.positions.tolist() == [n + NEW_TOKENS - 1 for n in ROWS]


def test_beam_search_with_cache_equals_without(model):
    ids, mask = padded_prompts(seed=10)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        cached = model.generate(ids, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (2 * len(ROWS), max(ROWS) + NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert (cached.sequences_scores - uncached.sequences_scores).abs().max().item() <= 1e-4
    # The beams were reordered at least once, so reorder_cache ran on rows at different positions.
    assert (cached.beam_indices[:, :NEW_TOKENS] != cached.beam_indices[:, :1]).any()


def test_seeded_sampling_with_return_sequences_equals_without_cache(model):
    ids, mask = padded_prompts(seed=20)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, num_return_sequences=3)
    runs = []
    for use_cache, seed in ((True, 5), (False, 5), (True, 6)):
        torch.manual_seed(seed)
        with torch.no_grad():
            runs.append(model.generate(ids, use_cache=use_cache, **kwargs))
    cached, uncached, other_seed = runs
    assert cached.shape == (3 * len(ROWS), max(ROWS) + NEW_TOKENS)
    assert torch.equal(cached[:, : max(ROWS)], ids.repeat_interleave(3, dim=0))
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, other_seed)


def test_continuing_from_the_returned_cache(model):
    ids, mask = padded_prompts(seed=30)
    first_new, second_new = 3, 5
    with torch.no_grad():
        first = model.generate(
            ids, attention_mask=mask, max_new_tokens=first_new, do_sample=False, return_dict_in_generate=True
        )
        cache = returned_cache(first)
        # A new turn of different lengths per row, left-padded inside the conversation.
        turn = [random_ids(1, n, seed=40 + n)[0] for n in (2, 5, 1)]
        turn_ids, turn_mask = left_pad(turn, 5)
        sequences = torch.cat([first.sequences, turn_ids], dim=1)
        full_mask = torch.cat([mask, torch.ones(len(ROWS), first_new, dtype=mask.dtype), turn_mask], dim=1)
        continued = model.generate(
            sequences, attention_mask=full_mask, max_new_tokens=second_new, do_sample=False, **cache_arg(cache)
        )
    assert torch.equal(continued, greedy_without_cache(model, sequences, full_mask, second_new))


def test_non_finite_padding_embeddings_never_reach_real_tokens(model):
    ids, mask = padded_prompts(seed=70)
    embeds = model.get_input_embeddings()(ids).detach()
    poisoned = embeds.masked_fill(~mask.bool()[..., None], float("nan"))
    poisoned[1, 0] = float("inf")
    real = mask.bool()
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        full = model(inputs_embeds=poisoned, attention_mask=mask, use_cache=False).logits
        cache = new_cache(model)
        first = model(inputs_embeds=poisoned[:, :4], attention_mask=mask[:, :4], cache=cache).logits
        rest = model(inputs_embeds=poisoned[:, 4:], attention_mask=mask, cache=cache).logits
    for logits in (full, torch.cat([first, rest], dim=1)):
        assert torch.isfinite(logits[real]).all()
        assert (logits - expected)[real].abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.usefixtures("no_tf32")
def test_greedy_on_cuda_equals_full_forwards_without_cache(family):
    """On CUDA: the Triton kernels (chunk prefill, decode steps), and the cache on the device."""
    model = generation_model(family).cuda()
    ids, mask = (t.cuda() for t in padded_prompts())
    expected = greedy_without_cache(model, ids, mask, NEW_TOKENS)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, expected)
    assert torch.equal(expected.cpu(), greedy_without_cache(generation_model(family), *padded_prompts(), NEW_TOKENS))


# ---------------------------------------------------------------------------------------------------------------
# The cache argument's names
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ttt-linear-mamba", "block_state-mf-s4d"], indirect=True)
def test_cache_and_past_key_values_name_the_same_argument(model):
    ids, mask = padded_prompts(seed=50)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, use_cache=False).logits
        by_name = {}
        for name in ("cache", "past_key_values"):
            cache = new_cache(model)
            prefill = model(ids[:, :5], attention_mask=mask[:, :5], **{name: cache})
            step = model(ids[:, 5:], attention_mask=mask, **{name: cache})
            assert cache.get_seq_length() == ids.shape[1]
            by_name[name] = torch.cat([prefill.logits, step.logits], dim=1)
        with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
            model(ids, cache=new_cache(model), past_key_values=new_cache(model))
    real = mask.bool()
    for logits in by_name.values():
        assert (logits - reference)[real].abs().max().item() <= 1e-5


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("family", ["ttt-mlp-transformer", "block_state-sh-implicit"], indirect=True)
def test_outputs_carry_the_cache_under_the_release_name_and_read_under_both(model):
    ids = random_ids(2, 5)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        base_out = model.model(ids, use_cache=True)
    logger, warnings = transformers.logging.get_logger(), _Warnings()  # transformers' loggers don't propagate
    for output in (out, base_out):
        assert CACHE_NAME in output.keys()
        assert isinstance(output[CACHE_NAME], (TTTCache, BlockStateCache))
        logger.addHandler(warnings)
        try:
            assert output.cache is output[CACHE_NAME]  # the current name, without a deprecation warning
            assert output.past_key_values is output[CACHE_NAME]  # the old name, deprecated from 5.24 on
        finally:
            logger.removeHandler(warnings)
    # Only the old name warned (once: transformers' `warning_once`), and only where it is deprecated.
    assert len(warnings.messages) == (CACHE_NAME == "cache") and all("deprecated" in m for m in warnings.messages)
    assert out.to_tuple()[1] is out.cache


@pytest.mark.parametrize("family", ["ttt-linear-mamba", "block_state-mh-implicit"], indirect=True)
def test_trainer_predict_with_the_cache_on_returns_the_logits_alone(model, tmp_path):
    # Trainer drops the output keys the config lists (by default `cache` from 5.25 on, `past_key_values` before).
    args = transformers.TrainingArguments(
        str(tmp_path), use_cpu=True, use_cache=True, per_device_eval_batch_size=2, report_to=[], disable_tqdm=True
    )
    ids = random_ids(4, 6)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    prediction = transformers.Trainer(model=model, args=args).predict(dataset)
    assert model.config.use_cache
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert isinstance(prediction.predictions, np.ndarray)
    np.testing.assert_allclose(prediction.predictions, expected.numpy(), atol=1e-5)


def _cached_tensors(cache) -> list[torch.Tensor]:
    tensors = []
    for layer in cache.layers:
        for value in vars(layer).values():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            tensors += [t for t in values if isinstance(t, torch.Tensor)]
    assert tensors
    return tensors


ARCHITECTURE_CHANGES = {
    "ttt-linear-mamba": [dict(ttt_layer_type="mlp"), dict(pre_conv=False), dict(mini_batch_size=8)],
    "block_state-sh-s4d": [dict(context_mode="mf"), dict(ssm_kind="implicit"), dict(attend_previous_block=True)],
}


@pytest.mark.parametrize("family", list(ARCHITECTURE_CHANGES), indirect=True)
def test_a_cache_refuses_a_model_of_another_architecture_before_changing(family, model):
    ids = random_ids(2, 6)
    for change in ARCHITECTURE_CHANGES[family]:
        cache = new_cache(model)
        with torch.no_grad():
            model(ids, **{CACHE_NAME: cache})
            state = _cached_tensors(cache), cache.positions, cache.get_seq_length()
            other = generation_model(family)
            other.config.update(change)
            other = type(model)(other.config).eval()
            name, value = next(iter(change.items()))
            with pytest.raises(ValueError, match=f"another architecture: {name}=.*this model: {value!r}"):
                other(ids, cache=cache)
        # Nothing changed: the cache holds the same tensors, positions and length.
        assert all(a is b for a, b in zip(_cached_tensors(cache), state[0], strict=True))
        assert cache.positions is state[1] and cache.get_seq_length() == state[2]


@pytest.mark.parametrize("family", ["ttt-mlp-mamba", "block_state-mf-implicit"], indirect=True)
def test_malformed_inputs_are_refused_with_the_argument_named(model):
    vocab, ids = model.config.vocab_size, random_ids(2, 5)
    cases = [
        (dict(input_ids=ids[:, :0]), ValueError, "input_ids must hold at least one token"),
        (dict(input_ids=ids.index_fill(1, torch.tensor([3]), vocab)), ValueError, rf"\[0, {vocab}\).*to {vocab}"),
        (dict(input_ids=-ids), ValueError, "input_ids must be token ids"),
        (dict(input_ids=ids.float()), TypeError, "integer token ids"),
        (
            dict(inputs_embeds=torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64)),
            TypeError,
            "inputs_embeds must have the model's dtype torch.float32, got torch.float64",
        ),
        (dict(inputs_embeds=torch.randn(2, 0, model.config.hidden_size)), ValueError, "inputs_embeds must hold"),
    ]
    for inputs, error, message in cases:
        with pytest.raises(error, match=message), torch.no_grad():
            model(**inputs)
    cache = new_cache(model)
    with torch.no_grad():
        model(ids, cache=cache)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 2\).*\[0, 2\]"):
        cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache.positions.tolist() == [5, 5]


@pytest.mark.parametrize("family", ["ttt-linear-transformer", "block_state-sh-implicit"], indirect=True)
def test_an_empty_prompt_is_refused_by_generate_with_the_shape_named(model):
    for batch in (1, 2):  # with 2 rows transformers itself would fail first, on its right-padding check
        with pytest.raises(ValueError, match=rf"at least one token per row, got shape \({batch}, 0\)"):
            model.generate(torch.zeros(batch, 0, dtype=torch.long), max_new_tokens=2)
        with pytest.raises(ValueError, match=rf"got shape \({batch}, 0, {model.config.hidden_size}\)"):
            model.generate(inputs_embeds=torch.zeros(batch, 0, model.config.hidden_size), max_new_tokens=2)


@pytest.mark.parametrize("family", ["ttt-mlp-mamba", "block_state-mh-s4d"], indirect=True)
def test_a_mask_that_does_not_match_the_cache_is_refused_before_changing_it(model):
    """A used cache with a new prompt (what `generate` hands a model when a finished cache is passed again) or a
    mask of the wrong length: refused, naming both lengths, with the cache untouched."""
    ids, mask = padded_prompts(seed=70)
    cache = new_cache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        state = _cached_tensors(cache), cache.positions, cache.get_seq_length()
        for columns in (4, ids.shape[1], ids.shape[1] + 5):
            with pytest.raises(
                ValueError,
                match=rf"covers {columns} columns, but the cache has seen {ids.shape[1]} "
                r"and the input adds 2: it must cover all .*cache.reset\(\)",
            ):
                model(ids[:, :2], attention_mask=torch.ones(3, columns, dtype=torch.long), cache=cache)
        assert all(a is b for a, b in zip(_cached_tensors(cache), state[0], strict=True))
        assert cache.positions is state[1] and cache.get_seq_length() == state[2]
        # A padded new prompt handed to generate with the finished cache: the mask is the prompt's alone.
        other, other_mask = padded_prompts(seed=71)
        with pytest.raises(ValueError, match="A used cache continues only from the whole sequence so far"):
            model.generate(other[:, :5], attention_mask=other_mask[:, :5], max_new_tokens=2, **cache_arg(cache))
        assert cache.positions is state[1] and cache.get_seq_length() == state[2]
        # Masks over the new tokens only, or over everything, still continue.
        model(ids[:, :2], attention_mask=torch.ones(3, 2, dtype=torch.long), cache=cache)
        model(ids[:, :2], attention_mask=torch.ones(3, ids.shape[1] + 4, dtype=torch.long), cache=cache)
    assert cache.get_seq_length() == ids.shape[1] + 4


def test_the_release_name_is_the_one_transformers_generate_uses():
    # From 5.24 on `generate` deprecates `past_key_values` in favour of `cache`.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    assert CACHE_NAME == ("cache" if (major, minor) >= (5, 24) else "past_key_values")


@pytest.mark.skipif(CACHE_NAME != "cache", reason="transformers before 5.24 has only `past_key_values`")
@pytest.mark.parametrize("family", ["ttt-linear-transformer", "block_state-mh-s4d"], indirect=True)
def test_generate_takes_the_deprecated_name_too(model):
    ids, mask = padded_prompts(seed=60)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, cache=new_cache(model), **kwargs)
        with pytest.warns(FutureWarning, match="past_key_values"):
            old_name = model.generate(ids, past_key_values=new_cache(model), **kwargs)
    assert torch.equal(old_name, expected)


@pytest.mark.skipif(CACHE_NAME == "cache", reason="transformers >= 5.24 hands the cache over as `cache`")
def test_generate_with_cache_before_5_24_fails_clearly():
    model = generation_model("ttt-linear-mamba")
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="transformers < 5.24 takes it as `past_key_values=`"):
        model.generate(ids, cache=new_cache(model), max_new_tokens=3, do_sample=False)
