"""`ttt-hf convert`: official TTT checkpoints (ttt-lm-jax streaming files, ttt-lm-pytorch folders) -> ttt_hf folders."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FORMATS = ("auto", "jax", "pytorch")


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="a ttt-lm-jax checkpoint file or a ttt-lm-pytorch checkpoint folder")
    parser.add_argument("dst", type=Path, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="auto: a file is JAX, a folder is PyTorch")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="store the weights in this dtype")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="JAX only: override a config field the weights do not determine (repeatable)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="save this tokenizer (a local folder, e.g. Llama-2's) into DST; the releases ship none",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_convert(args: argparse.Namespace) -> int:
    from .ttt_jax import convert_ttt_jax
    from .ttt_pytorch import convert_ttt_pytorch

    kind = args.format if args.format != "auto" else ("pytorch" if args.src.is_dir() else "jax")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        overrides = _parse_overrides(args.set)
        if kind == "pytorch":
            if overrides:
                raise ValueError("--set applies to JAX checkpoints only (a ttt-lm-pytorch folder has its config.json)")
            out = convert_ttt_pytorch(
                args.src, args.dst, dtype=dtype, overwrite=args.overwrite, tokenizer=args.tokenizer
            )
        else:
            out = convert_ttt_jax(
                args.src,
                args.dst,
                dtype=dtype,
                overwrite=args.overwrite,
                progress=not args.quiet,
                tokenizer=args.tokenizer,
                **overrides,
            )
    except (ValueError, TypeError, OSError) as error:  # OSError: missing or existing paths
        print(f"ttt-hf convert: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttt-hf convert", description=__doc__)
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))
