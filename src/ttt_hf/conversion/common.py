"""Pieces shared by the converters: the atomic output folder, the key check, the tokenizer to ship, and the
final step (check the mapped weights against the model, save the folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..ttt.configuration_ttt import TTTConfig
from ..ttt.modeling_ttt import TTTForCausalLM


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `dst` that becomes `dst` only if the block completes."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{tmp.name}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_keys(mapped: dict[str, str], expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raises ValueError naming every unknown, missing or mis-shaped key.

    mapped: our key -> source key; expected: our key -> shape the model wants; shapes: our key -> shape found.
    """
    unexpected = sorted(mapped[k] for k in mapped if k not in expected)
    missing = sorted(k for k in expected if k not in mapped)
    mis_shaped = sorted(
        f"{mapped[k]}: {shapes[k]} (expected {expected[k]})" for k in mapped if k in expected and shapes[k] != expected[k]
    )
    problems = []
    if unexpected:
        problems.append(f"unknown keys in the checkpoint: {', '.join(unexpected)}")
    if missing:
        problems.append(f"missing keys (ttt_hf names): {', '.join(missing)}")
    if mis_shaped:
        problems.append(f"keys with the wrong shape: {'; '.join(mis_shaped)}")
    if problems:
        raise ValueError("cannot convert this checkpoint: " + " | ".join(problems))


def load_tokenizer(tokenizer: str | Path | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer to save beside the converted weights (the official checkpoints ship none; `ttt-hf perplexity`
    and `generate` need one): a local folder or a Hub id already in the cache. Loaded before the conversion
    starts, so a wrong path fails before gigabytes are read."""
    if tokenizer is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer {str(tokenizer)!r} is neither a tokenizer folder nor a cached Hub id: {error}") \
            from error


def save_converted(
    config: TTTConfig,
    weights: dict[str, torch.Tensor],
    sources: dict[str, str],
    dst: str | Path,
    overwrite: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Checks `weights` (ttt_hf names; `sources` maps them to the checkpoint's names for the error message)
    against a `TTTForCausalLM(config)` built on the meta device, then saves the model, the tokenizer and
    `extra_files` ({name: text}) into `dst`, which appears only once complete."""
    with torch.device("meta"):
        model = TTTForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    check_keys(sources, expected, {k: tuple(v.shape) for k, v in weights.items()})
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    model.eval()
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(dst)
