import os; os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E401, E702  (before transformers is imported)

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ttt_hf import TTTConfig, TTTForCausalLM  # noqa: E402
from ttt_hf.cli import DEFAULT_CONFIGS, kv_cache_nbytes, main, ttt_state_nbytes  # noqa: E402

# size: (hidden, layers, heads, head_dim, intermediate, vocab, max_position_embeddings)
SIZES = {
    "125m": (768, 12, 12, 64, 2048, 32000, 2048),
    "350m": (1024, 24, 16, 64, 2736, 32000, 2048),
    "760m": (1536, 24, 16, 96, 4096, 32000, 8192),
    "1.3b": (2048, 24, 32, 64, 5504, 32000, 8192),
    "tiny": (64, 2, 4, 16, 128, 256, 2048),
}
EXPECTED_FILES = sorted(
    f"ttt-{size}-{layer_type}-{backbone}.json"
    for size in SIZES
    for layer_type in ("linear", "mlp")
    for backbone in ("mamba", "transformer")
)
TINY = [name[:-5] for name in EXPECTED_FILES if name.startswith("ttt-tiny-")]


def test_config_folder_holds_exactly_the_expected_files():
    assert sorted(path.name for path in DEFAULT_CONFIGS.glob("*.json")) == EXPECTED_FILES


@pytest.mark.parametrize("filename", EXPECTED_FILES)
def test_config_loads_with_expected_sizes(filename, tmp_path):
    path = DEFAULT_CONFIGS / filename
    assert path.read_text().endswith("}\n")
    raw = json.loads(path.read_text())
    assert raw["model_type"] == "ttt" and raw["architectures"] == ["TTTForCausalLM"]
    assert list(raw) == sorted(raw)

    shutil.copy(path, tmp_path / "config.json")
    for config in (TTTConfig.from_json_file(str(path)), TTTConfig.from_pretrained(tmp_path)):
        _, size, layer_type, backbone = filename[:-5].split("-")
        hidden, layers, heads, head_dim, intermediate, vocab, max_positions = SIZES[size]
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
        assert (config.head_dim, config.intermediate_size, config.vocab_size) == (head_dim, intermediate, vocab)
        assert config.max_position_embeddings == max_positions
        assert config.ttt_layer_type == layer_type
        assert config.ttt_base_lr == (1.0 if layer_type == "linear" else 0.1)
        mamba = backbone == "mamba"
        assert (config.pre_conv, config.share_qk, config.use_gate) == (mamba, mamba, mamba)
        assert (config.mini_batch_size, config.conv_kernel) == (16, 4)
        assert (config.rope_theta, config.rms_norm_eps) == (10000.0, 1e-6)
        assert (config.bos_token_id, config.eos_token_id, config.tie_word_embeddings) == (1, 2, True)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_size_formula_matches_a_measured_cache(name, dtype):
    config = TTTConfig.from_json_file(str(DEFAULT_CONFIGS / f"{name}.json"))
    torch.manual_seed(0)
    model = TTTForCausalLM(config).to(dtype).eval()
    ids = torch.randint(3, config.vocab_size, (3, 21))  # a partial last mini-batch
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        assert cache.nbytes == 3 * ttt_state_nbytes(config, dtype.itemsize)
        model(ids[:, :1], past_key_values=cache)  # a decode step leaves the size unchanged
    assert cache.nbytes == 3 * ttt_state_nbytes(config, dtype.itemsize)


def test_kv_cache_formula():
    config = TTTConfig.from_json_file(str(DEFAULT_CONFIGS / "ttt-125m-linear-mamba.json"))
    assert kv_cache_nbytes(config, 2048) == 72 * 2**20  # 2 * 12 layers * 2048 tokens * 768 * 2 bytes


def test_demo_passes(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    for size in ("125m", "350m", "760m", "1.3b"):
        assert f"{size} TTT-Linear" in out and f"{size} TTT-MLP" in out


def test_demo_without_configs_fails_clearly(tmp_path, capsys):
    assert main(["demo", "--configs", str(tmp_path / "missing")]) == 2
    assert "configs folder not found" in capsys.readouterr().err


def test_a_subcommand_is_required():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_demo_fails_when_cached_decoding_drifts(monkeypatch, capsys):
    from ttt_hf import cli

    def drifting_check(model):
        with torch.no_grad():
            return 1.0, model(torch.tensor([[5]]), use_cache=True).past_key_values

    monkeypatch.setattr(cli, "check_cached_decoding", drifting_check)
    assert main(["demo"]) == 1
    assert "FAIL" in capsys.readouterr().out
