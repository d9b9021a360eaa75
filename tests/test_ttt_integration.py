"""TTT models inside the Hugging Face stack: Auto classes, save/load (also with trust_remote_code in a fresh
process), Trainer with gradient accumulation, gradient checkpointing, PEFT LoRA and accelerate loading."""

import os

# Nothing here may touch the network (read by huggingface_hub at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402
import torch  # noqa: E402
from integration_testing import (  # noqa: E402
    env_without_ttt_hf,
    lora_module_names,
    max_abs_diff,
    param_snapshot,
    sgd_steps,
    train,
    uncached_logits,
)
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402
from ttt_testing import random_ids, tiny_config, tiny_model  # noqa: E402

import ttt_hf  # noqa: E402
from ttt_hf import TTTConfig, TTTForCausalLM, TTTModel  # noqa: E402
from ttt_hf.ttt import ttt_ops  # noqa: E402

# transformers >= 5.23 deprecates the (still working) gradient_checkpointing_* names that these tests and PEFT use.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")

# One Mamba-backbone TTT-Linear and one Transformer-backbone TTT-MLP model cover both backbones and both layers.
MAMBA_LINEAR = ("linear", "mamba")
TRANSFORMER_MLP = ("mlp", "transformer")
TWO_VARIANTS = [MAMBA_LINEAR, TRANSFORMER_MLP]
TWO_IDS = ["-".join(v) for v in TWO_VARIANTS]
MODEL_FILES = {"configuration_ttt.py", "modeling_ttt.py", "cache_ttt.py", "ttt_ops.py", "tensor_parallel.py"}


# ----------------------------------------------------------------------------------------------------------------
# 1. Auto classes and PEFT registration
# ----------------------------------------------------------------------------------------------------------------


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("ttt", hidden_size=32, num_attention_heads=4, intermediate_size=64)
    assert type(config) is TTTConfig
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (32, 4, 8)

    tiny = tiny_config(*MAMBA_LINEAR)
    causal_lm = AutoModelForCausalLM.from_config(tiny)
    assert type(causal_lm) is TTTForCausalLM
    assert causal_lm.config.num_hidden_layers == 2 and len(causal_lm.model.layers) == 2
    base = AutoModel.from_config(tiny)
    assert type(base) is TTTModel
    assert base.embed_tokens.weight.shape == (96, 32)

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["ttt"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "g_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


# ----------------------------------------------------------------------------------------------------------------
# 2. save_pretrained -> from_pretrained in the same process
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", TWO_VARIANTS, ids=TWO_IDS)
def test_save_and_load_round_trip(tmp_path, variant):
    model = tiny_model(*variant, seed=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)

    assert type(loaded) is TTTForCausalLM
    assert not loaded.training
    for key in ("ttt_layer_type", "pre_conv", "share_qk", "use_gate", "mini_batch_size", "ttt_base_lr", "hidden_size"):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    # lm_head stays tied to the input embedding (one tensor, stored once).
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored

    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name

    ids = random_ids(2, 11, seed=4)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    assert torch.equal(uncached_logits(loaded, ids), uncached_logits(model, ids))
    assert torch.equal(
        uncached_logits(loaded, ids, attention_mask=mask), uncached_logits(model, ids, attention_mask=mask)
    )

    # The same causal-LM folder loads as the bare TTTModel (prefix `model.` stripped).
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is TTTModel
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
        with torch.no_grad():
            results[name] = {
                "logits": lm(ids, use_cache=False).logits,
                "last_hidden_state": base(ids, use_cache=False).last_hidden_state,
                "lm_class": type(lm).__module__ + "." + type(lm).__name__,
                "base_class": type(base).__module__ + "." + type(base).__name__,
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
    models = {"mamba": tiny_model(*MAMBA_LINEAR, seed=5), "transformer": tiny_model(*TRANSFORMER_MLP, seed=6)}
    folders = {}
    for name, model in models.items():
        folder = tmp_path / f"ttt_{name}"
        model.save_pretrained(folder)
        folders[name] = folder
        assert MODEL_FILES <= {p.name for p in folder.iterdir()}
        with open(folder / "config.json") as f:
            config = json.load(f)
        assert config["model_type"] == "ttt"
        assert config["auto_map"] == {
            "AutoConfig": "configuration_ttt.TTTConfig",
            "AutoModel": "modeling_ttt.TTTModel",
            "AutoModelForCausalLM": "modeling_ttt.TTTForCausalLM",
        }
        # The copied code is the package's code.
        package_dir = Path(ttt_hf.__file__).parent / "ttt"
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
        assert res["lm_class"].startswith("transformers_modules.") and res["lm_class"].endswith(
            "modeling_ttt.TTTForCausalLM"
        )
        assert res["base_class"].startswith("transformers_modules.") and res["base_class"].endswith(
            "modeling_ttt.TTTModel"
        )
        assert res["tied"] is True and res["training"] is False
        names = {path.split(".")[-1] for path, _ in model.named_modules()}
        assert res["lora_targets"] == sorted(names & set(ttt_hf.PEFT_TARGET_MODULES["ttt"]))
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            hidden = model.model(ids, use_cache=False).last_hidden_state
        assert res["logits"].shape == logits.shape and res["last_hidden_state"].shape == hidden.shape
        assert (res["logits"] - logits).abs().max().item() <= 1e-6
        assert (res["last_hidden_state"] - hidden).abs().max().item() <= 1e-6
    # The remote code really ran the model: different models, different outputs.
    assert not torch.allclose(results["mamba"]["logits"], results["transformer"]["logits"])


# ----------------------------------------------------------------------------------------------------------------
# 4. Trainer: gradient accumulation with num_items_in_batch; -100 labels
# ----------------------------------------------------------------------------------------------------------------


def _train(tmp_path, batch_size, accumulation, accepts_loss_kwargs=None):
    return train(tmp_path, tiny_model(*MAMBA_LINEAR, seed=0), batch_size, accumulation, accepts_loss_kwargs)


def test_trainer_gradient_accumulation_matches_full_batch(tmp_path):
    initial = param_snapshot(tiny_model(*MAMBA_LINEAR, seed=0))
    full_batch = _train(tmp_path, batch_size=4, accumulation=1)
    accumulated = _train(tmp_path, batch_size=2, accumulation=2)

    assert max_abs_diff(full_batch, initial) > 1e-3  # training moved the parameters
    assert max_abs_diff(full_batch, accumulated) <= 1e-6

    # The test discriminates: averaging micro-batch means (num_items_in_batch ignored) gives other parameters.
    mean_of_means = _train(tmp_path, batch_size=2, accumulation=2, accepts_loss_kwargs=False)
    assert max_abs_diff(full_batch, mean_of_means) > 1e-4


def test_labels_minus_100_are_ignored():
    model = tiny_model(*TRANSFORMER_MLP, seed=1)
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
# 5. Gradient checkpointing (decoder layers) and inner-loop checkpointing (scan_checkpoint_group_size)
# ----------------------------------------------------------------------------------------------------------------

_CKPT_LEN = 18  # 5 mini-batches of 4 (the last one partial)


def _loss_and_grads(model):
    ids = random_ids(2, _CKPT_LEN, seed=9)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        grads[name] = param.grad.detach().clone()
    return out.loss.detach(), grads


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("mode", ["layers", "inner_loop", "both"])
@pytest.mark.parametrize("variant", TWO_VARIANTS, ids=TWO_IDS)
def test_checkpointing_gives_the_same_gradients(monkeypatch, variant, mode):
    mini_batches = 2 * (-(-_CKPT_LEN // 4))  # 2 layers x 5 mini-batches per forward
    calls = _count_calls(monkeypatch, ttt_ops, "_dual_mini_batch")
    ref_loss, ref_grads = _loss_and_grads(tiny_model(*variant, seed=2))
    assert len(calls) == mini_batches
    assert max(g.abs().max().item() for g in ref_grads.values()) > 0

    overrides = {"scan_checkpoint_group_size": 2} if mode in ("inner_loop", "both") else {}
    model = tiny_model(*variant, seed=2, **overrides)
    ttt_calls = []
    for layer in model.model.layers:
        layer.ttt.register_forward_hook(lambda *args: ttt_calls.append(1))
    if mode in ("layers", "both"):
        model.gradient_checkpointing_enable()
        assert model.model.gradient_checkpointing
    calls.clear()
    loss, grads = _loss_and_grads(model)

    # Each kind of checkpointing really recomputes in the backward pass ...
    assert len(ttt_calls) == (4 if mode in ("layers", "both") else 2)
    # (layer recompute re-runs the scan; inner checkpointing re-runs it once more inside the backward pass)
    assert len(calls) == {"layers": 2, "inner_loop": 2, "both": 3}[mode] * mini_batches
    # ... and gives the same loss and gradients.
    assert abs(loss.item() - ref_loss.item()) <= 1e-6
    assert max_abs_diff(grads, ref_grads) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# 6. PEFT LoRA
# ----------------------------------------------------------------------------------------------------------------


def test_peft_lora_default_targets_save_reload_and_merge(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = random_ids(2, 10, seed=7)
    base_logits = uncached_logits(tiny_model(*MAMBA_LINEAR, seed=0), ids)
    peft_model = get_peft_model(tiny_model(*MAMBA_LINEAR, seed=0), LoraConfig(task_type="CAUSAL_LM", lora_alpha=32))
    assert set(peft_model.peft_config["default"].target_modules) == set(ttt_hf.PEFT_TARGET_MODULES["ttt"])
    assert lora_module_names(peft_model) == {  # the Mamba backbone shares q and k: no k_proj
        f"base_model.model.model.layers.{i}.{proj}"
        for i in range(2)
        for proj in (
            "ttt.q_proj",
            "ttt.v_proj",
            "ttt.o_proj",
            "ttt.g_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)

    sgd_steps(peft_model, ids, steps=4, lr=10.0)
    lora_b = [p for name, p in peft_model.named_parameters() if ".lora_B." in name]
    assert len(lora_b) == 14 and all(p.abs().max().item() > 0 for p in lora_b)
    peft_logits = uncached_logits(peft_model, ids)
    assert (peft_logits - base_logits).abs().max().item() > 1e-3  # the adapter matters

    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    with open(tmp_path / "adapter_config.json") as f:
        assert set(json.load(f)["target_modules"]) == set(ttt_hf.PEFT_TARGET_MODULES["ttt"])

    reloaded = PeftModel.from_pretrained(tiny_model(*MAMBA_LINEAR, seed=0), tmp_path)
    reloaded_logits = uncached_logits(reloaded, ids)
    assert torch.equal(reloaded_logits, peft_logits)

    merged = reloaded.merge_and_unload()
    assert type(merged) is TTTForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (uncached_logits(merged, ids) - peft_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", TWO_VARIANTS, ids=TWO_IDS)
def test_peft_lora_all_linear(variant):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(*variant, seed=0)
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    adapted = {name.removeprefix("base_model.model.") for name in lora_module_names(peft_model)}
    assert adapted == linear_names - {"lm_head"}
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    assert {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= leaves
    assert ("g_proj" in leaves) == (variant[1] == "mamba") and ("k_proj" in leaves) == (variant[1] != "mamba")
    assert "lm_head" not in leaves
    ids = random_ids(2, 9, seed=1)
    # LoRA B starts at zero: the adapted model computes the base model's function.
    assert (
        uncached_logits(peft_model, ids) - uncached_logits(tiny_model(*variant, seed=0), ids)
    ).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variant", TWO_VARIANTS, ids=TWO_IDS)
def test_peft_lora_on_ttt_initial_weight_W1(variant):
    from peft import LoraConfig, get_peft_model

    ids = random_ids(2, 10, seed=7)
    original_w1 = [layer.ttt.W1.detach().clone() for layer in tiny_model(*variant, seed=0).model.layers]
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=[], target_parameters=["W1"], lora_alpha=32)
    peft_model = get_peft_model(tiny_model(*variant, seed=0), config)
    lora_names = {name for name, _ in peft_model.named_parameters() if ".lora_" in name}
    assert lora_names == {
        f"base_model.model.model.layers.{i}.ttt.lora_{ab}.default.weight" for i in range(2) for ab in "AB"
    }
    assert {name for name, p in peft_model.named_parameters() if p.requires_grad} == lora_names
    before = uncached_logits(peft_model, ids)

    peft_model.train()
    peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    with_grad = {name for name, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == lora_names
    for name, p in peft_model.named_parameters():
        if ".lora_B." in name:
            assert p.grad.abs().max().item() > 0, name
    peft_model.zero_grad()

    sgd_steps(peft_model, ids, steps=3, lr=20.0)
    after = uncached_logits(peft_model, ids)
    assert (after - before).abs().max().item() > 1e-3
    # The base W1 is frozen; the adapter acts through it: merging moves W1 and keeps the function.
    merged = peft_model.merge_and_unload()
    for layer, w1 in zip(merged.model.layers, original_w1):
        assert (layer.ttt.W1 - w1).abs().max().item() > 1e-3
    assert (uncached_logits(merged, ids) - after).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# 7. accelerate and from_pretrained initialisation
# ----------------------------------------------------------------------------------------------------------------


def test_init_empty_weights_puts_everything_on_meta():
    import accelerate

    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config(*MAMBA_LINEAR))
    assert type(model) is TTTForCausalLM
    # Every parameter of the real model exists, on meta (remove_duplicate=False: lm_head is listed even though
    # init_empty_weights re-creates it as a separate meta tensor instead of keeping it tied, as for any tied model).
    params = dict(model.named_parameters(remove_duplicate=False))
    real = TTTForCausalLM(tiny_config(*MAMBA_LINEAR))
    real_names = {name for name, _ in real.named_parameters(remove_duplicate=False)}
    assert set(params) == real_names and len(real_names) == 53
    assert all(p.device.type == "meta" for p in params.values())
    assert all(b.device.type == "meta" for b in model.buffers())


@pytest.mark.parametrize("variant", TWO_VARIANTS, ids=TWO_IDS)
def test_from_pretrained_device_map_auto(tmp_path, variant):
    model = tiny_model(*variant, seed=11)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # "auto" fills the GPU first
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and all(t.device.type == device for t in tensors)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_ids(2, 9, seed=2)
    with torch.no_grad():
        logits = loaded(ids.to(device), use_cache=False).logits.cpu()
    assert (logits - uncached_logits(model, ids)).abs().max().item() <= (0 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("variant", TWO_VARIANTS, ids=TWO_IDS)
def test_from_pretrained_initialises_every_tensor(tmp_path, variant):
    model = tiny_model(*variant, seed=12)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert tensor.device.type != "meta", name
        assert torch.isfinite(tensor).all(), name
    ids = random_ids(2, 9, seed=3)
    assert torch.equal(uncached_logits(loaded, ids), uncached_logits(model, ids))


@pytest.mark.parametrize("variant", TWO_VARIANTS, ids=TWO_IDS)
def test_missing_checkpoint_keys_get_init_weights_values(tmp_path, variant):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tiny_model(*variant, seed=13)
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    dropped = {name for name in state if name.endswith((".ttt.ttt_norm_bias", ".ttt.ttt_norm_weight"))}
    dropped |= {"model.layers.1.ttt.W1", "model.layers.0.ttt.learnable_token_idx"}
    assert len(dropped) == 6 and dropped <= set(state)
    save_file({k: v for k, v in state.items() if k not in dropped}, path, metadata=metadata)

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == dropped
    params = dict(loaded.named_parameters())
    reference = dict(model.named_parameters())
    for name in dropped:
        assert params[name].device.type == "cpu" and torch.isfinite(params[name]).all(), name
        # tiny_model perturbed these: the saved values are not the initial ones.
        assert not torch.equal(params[name], reference[name]), name
    for i in range(2):
        assert torch.equal(params[f"model.layers.{i}.ttt.ttt_norm_bias"], torch.zeros(4, 8))
        assert torch.equal(params[f"model.layers.{i}.ttt.ttt_norm_weight"], torch.ones(4, 8))
    assert torch.equal(params["model.layers.0.ttt.learnable_token_idx"], torch.zeros(4))
    w1 = params["model.layers.1.ttt.W1"]
    assert 0.01 < w1.std().item() < 0.03 and w1.mean().abs().item() < 0.01  # normal(0, initializer_range=0.02)
    # Keys present in the checkpoint are loaded as saved (not re-initialised by _init_weights).
    for name, param in params.items():
        if name not in dropped:
            assert torch.equal(param, reference[name]), name
