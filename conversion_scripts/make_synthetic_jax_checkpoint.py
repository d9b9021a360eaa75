"""Write a random checkpoint in the ttt-lm-jax StreamingCheckpointer format (bf16 records, parameters under
params/params/ followed by an AdamW-like optimizer state of twice their size), for a ttt_hf config: to
time `convert_ttt_jax.py` and measure its memory at real sizes without downloading a release.

    python conversion_scripts/make_synthetic_jax_checkpoint.py configs/ttt-125m-linear-mamba.json OUT_FILE
"""

import argparse

import msgpack
import numpy as np
import torch

from ttt_hf import TTTConfig, TTTForCausalLM
from ttt_hf.conversion.ttt_jax import _BLOCK_KEYS, _MODEL_KEYS

# Inverse of the converter's layout changes (ours -> JAX).
_TO_JAX = {
    "same": lambda a: a,
    "dense": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 1, 0),
    "lr": lambda a: a.transpose(0, 2, 1),
}


def _record(key: list[str], array: np.ndarray) -> bytes:
    bits = (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    payload = msgpack.packb([list(array.shape), "bfloat16", bits.tobytes()], use_bin_type=True)
    return msgpack.packb([key, msgpack.packb(msgpack.ExtType(1, payload), use_bin_type=True)], use_bin_type=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("out")
    args = parser.parse_args()
    config = TTTConfig.from_json_file(args.config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TTTForCausalLM(config).state_dict().items()}
    ours_to_jax = {name: (list(key), layout) for key, (name, layout) in _MODEL_KEYS.items()}
    for i in range(config.num_hidden_layers):
        for key, (name, layout) in _BLOCK_KEYS.items():
            ours_to_jax[f"model.layers.{i}.{name}"] = (["model", "h", str(i), *key], layout)
    rng = np.random.default_rng(0)
    with open(args.out, "wb") as out:
        for prefix in (["params", "params"], ["opt_state", "1", "0", "mu"], ["opt_state", "1", "0", "nu"]):
            for name, shape in shapes.items():
                if name == "lm_head.weight":
                    continue
                key, layout = ours_to_jax[name]
                array = _TO_JAX[layout](rng.standard_normal(shape, dtype=np.float32) * 0.02)
                out.write(_record(prefix + key, array))


if __name__ == "__main__":
    main()
