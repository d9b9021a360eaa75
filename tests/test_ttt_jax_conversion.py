"""The ttt-lm-jax checkpoint converter against the official JAX model's logits (tests/fixtures/ttt_jax)."""

import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import torch
from integration_testing import env_without_ttt_hf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ttt_hf
from ttt_hf.cli import main
from ttt_hf.conversion import convert_ttt_jax
from ttt_hf.conversion.ttt_jax import read_parameters

FIXTURES = Path(__file__).parent / "fixtures" / "ttt_jax"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
FILES = ["streaming_train_state", "streaming_params"]
ROOT = Path(__file__).resolve().parent.parent


def test_all_fixture_cases_present():
    assert CASES == ["ttt_linear", "ttt_linear_base", "ttt_mlp", "ttt_mlp_base"]


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("case", CASES)
def test_converted_checkpoint_matches_the_official_logits(case, file, tmp_path):
    dst = convert_ttt_jax(FIXTURES / case / file, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    meta = json.loads((FIXTURES / case / "meta.json").read_text())["model_config"]
    config = model.config
    assert (config.ttt_layer_type, config.pre_conv, config.share_qk, config.use_gate) == (
        "mlp" if "mlp" in case else "linear",
        meta["pre_conv"],
        meta["pre_conv"],
        meta["pre_conv"],
    )
    assert config.ttt_base_lr == meta["ttt_base_lr"] and config.mini_batch_size == meta["mini_batch_size"]
    data = load_file(FIXTURES / case / "data.safetensors")
    with torch.no_grad():
        logits = model(data["input_ids"]).logits
    assert (logits - data["logits"]).abs().max().item() <= 1e-5


def test_optimizer_state_is_skipped_and_both_files_hold_the_same_parameters():
    full = dict(read_parameters(FIXTURES / "ttt_mlp" / "streaming_train_state", progress=False))
    params = dict(read_parameters(FIXTURES / "ttt_mlp" / "streaming_params", progress=False))
    assert full.keys() == params.keys() and all(k[0] == "model" for k in full)
    assert all((full[k] == params[k]).all() for k in full)
    assert ("model", "h", "0", "seq_modeling_block", "learnable_ttt_lr/kernel") in full  # "/" kept inside one element


def test_reading_streams_and_skips_the_optimizer_state_undecoded(tmp_path):
    """A train state whose optimizer records (16 MB) are not flax arrays at all: decoding one would raise, and
    keeping them would show in the peak. What stays in memory is one record plus the reader's buffer."""
    path = tmp_path / "train_state_with_big_optimizer_state"
    junk = msgpack.packb(msgpack.ExtType(99, bytes(1 << 19)), use_bin_type=True)
    params = 0
    with open(FIXTURES / "ttt_linear" / "streaming_params", "rb") as src, open(path, "wb") as out:
        for key, value in msgpack.Unpacker(src, raw=False, max_buffer_size=0):
            out.write(msgpack.packb([["params", "params", *key], value], use_bin_type=True))
            params += 1
        out.writelines(
            msgpack.packb([["opt_state", "1", "0", "mu", str(i)], junk], use_bin_type=True) for i in range(32)
        )
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_parameters(path, progress=False))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == params
    assert path.stat().st_size > 16e6 and peak < 6e6, peak


def test_output_folder_is_complete_with_a_model_card(tmp_path):
    dst = convert_ttt_jax(FIXTURES / "ttt_linear" / "streaming_params", tmp_path / "out", progress=False)
    names = {p.name for p in dst.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "README.md",
        "modeling_ttt.py",
        "configuration_ttt.py",
        "ttt_ops.py",
        "cache_ttt.py",
    } <= names
    card = (dst / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "pipeline_tag: text-generation" in header
    assert "- ttt-linear" in header and "streaming_params" in card and "ttt-hf " + ttt_hf.__version__ in card
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_overrides_and_dtype(tmp_path):
    dst = convert_ttt_jax(
        FIXTURES / "ttt_linear" / "streaming_params",
        tmp_path / "out",
        progress=False,
        dtype=torch.bfloat16,
        max_position_embeddings=8192,
        ttt_base_lr=0.5,
    )
    model = AutoModelForCausalLM.from_pretrained(dst, dtype="auto")
    assert model.config.max_position_embeddings == 8192 and model.config.ttt_base_lr == 0.5
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown TTTConfig field in the overrides: 'hiden_size'"):
        convert_ttt_jax(FIXTURES / "ttt_linear" / "streaming_params", tmp_path / "other", progress=False, hiden_size=3)
    assert not (tmp_path / "other").exists()


def test_tokenizer_is_saved_into_the_folder_and_a_bad_one_writes_nothing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(["to", "be", "or", "not"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "tokenizer")
    checkpoint = FIXTURES / "ttt_linear" / "streaming_params"
    assert (
        main(["convert", str(checkpoint), str(tmp_path / "out"), "--quiet", "--tokenizer", str(tmp_path / "tokenizer")])
        == 0
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("to be or not").input_ids == [3, 4, 5, 6]
    assert (
        main(
            [
                "convert",
                str(checkpoint),
                str(tmp_path / "bad"),
                "--quiet",
                "--tokenizer",
                str(tmp_path / "no-such-tokenizer"),
            ]
        )
        == 2
    )
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer", "out"}  # no "bad", no temporary folder

    # A process without ttt_hf loads the tokenizer and a pipeline with trust_remote_code=True: no question on
    # stdin, no warning about building an empty config.
    script = (
        "import sys; sys.modules['ttt_hf'] = None\n"
        "from transformers import AutoTokenizer, pipeline\n"
        "print(AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)('to be or not').input_ids)\n"
        "generator = pipeline('text-generation', model=sys.argv[1], trust_remote_code=True)\n"
        "print(len(generator('to be', max_new_tokens=2, do_sample=False)[0]['generated_text']) > 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        env=env_without_ttt_hf(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[3,", "4,", "5,", "6]", "True"]
    assert "custom code" not in proc.stderr and "to instantiate a model of type" not in proc.stderr, proc.stderr


def _doctored(tmp_path, edit):
    """A copy of a params-only checkpoint with its records passed through `edit(key, value) -> records`."""
    path = tmp_path / "doctored"
    with open(FIXTURES / "ttt_linear" / "streaming_params", "rb") as src, open(path, "wb") as out:
        for key, value in msgpack.Unpacker(src, raw=False, max_buffer_size=0):
            out.writelines(msgpack.packb(record, use_bin_type=True) for record in edit(tuple(key), value))
    return path


def _with_array(value: bytes, edit) -> bytes:
    """A serialized flax array `value` with its (shape, dtype, buffer) passed through `edit`."""
    array = msgpack.unpackb(value, raw=False)
    shape, dtype, buffer = msgpack.unpackb(array.data, raw=False)
    data = msgpack.packb(list(edit(shape, dtype, buffer)), use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(array.code, data), use_bin_type=True)


def _on_final_norm(edit):
    return lambda k, v: [(list(k), _with_array(v, edit) if k[-2:] == ("ln_f", "kernel") else v)]


_BF16_NAN = bytes([0xC0, 0x7F])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda k, v: [(list(k), v)] * (2 if k[-1] == "embedding" else 1),
            "parameter model/wte/embedding appears twice",
        ),
        (
            _on_final_norm(lambda s, d, b: (s, d, _BF16_NAN + b[2:])),
            r"non-finite values \(NaN or inf\) in model/ln_f/kernel",
        ),
        (
            _on_final_norm(lambda s, d, b: (s, d, b[:-6])),
            r"model/ln_f/kernel: \d+ bytes of data for shape \(\d+,\) bfloat16",
        ),
        (_on_final_norm(lambda s, d, b: (s, "complex64", b)), "model/ln_f/kernel: unexpected dtype 'complex64'"),
        (
            lambda k, v: [(list(k), v)] + ([(["model", "h", "0", "extra"], v)] if k[-1] == "embedding" else []),
            "unknown keys in the checkpoint: model/h/0/extra",
        ),
        (
            lambda k, v: [] if k[-1] == "ttt_dense_0" and k[2] == "1" else [(list(k), v)],
            "missing keys \\(ttt_hf names\\): model.layers.1.ttt.W1",
        ),
        (lambda k, v: [] if k[-2:] == ("ln_f", "kernel") else [(list(k), v)], "missing keys .*model.norm.weight"),
    ],
)
def test_refuses_checkpoints_it_does_not_understand_and_writes_nothing(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        convert_ttt_jax(_doctored(tmp_path, edit), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"doctored"}


def test_a_truncated_file_is_named_as_such_and_writes_nothing(tmp_path):
    whole = (FIXTURES / "ttt_linear" / "streaming_params").read_bytes()
    records = sum(1 for _ in msgpack.Unpacker(io.BytesIO(whole), raw=False, max_buffer_size=0))
    cut = tmp_path / "cut"
    cut.write_bytes(whole[:-100])
    with pytest.raises(ValueError, match=f"ends inside record {records} .*truncated download"):
        convert_ttt_jax(cut, tmp_path / "out", progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"cut"}


def test_convert_command_and_script(tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                str(FIXTURES / "ttt_mlp" / "streaming_params"),
                str(tmp_path / "a"),
                "--quiet",
                "--set",
                "max_position_embeddings=4096",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "a" / "config.json").read_text())["max_position_embeddings"] == 4096
    assert main(["convert", str(FIXTURES / "ttt_mlp" / "streaming_params"), str(tmp_path / "a"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "conversion_scripts" / "convert_ttt_jax.py"),
            str(FIXTURES / "ttt_linear_base" / "streaming_train_state"),
            str(tmp_path / "b"),
            "--quiet",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b" / "model.safetensors").is_file()
