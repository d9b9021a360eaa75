"""Block-State models inside the Hugging Face stack: Auto classes, save/load (also with trust_remote_code in a
fresh process), generation (greedy, beam search, sampling, left padding, continuing from the cache), Trainer with
gradient accumulation, gradient checkpointing, PEFT LoRA and accelerate loading."""

import os

# Nothing here may touch the network (read by huggingface_hub at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402
import torch  # noqa: E402
from block_state_testing import random_ids, tiny_config, tiny_model  # noqa: E402
from integration_testing import (  # noqa: E402
    env_without_ttt_hf,
    lora_module_names,
    max_abs_diff,
    param_snapshot,
    sgd_steps,
    train,
    uncached_logits,
)
from model_testing import cache_arg, returned_cache  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

import ttt_hf  # noqa: E402
from ttt_hf import BlockStateCache, BlockStateConfig, BlockStateForCausalLM, BlockStateModel  # noqa: E402
from ttt_hf.block_state.modeling_block_state import BlockStateDecoderLayer, HeadwiseLinear  # noqa: E402

# transformers >= 5.23 deprecates the (still working) gradient_checkpointing_* names that these tests and PEFT use.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")

W = 4  # tiny_config's block_size
SH = dict(context_mode="sh")
SH_PREV = dict(context_mode="sh", attend_previous_block=True)
MH = dict(context_mode="mh")
MF = dict(context_mode="mf")
MF_PREV_PARTIAL = dict(context_mode="mf", attend_previous_block=True, ssm_layers=[1])
SH_IMPLICIT = dict(context_mode="sh", ssm_kind="implicit")
MH_IMPLICIT = dict(context_mode="mh", ssm_kind="implicit")
MF_IMPLICIT = dict(context_mode="mf", ssm_kind="implicit")
MODEL_FILES = {
    "configuration_block_state.py",
    "modeling_block_state.py",
    "cache_block_state.py",
    "ssm_ops.py",
    "block_state_triton.py",
    "tensor_parallel.py",
}


def _id(variant: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in variant.items())


def _generation_model(variant: dict, seed: int):
    """A model whose greedy outputs depend on the context and do not just repeat the last token (with tied
    embeddings and small weights, a tiny model mostly predicts its input token again): untied, sharper lm_head."""
    model = tiny_model(seed, tie_word_embeddings=False, **variant)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.generation_config.eos_token_id = None  # fixed-length outputs
    return model


# ----------------------------------------------------------------------------------------------------------------
# 1. Auto classes and PEFT registration
# ----------------------------------------------------------------------------------------------------------------


def test_auto_classes_are_registered():
    config = AutoConfig.for_model(
        "block_state",
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        context_mode="mf",
        num_context_states=5,
    )
    assert type(config) is BlockStateConfig
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (32, 4, 8)
    assert config.filters_per_feature == 5

    tiny = tiny_config(**MH)
    causal_lm = AutoModelForCausalLM.from_config(tiny)
    assert type(causal_lm) is BlockStateForCausalLM
    assert causal_lm.config.num_hidden_layers == 2 and len(causal_lm.model.layers) == 2
    assert isinstance(causal_lm.model.layers[0].attn.cross_k_proj, HeadwiseLinear)
    base = AutoModel.from_config(tiny)
    assert type(base) is BlockStateModel
    assert base.embed_tokens.weight.shape == (96, 32)

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["block_state"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "cross_q_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


# ----------------------------------------------------------------------------------------------------------------
# 2. save_pretrained -> from_pretrained in the same process
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [SH_PREV, MF_IMPLICIT], ids=_id)
def test_save_and_load_round_trip(tmp_path, variant):
    model = tiny_model(3, **variant)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)

    assert type(loaded) is BlockStateForCausalLM
    assert not loaded.training
    for key in (
        "context_mode",
        "ssm_kind",
        "attend_previous_block",
        "ssm_layers",
        "block_size",
        "ssm_state_size",
        "num_context_states",
        "ssm_filter_max_len",
        "hidden_size",
        "kernel_backend",
    ):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    # lm_head stays tied to the input embedding (one tensor, stored once).
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["tie_word_embeddings"] is True and saved["model_type"] == "block_state"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored

    reference = model.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name

    ids = random_ids(2, 11, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert torch.equal(uncached_logits(loaded, ids), uncached_logits(model, ids))
    assert torch.equal(
        uncached_logits(loaded, ids, attention_mask=mask), uncached_logits(model, ids, attention_mask=mask)
    )

    # The same causal-LM folder loads as the bare BlockStateModel (prefix `model.` stripped).
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is BlockStateModel
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


# ----------------------------------------------------------------------------------------------------------------
# 3. trust_remote_code in a fresh process that cannot import ttt_hf
# ----------------------------------------------------------------------------------------------------------------

_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["ttt_hf"] = None  # the editable install's finder would import it otherwise
    try:
        import ttt_hf  # noqa: F401
    except ImportError:
        ttt_hf_importable = False
    else:
        ttt_hf_importable = True

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    ids = torch.load(sys.argv[1])
    results = {"ttt_hf_importable": ttt_hf_importable}
    for name, folder in zip(sys.argv[3::2], sys.argv[4::2]):
        lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        lm.generation_config.eos_token_id = None
        with torch.no_grad():
            out = lm(ids, use_cache=True)
            generated = lm.generate(ids, max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
            results[name] = {
                "logits": lm(ids, use_cache=False).logits,
                "cached_logits": out.logits,
                "last_hidden_state": base(ids, use_cache=False).last_hidden_state,
                "lm_class": type(lm).__module__ + "." + type(lm).__name__,
                "base_class": type(base).__module__ + "." + type(base).__name__,
                "cache_class": type(out.cache).__module__ + "." + type(out.cache).__name__,
                "generate_cache_class": type(getattr(generated, sys.modules[type(lm).__module__].CACHE_NAME)).__name__,
                "sequences": generated.sequences,
                "tied": lm.lm_head.weight is lm.model.embed_tokens.weight,
                "training": lm.training or base.training,
            }
        # PEFT's default LoRA targets, registered by the folder's code.
        lora = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", r=4))
        adapted = {path.split(".")[-1] for path, module in lora.named_modules() if hasattr(module, "lora_A")}
        results[name]["lora_targets"] = sorted(adapted)
    results["ttt_hf_modules"] = sorted(
        m for m in sys.modules if m.split(".")[0] == "ttt_hf" and sys.modules[m] is not None
    )
    torch.save(results, sys.argv[2])
    """
)


def test_trust_remote_code_in_fresh_process_without_ttt_hf(tmp_path):
    models = {"mh": tiny_model(5, **MH), "mf_implicit": tiny_model(6, **MF_IMPLICIT)}
    folders = {}
    for name, model in models.items():
        folder = tmp_path / f"block_state_{name}"
        model.save_pretrained(folder)
        folders[name] = folder
        assert MODEL_FILES <= {p.name for p in folder.iterdir()}
        with open(folder / "config.json") as f:
            config = json.load(f)
        assert config["model_type"] == "block_state"
        assert config["auto_map"] == {
            "AutoConfig": "configuration_block_state.BlockStateConfig",
            "AutoModel": "modeling_block_state.BlockStateModel",
            "AutoModelForCausalLM": "modeling_block_state.BlockStateForCausalLM",
        }
        # The copied code is the package's code.
        package_dir = Path(ttt_hf.__file__).parent / "block_state"
        for file_name in MODEL_FILES:
            assert (folder / file_name).read_text() == (package_dir / file_name).read_text(), file_name

    ids = random_ids(2, 13, seed=7)
    torch.save(ids, tmp_path / "ids.pt")
    env = env_without_ttt_hf(tmp_path)

    out = tmp_path / "out.pt"
    args = [str(tmp_path / "ids.pt"), str(out)]
    for name, folder in folders.items():
        args += [name, str(folder)]
    proc = subprocess.run(
        [sys.executable, "-c", _REMOTE_CODE_SCRIPT, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = torch.load(out)

    assert results["ttt_hf_importable"] is False
    assert results["ttt_hf_modules"] == []
    for name, model in models.items():
        res = results[name]
        for key, suffix in (
            ("lm_class", "modeling_block_state.BlockStateForCausalLM"),
            ("base_class", "modeling_block_state.BlockStateModel"),
            ("cache_class", "cache_block_state.BlockStateCache"),
        ):
            assert res[key].startswith("transformers_modules.") and res[key].endswith(suffix), res[key]
        assert res["generate_cache_class"] == "BlockStateCache"
        assert res["tied"] is True and res["training"] is False
        names = {path.split(".")[-1] for path, _ in model.named_modules()}
        assert res["lora_targets"] == sorted(names & set(ttt_hf.PEFT_TARGET_MODULES["block_state"]))
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            hidden = model.model(ids, use_cache=False).last_hidden_state
            sequences = model.generate(ids, max_new_tokens=7, do_sample=False)
        assert res["logits"].shape == logits.shape and res["last_hidden_state"].shape == hidden.shape
        assert (res["logits"] - logits).abs().max().item() <= 1e-6
        assert (res["cached_logits"] - logits).abs().max().item() <= 1e-4
        assert (res["last_hidden_state"] - hidden).abs().max().item() <= 1e-6
        assert torch.equal(res["sequences"], sequences)
        assert res["sequences"].shape == (2, 13 + 7)
    # The remote code really ran the model: different models, different outputs.
    assert not torch.allclose(results["mh"]["logits"], results["mf_implicit"]["logits"])


# ----------------------------------------------------------------------------------------------------------------
# 4. Generation: greedy, beam search, sampling, left padding, continuing from the returned cache
# ----------------------------------------------------------------------------------------------------------------

_PROMPT = 6  # ends inside the second block: generation crosses several block boundaries
_NEW = 3 * W + 1


@pytest.mark.parametrize("variant", [SH_PREV, MF_IMPLICIT], ids=_id)
def test_greedy_generate_equals_argmax_loop_without_cache(variant):
    model = _generation_model(variant, seed=21)
    ids = random_ids(2, _PROMPT, seed=22)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=_NEW, do_sample=False, return_dict_in_generate=True, output_scores=True
        )
    assert isinstance(returned_cache(out), BlockStateCache)
    # The cache has consumed every token but the last generated one.
    assert returned_cache(out).get_seq_length() == _PROMPT + _NEW - 1
    assert returned_cache(out).positions.tolist() == [_PROMPT + _NEW - 1] * 2

    sequence = ids
    for step in range(_NEW):
        logits = uncached_logits(model, sequence)[:, -1]
        assert (out.scores[step] - logits).abs().max().item() <= 1e-4, step
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)
    # Not a degenerate model: the generated tokens vary, and depend on the first block of the prompt.
    assert len(set(out.sequences[:, _PROMPT:].flatten().tolist())) > 8
    changed = ids.clone()
    changed[:, 0] = 3 + (changed[:, 0] + 7) % 90
    with torch.no_grad():
        other = model.generate(changed, max_new_tokens=_NEW, do_sample=False)
    assert not torch.equal(other[:, _PROMPT:], out.sequences[:, _PROMPT:])


@pytest.mark.parametrize("variant", [MH, MF_PREV_PARTIAL], ids=_id)
def test_beam_search_with_cache_equals_without_cache(variant):
    model = _generation_model(variant, seed=23)
    ids = random_ids(2, _PROMPT, seed=24)
    kwargs = dict(
        max_new_tokens=_NEW,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert isinstance(returned_cache(cached), BlockStateCache)
    assert returned_cache(cached).positions.shape == (6,)  # batch x beams
    assert returned_cache(uncached) is None
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.beam_indices, uncached.beam_indices)
    assert (cached.sequences_scores - uncached.sequences_scores).abs().max().item() <= 1e-4
    # Beams really were reordered (otherwise reorder_cache would go untested).
    used = cached.beam_indices[:, :_NEW]
    assert (used != used[:, :1]).any()
    # Beam search is not greedy search here.
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=_NEW, do_sample=False)
    assert not torch.equal(cached.sequences[::2], greedy)


@pytest.mark.parametrize("variant", [SH, MH_IMPLICIT], ids=_id)
def test_sampling_with_num_return_sequences_with_cache_equals_without_cache(variant):
    model = _generation_model(variant, seed=25)
    ids = random_ids(2, _PROMPT, seed=26)
    kwargs = dict(max_new_tokens=_NEW, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, num_return_sequences=3)
    with torch.no_grad():
        torch.manual_seed(27)
        cached = model.generate(ids, use_cache=True, **kwargs)
        torch.manual_seed(27)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        torch.manual_seed(28)
        other_seed = model.generate(ids, use_cache=True, **kwargs)
    assert cached.shape == (6, _PROMPT + _NEW)
    assert torch.equal(cached[:, :_PROMPT], ids.repeat_interleave(3, dim=0))
    assert torch.equal(cached, uncached)
    # The samples are random: the return sequences of one prompt differ, and so does another seed.
    assert not torch.equal(cached[0], cached[1]) and not torch.equal(cached[3], cached[4])
    assert not torch.equal(cached, other_seed)


def _left_pad(rows, pad_id=0):
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        mask[r, width - len(row) :] = 1
    return ids, mask


@pytest.mark.parametrize("variant", [SH_PREV, MF, MH_IMPLICIT], ids=_id)
def test_left_padded_batch_generate_equals_each_row_alone(variant):
    model = _generation_model(variant, seed=29)
    assert model.generation_config.pad_token_id == 0
    rows = [random_ids(1, n, seed=30 + n)[0] for n in (9, 2, 5)]  # three different block offsets
    ids, mask = _left_pad(rows)
    beam = dict(num_beams=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=_NEW, do_sample=False)
        # Beam search reorders a cache whose rows sit at different positions.
        batch_beams = model.generate(ids, attention_mask=mask, max_new_tokens=_NEW, **beam)
    assert batch.shape == (3, 9 + _NEW)
    for r, row in enumerate(rows):
        with torch.no_grad():
            # The references run without a cache: padding and caching are checked together.
            alone = model.generate(row[None], max_new_tokens=_NEW, do_sample=False, use_cache=False)
            alone_beams = model.generate(row[None], max_new_tokens=_NEW, use_cache=False, **beam)
        assert torch.equal(batch[r, 9 - len(row) :], alone[0]), r
        assert torch.equal(batch[r, : 9 - len(row)], torch.zeros(9 - len(row), dtype=torch.long))
        assert torch.equal(batch_beams.sequences[r, 9 - len(row) :], alone_beams.sequences[0]), r
        assert (batch_beams.sequences_scores[r] - alone_beams.sequences_scores[0]).abs().item() <= 1e-5, r


@pytest.mark.parametrize("variant", [MH, MF_IMPLICIT], ids=_id)
def test_continuing_generate_from_the_returned_cache(variant):
    model = _generation_model(variant, seed=31)
    rows = [random_ids(1, n, seed=32 + n)[0] for n in (7, 3)]
    ids, mask = _left_pad(rows)
    first_new, second_new = 5, 6
    with torch.no_grad():
        first = model.generate(
            ids, attention_mask=mask, max_new_tokens=first_new, do_sample=False, return_dict_in_generate=True
        )
        cache = returned_cache(first)
        assert isinstance(cache, BlockStateCache)
        # The last generated token is not in the cache yet: the continuation feeds it.
        assert cache.get_seq_length() == 7 + first_new - 1
        assert cache.positions.tolist() == [7 + first_new - 1, 3 + first_new - 1]
        sequences = first.sequences
        full_mask = torch.cat([mask, torch.ones(2, first_new, dtype=mask.dtype)], dim=1)
        kwargs = dict(max_new_tokens=second_new, do_sample=False, return_dict_in_generate=True, output_scores=True)
        continued = model.generate(sequences, attention_mask=full_mask, **cache_arg(cache), **kwargs)
        assert returned_cache(continued) is cache
        assert cache.get_seq_length() == 7 + first_new + second_new - 1
        # A fresh generate over the whole sequence, with its own cache and without any cache, and one generate
        # of all the tokens at once.
        fresh = model.generate(sequences, attention_mask=full_mask, **kwargs)
        uncached = model.generate(sequences, attention_mask=full_mask, use_cache=False, **kwargs)
        at_once = model.generate(ids, attention_mask=mask, max_new_tokens=first_new + second_new, do_sample=False)
    assert continued.sequences.shape == (2, 7 + first_new + second_new)
    assert torch.equal(continued.sequences, fresh.sequences)
    assert torch.equal(continued.sequences, uncached.sequences)
    assert torch.equal(continued.sequences, at_once)
    for step in range(second_new):
        assert (continued.scores[step] - uncached.scores[step]).abs().max().item() <= 1e-4, step
        assert (fresh.scores[step] - uncached.scores[step]).abs().max().item() <= 1e-4, step


# ----------------------------------------------------------------------------------------------------------------
# 5. Trainer: gradient accumulation with num_items_in_batch; -100 labels
# ----------------------------------------------------------------------------------------------------------------

_TRAIN_VARIANT = MF


def _train(tmp_path, batch_size, accumulation, accepts_loss_kwargs=None):
    return train(tmp_path, tiny_model(0, **_TRAIN_VARIANT), batch_size, accumulation, accepts_loss_kwargs)


def test_trainer_gradient_accumulation_matches_full_batch(tmp_path):
    initial = param_snapshot(tiny_model(0, **_TRAIN_VARIANT))
    full_batch = _train(tmp_path, batch_size=4, accumulation=1)
    accumulated = _train(tmp_path, batch_size=2, accumulation=2)

    assert max_abs_diff(full_batch, initial) > 1e-3  # training moved the parameters
    # ... all of them, the SSM and the MF context included.
    for name in full_batch:
        assert not torch.equal(full_batch[name], initial[name]), name
    assert max_abs_diff(full_batch, accumulated) <= 1e-6

    # The test discriminates: averaging micro-batch means (num_items_in_batch ignored) gives other parameters.
    mean_of_means = _train(tmp_path, batch_size=2, accumulation=2, accepts_loss_kwargs=False)
    assert max_abs_diff(full_batch, mean_of_means) > 1e-4


def test_labels_minus_100_are_ignored():
    model = tiny_model(1, **SH_IMPLICIT)
    ids = random_ids(3, 10, seed=8)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 6:] = -100
    labels[2, ::3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, use_cache=False)
    logits = out.logits[:, :-1].double()
    targets = labels[:, 1:]
    valid = targets != -100
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    manual_sum = nll[valid].sum().item()
    num_valid = int(valid.sum())
    assert num_valid == 27 - 3 - 4 - 3
    assert out.loss.item() == pytest.approx(manual_sum / num_valid, rel=1e-5, abs=1e-6)

    # Un-ignoring the masked targets changes the loss.
    with torch.no_grad():
        assert abs(model(ids, labels=ids, use_cache=False).loss.item() - out.loss.item()) > 1e-4
    # With num_items_in_batch (what Trainer passes under gradient accumulation) the loss is sum / num_items.
    with torch.no_grad():
        loss = model(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(50)).loss
    assert loss.item() == pytest.approx(manual_sum / 50, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 6. Gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------

_CKPT_LEN = 3 * W + 2


def _loss_and_grads(model):
    ids = random_ids(2, _CKPT_LEN, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels)  # use_cache defaults to True: dropped when checkpointing
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        grads[name] = param.grad.detach().clone()
    return out.loss.detach(), grads, out.cache


@pytest.mark.parametrize("variant", [SH_PREV, MH, MF_IMPLICIT], ids=_id)
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    ref_loss, ref_grads, ref_cache = _loss_and_grads(tiny_model(2, **variant))
    assert isinstance(ref_cache, BlockStateCache)
    assert max(g.abs().max().item() for g in ref_grads.values()) > 0

    model = tiny_model(2, **variant)
    attn_calls = []
    for layer in model.model.layers:
        layer.attn.register_forward_hook(lambda *args: attn_calls.append(1))
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    for layer in model.model.layers:
        assert isinstance(layer, BlockStateDecoderLayer) and layer.gradient_checkpointing
    loss, grads, cache = _loss_and_grads(model)

    # Checkpointing really recomputes every layer in the backward pass (and turns the cache off) ...
    assert len(attn_calls) == 4
    assert cache is None
    # ... and gives the same loss and gradients.
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    assert max_abs_diff(grads, ref_grads) <= 1e-6

    # Evaluation mode does not checkpoint and caches again.
    model.eval()
    attn_calls.clear()
    with torch.no_grad():
        out = model(random_ids(1, 5, seed=1))
    assert len(attn_calls) == 2 and isinstance(out.cache, BlockStateCache)


# ----------------------------------------------------------------------------------------------------------------
# 7. PEFT LoRA
# ----------------------------------------------------------------------------------------------------------------


def test_peft_lora_default_targets_save_reload_and_merge(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    variant = MF_PREV_PARTIAL  # layer 0 has no SSM, hence no cross_q_proj
    ids = random_ids(2, 10, seed=7)
    base_logits = uncached_logits(tiny_model(0, **variant), ids)
    peft_model = get_peft_model(tiny_model(0, **variant), LoraConfig(task_type="CAUSAL_LM", lora_alpha=32))
    assert set(peft_model.peft_config["default"].target_modules) == set(ttt_hf.PEFT_TARGET_MODULES["block_state"])
    block = (
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    assert lora_module_names(peft_model) == {
        *(f"base_model.model.model.layers.{i}.{proj}" for i in range(2) for proj in block),
        "base_model.model.model.layers.1.attn.cross_q_proj",
    }
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)

    sgd_steps(peft_model, ids, steps=4, lr=10.0)
    lora_b = [p for name, p in peft_model.named_parameters() if ".lora_B." in name]
    assert len(lora_b) == 15 and all(p.abs().max().item() > 0 for p in lora_b)
    peft_logits = uncached_logits(peft_model, ids)
    assert (peft_logits - base_logits).abs().max().item() > 1e-3  # the adapter matters

    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    with open(tmp_path / "adapter_config.json") as f:
        assert set(json.load(f)["target_modules"]) == set(ttt_hf.PEFT_TARGET_MODULES["block_state"])

    reloaded = PeftModel.from_pretrained(tiny_model(0, **variant), tmp_path)
    reloaded_logits = uncached_logits(reloaded, ids)
    assert torch.equal(reloaded_logits, peft_logits)
    # Cached generation runs through the adapter.
    reloaded.generation_config.eos_token_id = None
    with torch.no_grad():
        peft_generated = reloaded.generate(input_ids=ids[:, :5], max_new_tokens=6, do_sample=False)

    merged = reloaded.merge_and_unload()
    assert type(merged) is BlockStateForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (uncached_logits(merged, ids) - peft_logits).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert torch.equal(merged.generate(ids[:, :5], max_new_tokens=6, do_sample=False), peft_generated)


@pytest.mark.parametrize("variant", [MH, SH_IMPLICIT], ids=_id)
def test_peft_lora_all_linear(variant):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(0, **variant)
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    adapted = {name.removeprefix("base_model.model.") for name in lora_module_names(peft_model)}
    assert adapted == linear_names - {"lm_head"}
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    assert {"q_proj", "k_proj", "v_proj", "cross_q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= leaves
    # MH context projections are per-head (HeadwiseLinear, not nn.Linear); the implicit filter's MLP is linear.
    assert ("cross_k_proj" in leaves) == (variant["context_mode"] != "mh")
    assert any(".ssm.mlp." in name for name in adapted) == (variant.get("ssm_kind") == "implicit")
    assert "lm_head" not in leaves
    ids = random_ids(2, 9, seed=1)
    # LoRA B starts at zero: the adapted model computes the base model's function.
    reference = uncached_logits(tiny_model(0, **variant), ids)
    assert (uncached_logits(peft_model, ids) - reference).abs().max().item() <= 1e-6

    # Training the adapters moves the function, and every adapter gets a gradient (the SSM's MLP included).
    peft_model.train()
    peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for name, p in peft_model.named_parameters():
        if ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().max().item() > 0, name
    peft_model.zero_grad()
    sgd_steps(peft_model, ids, steps=2, lr=10.0)
    assert (uncached_logits(peft_model, ids) - reference).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# 8. accelerate and from_pretrained initialisation
# ----------------------------------------------------------------------------------------------------------------


def test_init_empty_weights_puts_everything_on_meta():
    import accelerate

    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config(**MF_PREV_PARTIAL))
    assert type(model) is BlockStateForCausalLM
    # Every parameter of the real model exists, on meta (remove_duplicate=False: lm_head is listed even though
    # init_empty_weights re-creates it as a separate meta tensor instead of keeping it tied, as for any tied model).
    params = dict(model.named_parameters(remove_duplicate=False))
    real = BlockStateForCausalLM(tiny_config(**MF_PREV_PARTIAL))
    real_names = {name for name, _ in real.named_parameters(remove_duplicate=False)}
    # embed, norm, lm_head; per layer 2 norms, q/k/v/o, 3 MLP; layer 1: S4D (5), cross q/k/v, MF context (2).
    assert set(params) == real_names and len(real_names) == 3 + 2 * 9 + 5 + 3 + 2
    assert {"model.layers.1.attn.initial_context", "model.layers.1.attn.ssm.log_dt"} <= real_names
    assert all(p.device.type == "meta" for p in params.values())
    assert all(b.device.type == "meta" for b in model.buffers())


@pytest.mark.parametrize("variant", [SH, MF_IMPLICIT], ids=_id)
def test_from_pretrained_device_map_auto(tmp_path, variant):
    model = tiny_model(11, **variant)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # "auto" fills the GPU first
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and all(t.device.type == device for t in tensors)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_ids(2, 9, seed=2)
    with torch.no_grad():
        out = loaded(ids.to(device), use_cache=True)
        logits = out.logits.cpu()
        step = loaded(random_ids(2, 1, seed=3).to(device), cache=out.cache).logits.cpu()
    # The cache lives where the activations are.
    layer_cache = out.cache.layers[0].tensors
    assert layer_cache and all(t.device.type == device for t in layer_cache.values())
    tol = 0 if device == "cpu" else 1e-4
    assert (logits - uncached_logits(model, ids)).abs().max().item() <= tol
    full = uncached_logits(model, torch.cat([ids, random_ids(2, 1, seed=3)], 1))[:, -1:]
    assert (step - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", [MH, MF_PREV_PARTIAL], ids=_id)
def test_from_pretrained_initialises_every_tensor(tmp_path, variant):
    model = tiny_model(12, **variant)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert tensor.device.type != "meta", name
        assert torch.isfinite(tensor).all(), name
    ids = random_ids(2, 9, seed=3)
    assert torch.equal(uncached_logits(loaded, ids), uncached_logits(model, ids))


def _drop_keys(tmp_path, dropped):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    assert dropped <= set(state), dropped - set(state)
    save_file({k: v for k, v in state.items() if k not in dropped}, path, metadata=metadata)


@pytest.mark.parametrize("variant", [SH, MF], ids=_id)
def test_missing_checkpoint_keys_get_init_weights_values(tmp_path, variant):
    model = tiny_model(13, **variant)
    with torch.no_grad():  # tiny_model leaves a_imag at its initial value
        for layer in model.model.layers:
            layer.attn.ssm.a_imag.add_(0.5)
    model.save_pretrained(tmp_path)
    ssm0, ssm1 = "model.layers.0.attn.ssm", "model.layers.1.attn.ssm"
    dropped = {
        f"{ssm0}.log_a_real",
        f"{ssm0}.a_imag",
        f"{ssm0}.log_dt",
        f"{ssm1}.log_dt",
        "model.layers.1.input_layernorm.weight",
    }
    if variant["context_mode"] == "mf":
        dropped |= {"model.layers.0.attn.initial_context", "model.layers.1.attn.context_ids"}
    _drop_keys(tmp_path, dropped)

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped
    params = dict(loaded.named_parameters())
    reference = dict(model.named_parameters())
    for name in dropped:
        assert params[name].device.type == "cpu" and torch.isfinite(params[name]).all(), name
        # tiny_model perturbed these (or drew them at random): the saved values are not the initial ones.
        assert not torch.equal(params[name], reference[name]), name
    filters = model.config.filters_per_feature
    modes = model.config.ssm_state_size // 2
    # S4D-Lin: A = -1/2 + i pi n, dt log-uniform in [1e-3, 1e-1].
    assert torch.equal(params[f"{ssm0}.log_a_real"], torch.full((filters, 32, modes), math.log(0.5)))
    a_imag = (math.pi * torch.arange(modes, dtype=torch.float32)).expand(filters, 32, modes)
    assert torch.equal(params[f"{ssm0}.a_imag"], a_imag)
    for name in (f"{ssm0}.log_dt", f"{ssm1}.log_dt"):
        log_dt = params[name]
        assert log_dt.shape == (filters, 32)
        assert log_dt.min().item() >= math.log(1e-3) and log_dt.max().item() <= math.log(1e-1), name
        assert log_dt.std().item() > 0.5, name  # spread over the range, not a constant
    assert torch.equal(params["model.layers.1.input_layernorm.weight"], torch.ones(32))
    if variant["context_mode"] == "mf":
        for name in ("model.layers.0.attn.initial_context", "model.layers.1.attn.context_ids"):
            value = params[name]
            assert value.shape == (3, 32)
            assert 0.01 < value.std().item() < 0.03 and value.mean().abs().item() < 0.01, name  # normal(0, 0.02)
    # Keys present in the checkpoint are loaded as saved (not re-initialised by _init_weights), also the other
    # parameters of a module with a missing one (ssm.c and ssm.skip next to the missing S4D parameters).
    for name, param in params.items():
        if name not in dropped:
            assert torch.equal(param, reference[name]), name
    ids = random_ids(1, 9, seed=5)
    assert torch.isfinite(uncached_logits(loaded, ids)).all()


def test_missing_implicit_filter_and_headwise_keys_get_init_weights_values(tmp_path):
    model = tiny_model(14, **MH_IMPLICIT)
    # tiny_model does not perturb these: make the saved values differ from the initial ones.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.ssm.decay.add_(1.0)
            layer.attn.ssm.mlp[2].bias.add_(0.1)
    model.save_pretrained(tmp_path)
    attn = "model.layers.1.attn"
    dropped = {f"{attn}.ssm.decay", f"{attn}.cross_k_proj.weight", f"{attn}.ssm.mlp.2.bias"}
    _drop_keys(tmp_path, dropped)

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped
    params = dict(loaded.named_parameters())
    reference = dict(model.named_parameters())
    for name in dropped:
        assert not torch.equal(params[name], reference[name]), name
    assert torch.equal(params[f"{attn}.ssm.decay"], torch.linspace(0.5, 8.0, 32).expand(4, 32))
    assert torch.equal(params[f"{attn}.ssm.mlp.2.bias"], torch.zeros(16))
    headwise = params[f"{attn}.cross_k_proj.weight"]
    assert headwise.shape == (4, 8, 32)
    assert 0.015 < headwise.std().item() < 0.025 and headwise.mean().abs().item() < 0.005  # normal(0, 0.02)
    for name, param in params.items():
        if name not in dropped:
            assert torch.equal(param, reference[name]), name
