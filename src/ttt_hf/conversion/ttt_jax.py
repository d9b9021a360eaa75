"""Official ttt-lm-jax checkpoint (StreamingCheckpointer format) -> ttt_hf checkpoint folder.

The file is a msgpack stream of `(key path, flax-serialized array)` records: the parameters (under
`params/params/` in a train state, at the top level in a params-only file), then the optimizer state,
which is skipped without being decoded. Floats are stored as bf16. Nothing is unpickled (`metadata.pkl`
is never read) and JAX is not needed: msgpack and numpy decode the records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
from tqdm.auto import tqdm

from ..ttt.configuration_ttt import TTTConfig
from .common import load_tokenizer, save_converted

_FLAX_NDARRAY_EXT = 1  # flax.serialization's msgpack extension code for numpy arrays
_TRAIN_STATE_PREFIX = ("params", "params")

Key = tuple[str, ...]


_DTYPES = ("bfloat16", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def _decode_array(serialized: bytes, name: str) -> np.ndarray:
    """A flax `to_bytes(ndarray)` record (of parameter `name`) as a numpy array; bf16 becomes fp32 (exactly)."""

    def ext_hook(code: int, data: bytes):
        if code != _FLAX_NDARRAY_EXT:
            raise ValueError(f"{name}: unsupported msgpack extension type {code} (expected flax ndarrays)")
        shape, dtype, buffer = msgpack.unpackb(data, raw=False)
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: unexpected dtype {dtype!r} (expected one of {', '.join(_DTYPES)})")
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize
        if len(buffer) != expected:
            raise ValueError(
                f"{name}: {len(buffer)} bytes of data for shape {tuple(shape)} {dtype} ({expected} bytes expected)"
            )
        if dtype == "bfloat16":
            bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32)
            bits <<= 16  # in place: one fp32-sized allocation per record
            return bits.view(np.float32).reshape(shape)
        return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)

    array = msgpack.unpackb(serialized, raw=False, ext_hook=ext_hook)
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: the record holds {type(array).__name__}, not an array")
    return array


class _HashingReader:
    """A binary file whose bytes also feed `digest` as they are read (one pass for the records and the hash)."""

    def __init__(self, file, digest) -> None:
        self.file, self.digest = file, digest

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        return data


def read_parameters(path: str | Path, progress: bool = True, digest=None) -> Iterator[tuple[Key, np.ndarray]]:
    """Streams the model parameters of a ttt-lm-jax checkpoint as (key path without prefix, fp32/int array).

    Works on a full train state (`streaming_train_state`: parameters under params/params/, optimizer state
    skipped) and on a params-only file (`streaming_params`). One record is in memory at a time. A hashlib
    `digest` receives every byte of the file.
    """
    path = Path(path)
    with (
        path.open("rb") as file,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}", disable=not progress
        ) as bar,
    ):
        source = file if digest is None else _HashingReader(file, digest)
        unpacker = msgpack.Unpacker(source, raw=False, max_buffer_size=0)
        position, size, seen, number = 0, path.stat().st_size, set(), 0
        for number, record in enumerate(unpacker, start=1):
            bar.update(unpacker.tell() - position)
            position = unpacker.tell()
            if not (isinstance(record, list | tuple) and len(record) == 2 and isinstance(record[0], list | tuple)):
                raise ValueError(
                    f"{path} is not a ttt-lm-jax streaming checkpoint (record {number} is not (key, array))"
                )
            key, serialized = tuple(record[0]), record[1]
            if key[:2] == _TRAIN_STATE_PREFIX:
                key = key[2:]
            elif not (key and key[0] == "model"):  # params-only checkpoints have model/... at the top
                continue  # anything else (step, opt_state/...) is training state: skipped undecoded
            name = "/".join(map(str, key))
            if key in seen:
                raise ValueError(f"{path}: parameter {name} appears twice (again in record {number})")
            seen.add(key)
            yield key, _decode_array(serialized, name)
        if position != size:
            raise ValueError(
                f"{path} ends inside record {number + 1} (bytes {position} to {size} do not hold a whole record): "
                "a truncated download?"
            )


# JAX key suffix inside a block -> (our suffix, layout change). Dense kernels are [in, out] -> [out, in];
# depthwise conv kernels [width, 1, C] -> [C, 1, width]; the inner TTT weights keep their layout.
_BLOCK_KEYS: dict[Key, tuple[str, str]] = {
    ("conv", "conv1", "kernel"): ("pre_conv.conv.weight", "conv"),
    ("conv", "conv1", "bias"): ("pre_conv.conv.bias", "same"),
    ("conv", "conv_norm", "kernel"): ("pre_conv.norm.weight", "same"),
    ("seq_norm", "kernel"): ("seq_norm.weight", "same"),
    ("ffn_norm", "kernel"): ("ffn_norm.weight", "same"),
    ("feed_forward", "w1", "kernel"): ("mlp.gate_proj.weight", "dense"),
    ("feed_forward", "w2", "kernel"): ("mlp.down_proj.weight", "dense"),
    ("feed_forward", "w3", "kernel"): ("mlp.up_proj.weight", "dense"),
    ("seq_modeling_block", "wq", "kernel"): ("ttt.q_proj.weight", "dense"),
    ("seq_modeling_block", "wk", "kernel"): ("ttt.k_proj.weight", "dense"),
    ("seq_modeling_block", "wv", "kernel"): ("ttt.v_proj.weight", "dense"),
    ("seq_modeling_block", "wo", "kernel"): ("ttt.o_proj.weight", "dense"),
    ("seq_modeling_block", "wg", "kernel"): ("ttt.g_proj.weight", "dense"),
    ("seq_modeling_block", "conv_q", "kernel"): ("ttt.conv_q.weight", "conv"),
    ("seq_modeling_block", "conv_q", "bias"): ("ttt.conv_q.bias", "same"),
    ("seq_modeling_block", "conv_k", "kernel"): ("ttt.conv_k.weight", "conv"),
    ("seq_modeling_block", "conv_k", "bias"): ("ttt.conv_k.bias", "same"),
    ("seq_modeling_block", "learnable_token_idx"): ("ttt.learnable_token_idx", "same"),
    ("seq_modeling_block", "learnable_ttt_lr/kernel"): (
        "ttt.learnable_ttt_lr_weight",
        "lr",
    ),  # [nh, d, 1] -> [nh, 1, d]
    ("seq_modeling_block", "learnable_ttt_lr/bias"): ("ttt.learnable_ttt_lr_bias", "same"),
    ("seq_modeling_block", "post_norm", "scale"): ("ttt.post_norm.weight", "same"),
    ("seq_modeling_block", "post_norm", "bias"): ("ttt.post_norm.bias", "same"),
    ("seq_modeling_block", "ttt_norm/scale"): ("ttt.ttt_norm_weight", "same"),
    ("seq_modeling_block", "ttt_norm/bias"): ("ttt.ttt_norm_bias", "same"),
    ("seq_modeling_block", "ttt_dense_0"): ("ttt.W1", "same"),
    ("seq_modeling_block", "ttt_bias_0"): ("ttt.b1", "same"),
    ("seq_modeling_block", "ttt_dense_1"): ("ttt.W2", "same"),
    ("seq_modeling_block", "ttt_bias_1"): ("ttt.b2", "same"),
}
_MODEL_KEYS: dict[Key, tuple[str, str]] = {
    ("model", "wte", "embedding"): ("model.embed_tokens.weight", "same"),
    ("model", "ln_f", "kernel"): ("model.norm.weight", "same"),
}
_LAYOUTS = {
    "same": lambda a: a,
    "dense": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 1, 0),
    "lr": lambda a: a.transpose(0, 2, 1),
}


def jax_to_ttt_hf_key(key: Key) -> tuple[str, str] | None:
    """(our key, layout change) for a JAX parameter key, or None if the key is unknown."""
    if key in _MODEL_KEYS:
        return _MODEL_KEYS[key]
    if len(key) > 3 and key[:2] == ("model", "h") and key[2].isdigit() and key[3:] in _BLOCK_KEYS:
        name, layout = _BLOCK_KEYS[key[3:]]
        return f"model.layers.{int(key[2])}.{name}", layout
    return None


def infer_config(shapes: dict[Key, tuple[int, ...]], **overrides: Any) -> TTTConfig:
    """The TTTConfig of a checkpoint from its keys and shapes; `overrides` set the fields the weights do not
    determine (`ttt_base_lr`, `max_position_embeddings`, `rope_theta`, ...) or correct inferred ones."""

    def shape(*key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"cannot infer the architecture: the checkpoint has no {'/'.join(key)} parameter")
        return shapes[key]

    vocab_size, hidden_size = shape("model", "wte", "embedding")
    layers = sorted({int(k[2]) for k in shapes if k[:2] == ("model", "h") and len(k) > 2 and k[2].isdigit()})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"cannot infer the architecture: block indices {layers} are not 0..n-1")
    block = ("model", "h", "0")
    heads, _ = shape(*block, "seq_modeling_block", "ttt_norm/scale")
    mlp = (*block, "seq_modeling_block", "ttt_dense_1") in shapes
    pre_conv = (*block, "conv", "conv1", "kernel") in shapes
    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads,
        "intermediate_size": shape(*block, "feed_forward", "w1", "kernel")[1],
        "mini_batch_size": shape(*block, "seq_modeling_block", "learnable_token_idx")[0],
        "ttt_layer_type": "mlp" if mlp else "linear",
        "ttt_base_lr": 0.1 if mlp else 1.0,  # the official values (ttt-lm-jax CONFIGS)
        "pre_conv": pre_conv,
        "conv_kernel": shape(*block, "conv", "conv1", "kernel")[0] if pre_conv else 4,
        "share_qk": (*block, "seq_modeling_block", "wk", "kernel") not in shapes,
        "use_gate": (*block, "seq_modeling_block", "wg", "kernel") in shapes,
        "tie_word_embeddings": True,
        "use_cache": True,
        "architectures": ["TTTForCausalLM"],
    }
    for name in overrides:
        if not hasattr(TTTConfig(), name):
            raise ValueError(f"unknown TTTConfig field in the overrides: {name!r}")
    values.update(overrides)
    return TTTConfig(**values)


def _model_card(config: TTTConfig, source: Path, sha256: str) -> str:
    from .. import __version__

    kind = f"ttt-{config.ttt_layer_type}"
    backbone = "Mamba backbone (pre_conv, share_qk, use_gate)" if config.pre_conv else "Transformer backbone"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- ttt
- test-time-training
- {kind}
- custom_code
- ttt-hf
---

# {kind} ({config.num_hidden_layers} layers, hidden {config.hidden_size})

A Test-Time Training language model (arXiv 2407.04620, {backbone}) converted from an official
ttt-lm-jax checkpoint by ttt-hf. Load it with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (or `import ttt_hf` first).

## Provenance
- source checkpoint: `{source.name}` (sha256 `{sha256}`)
- converter: ttt-hf {__version__} (`ttt-hf convert` / `conversion_scripts/convert_ttt_jax.py`)
- the checkpoint stores bf16 values; they are converted exactly, optimizer state is dropped
"""


def convert_ttt_jax(
    checkpoint: str | Path,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Converts an official ttt-lm-jax streaming checkpoint into a ttt_hf folder (weights, config,
    generation config, model code for trust_remote_code, model card). Refuses unknown, missing or
    mis-shaped keys, naming them; the output folder appears only when complete. `tokenizer` (a folder or a
    cached Hub id; the releases use Llama-2's) is saved into the folder too."""
    checkpoint, dst = Path(checkpoint), Path(dst)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a file (pass the checkpoint file, e.g. streaming_train_state)")
    tokenizer_to_save = load_tokenizer(tokenizer)
    digest = hashlib.sha256()

    weights: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    shapes: dict[Key, tuple[int, ...]] = {}
    unknown: list[str] = []
    for key, array in read_parameters(checkpoint, progress=progress, digest=digest):
        shapes[key] = array.shape
        mapped = jax_to_ttt_hf_key(key)
        if mapped is None:
            unknown.append("/".join(key))
            continue
        name, layout = mapped
        tensor = torch.from_numpy(np.ascontiguousarray(_LAYOUTS[layout](array)))
        weights[name] = tensor if dtype is None else tensor.to(dtype)  # cast now: no second full copy later
        sources[name] = "/".join(key)
    if unknown:
        raise ValueError(
            f"cannot convert this checkpoint: unknown keys in the checkpoint: {', '.join(sorted(unknown))}"
        )

    config = infer_config(shapes, **overrides)
    provenance = {"source": checkpoint.name, "sha256": digest.hexdigest(), "format": "ttt-lm-jax streaming"}
    return save_converted(
        config,
        weights,
        sources,
        dst,
        overwrite=overwrite,
        tokenizer=tokenizer_to_save,
        extra_files={
            "README.md": _model_card(config, checkpoint, digest.hexdigest()),
            "conversion.json": json.dumps(provenance, indent=2),
        },
    )
