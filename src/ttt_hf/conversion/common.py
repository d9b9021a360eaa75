"""Pieces shared by the converters: the atomic output folder, the key check, the tokenizer to ship, and the
final step (check the mapped weights against the model, save the folder)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..ttt.configuration_ttt import TTTConfig
from ..ttt.modeling_ttt import TTTForCausalLM

logger = logging.getLogger(__name__)


class OutputLockedError(FileExistsError):
    """Another process is writing the same output folder."""


def _holder_alive(lock: Path) -> bool:
    """Whether the process named in `lock` (pid and host) still runs; a lock of another host counts as alive."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()[:2]
        if host != socket.gethostname():
            return True
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):  # unreadable or half-written: it was just created, or another user's
        return True
    return True


@contextlib.contextmanager
def _output_lock(dst: Path) -> Iterator[None]:
    """One writer per destination: `.NAME.lock` beside `dst` holds the writer's pid and host. A lock left by a
    killed process (same host, pid gone) is taken over."""
    lock = dst.with_name(f".{dst.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _holder_alive(lock):
                holder = lock.read_text(encoding="utf-8", errors="replace").strip()
                raise OutputLockedError(
                    f"{dst} is being written by another conversion ({holder}); if no conversion runs, remove {lock}"
                ) from None
            logger.warning("removing %s, left by a conversion that did not finish", lock)
            lock.unlink(missing_ok=True)
    else:
        raise OutputLockedError(f"could not lock {dst}: {lock} keeps reappearing")
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `dst` that becomes `dst` only if the block completes.

    One writer at a time per `dst` (a lock file beside it); temporary folders of killed earlier runs are removed.
    `dst` is replaced only with `overwrite`, and only if it is a folder; one that appears while the block runs
    is never replaced without `overwrite`. On any error the user's files are as they were.
    """
    dst = Path(dst)

    def check_destination() -> None:
        if dst.exists() and not dst.is_dir():
            raise FileExistsError(f"{dst} exists and is not a folder: refusing to replace it (remove it first)")
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")

    check_destination()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _output_lock(dst):
        for stale in dst.parent.glob(f".{glob.escape(dst.name)}.tmp-*"):
            logger.warning("removing %s, the partial output of a conversion that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        try:
            yield tmp
            check_destination()  # again: `dst` may have appeared (or changed) while the block ran
            if dst.exists():
                old = dst.with_name(f".{dst.name}.old-{tmp.name}")
                dst.rename(old)
                try:
                    tmp.rename(dst)
                except OSError:
                    old.rename(dst)
                    raise
                shutil.rmtree(old)
            else:
                tmp.rename(dst)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def check_keys(
    mapped: dict[str, str], expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Raises ValueError naming every unknown, missing or mis-shaped key.

    mapped: our key -> source key; expected: our key -> shape the model wants; shapes: our key -> shape found.
    """
    unexpected = sorted(mapped[k] for k in mapped if k not in expected)
    missing = sorted(k for k in expected if k not in mapped)
    mis_shaped = sorted(
        f"{mapped[k]}: {shapes[k]} (expected {expected[k]})"
        for k in mapped
        if k in expected and shapes[k] != expected[k]
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
        raise ValueError(
            f"tokenizer {str(tokenizer)!r} is neither a tokenizer folder nor a cached Hub id: {error}"
        ) from error


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
    non_finite = sorted(sources[k] for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all())
    if non_finite:
        raise ValueError(f"cannot convert this checkpoint: non-finite values (NaN or inf) in {', '.join(non_finite)}")
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
