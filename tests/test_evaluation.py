"""Streaming perplexity under cache policies, and the `ttt-hf perplexity` command on a local model."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from ttt_hf.cli import main  # noqa: E402
from ttt_hf.evaluation import make_cache, streaming_perplexity  # noqa: E402

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings and arrows".split()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def test_full_cache_streaming_equals_one_forward_and_tova_degrades_gracefully():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = math.exp(model(ids, labels=ids).loss.item())
    assert streaming_perplexity(model, ids, make_cache("full", None, model)) == pytest.approx(reference, rel=1e-5)
    assert streaming_perplexity(model, ids, make_cache("tova", 64, model)) == pytest.approx(reference, rel=1e-5)
    assert streaming_perplexity(model, ids, make_cache("full", None, model), chunk_size=5) == pytest.approx(reference, rel=1e-5)
    small = streaming_perplexity(model, ids, make_cache("tova", 6, model))
    assert math.isfinite(small) and small != pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="needs a budget"):
        make_cache("window", None, model)


def test_perplexity_command_on_a_local_model(tmp_path, capsys):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 4))
    assert main(["perplexity", "--model", str(tmp_path / "model"), "--text", str(text), "--policy", "window",
                 "--budget", "8", "--sinks", "4", "--device", "cpu"]) == 0
    assert "policy=window budget=8 sinks=4" in capsys.readouterr().out
    assert main(["perplexity", "--model", str(tmp_path / "model"), "--text", str(text), "--policy", "tova"]) == 2
