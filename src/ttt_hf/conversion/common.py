"""Pieces shared by the converters: the atomic output folder, the key check, the tokenizer to ship."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


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
