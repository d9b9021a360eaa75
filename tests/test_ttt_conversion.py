"""Parity with the official ttt-lm-pytorch implementation, through the checkpoint converter."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import ttt_hf  # noqa: F401  (registers the Auto classes)
from ttt_hf.conversion import convert_ttt_pytorch

FIXTURES = Path(__file__).parent / "fixtures" / "ttt"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "data.safetensors").is_file())
REPO = Path(__file__).resolve().parents[1]


def test_all_fixture_cases_present():
    assert CASES == ["linear_mamba", "linear_transformer", "mlp_mamba", "mlp_transformer"]


@pytest.fixture(scope="module", params=CASES)
def converted(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp(request.param) / "hf"
    convert_ttt_pytorch(FIXTURES / request.param, dst)
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    return request.param, model, load_file(FIXTURES / request.param / "data.safetensors")


def test_full_forward_matches_official(converted):
    _, model, data = converted
    with torch.no_grad():
        logits = model(data["input_ids"], use_cache=False).logits
    assert (logits - data["logits"]).abs().max().item() <= 2e-6


def test_prefill_then_decode_matches_official(converted):
    _, model, data = converted
    ids, prefill = data["input_ids"], int(data["prefill_len"])
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = out.cache, []
        for j in range(prefill, ids.shape[1]):
            out = model(ids[:, j : j + 1], cache=cache)
            steps.append(out.logits[:, 0])
    assert (torch.stack(steps, 1) - data["decode_logits"]).abs().max().item() <= 2e-6


def test_triton_backend_matches_official(converted, monkeypatch, no_tf32):
    # The chunk kernels (prefill) and the step kernels (decode) on the converted model: on CPU under the Triton
    # interpreter (set by conftest), on CUDA as compiled kernels.
    pytest.importorskip("triton")
    from ttt_hf.ttt import ttt_ops

    _, model, data = converted
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = copy.deepcopy(model).to(device)  # the module's other tests keep the CPU model
    calls = []
    for name in ("ttt_linear_chunk_triton", "ttt_mlp_chunk_triton", "ttt_step_triton"):
        kernel = getattr(ttt_ops, name)
        monkeypatch.setattr(ttt_ops, name, lambda *a, kernel=kernel, **kw: calls.append(1) or kernel(*a, **kw))
    monkeypatch.setattr(model.config, "kernel_backend", "triton")
    ids, prefill, num_steps = data["input_ids"].to(device), int(data["prefill_len"]), 4  # the interpreter is slow
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.cpu()
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = out.cache, []
        for j in range(prefill, prefill + num_steps):
            steps.append(model(ids[:, j : j + 1], cache=cache).logits[:, 0].cpu())
    assert (logits - data["logits"]).abs().max().item() <= 2e-5
    assert (torch.stack(steps, 1) - data["decode_logits"][:, :num_steps]).abs().max().item() <= 2e-5
    assert len(calls) == model.config.num_hidden_layers * (2 + num_steps)


def test_converted_folder_is_complete(converted, tmp_path):
    case, model, _ = converted
    config = json.loads((Path(model.config._name_or_path) / "config.json").read_text())
    assert config["model_type"] == "ttt" and config["architectures"] == ["TTTForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_script_entry_point(tmp_path):
    dst = tmp_path / "out"
    script = REPO / "conversion_scripts" / "convert_ttt_pytorch.py"
    command = [sys.executable, str(script), str(FIXTURES / "linear_transformer"), str(dst)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (dst / "model.safetensors").is_file() and (dst / "modeling_ttt.py").is_file()
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr


def _broken_copy(tmp_path, edit):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "mlp_mamba", src)
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, src / "model.safetensors")
    return src


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.pop("model.layers.1.seq_modeling_block.W2"), "model.layers.1.ttt.W2"),
        (
            lambda w: w.update({"model.layers.0.seq_modeling_block.extra": torch.zeros(2)}),
            "model.layers.0.seq_modeling_block.extra",
        ),
        (lambda w: w.update({"model.norm.weight": torch.ones(3)}), "model.norm.weight: (3,)"),
        (
            lambda w: w["model.norm.weight"].__setitem__(1, float("inf")),
            "non-finite values (NaN or inf) in model.norm.weight",
        ),
    ],
    ids=["missing", "unknown", "shape", "non-finite"],
)
def test_refuses_bad_checkpoints_and_writes_nothing(tmp_path, edit, message):
    src = _broken_copy(tmp_path, edit)
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match="cannot convert") as error:
        convert_ttt_pytorch(src, dst)
    assert message in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_key_in_two_shards_is_refused(tmp_path):
    src = _broken_copy(tmp_path, lambda w: None)
    weights = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"a.safetensors": names[: len(names) // 2 + 1], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, src / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{names[len(names) // 2]} appears in two shards"):
        convert_ttt_pytorch(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    convert_ttt_pytorch(FIXTURES / "linear_transformer", dst)
    before = sorted(p.name for p in dst.iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ttt_hf.TTTForCausalLM, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_ttt_pytorch(FIXTURES / "linear_mamba", dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
