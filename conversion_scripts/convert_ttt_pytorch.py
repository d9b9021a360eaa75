"""Convert a ttt-lm-pytorch checkpoint folder (config.json + model.safetensors) into a ttt_hf folder.

    python conversion_scripts/convert_ttt_pytorch.py SRC DST [--dtype bfloat16] [--overwrite]

The result loads with `AutoModelForCausalLM.from_pretrained(DST)` after `import ttt_hf`, or with
`trust_remote_code=True` without ttt_hf installed.
"""

import argparse

import torch

from ttt_hf.conversion import convert_ttt_pytorch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="ttt-lm-pytorch checkpoint folder")
    parser.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = convert_ttt_pytorch(args.src, args.dst, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
