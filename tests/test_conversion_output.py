"""The converters' output folder: one writer per destination, no replacement without --overwrite, nothing
half-written or hidden after an error, and the leftovers of a killed conversion cleaned up by the next one."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ttt_hf.conversion.common import OutputLockedError, atomic_output_dir


def _entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_the_block_writes_the_folder_at_once_and_only_on_success(tmp_path):
    dst = tmp_path / "out"
    with atomic_output_dir(dst) as tmp:
        (tmp / "weights").write_text("w")
        assert not dst.exists()
    assert _entries(dst) == ["weights"] and _entries(tmp_path) == ["out"]
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "failed") as tmp:
        (tmp / "weights").write_text("w")
        raise RuntimeError
    assert _entries(tmp_path) == ["out"]  # no folder, no lock, no temporary folder


def test_a_second_writer_of_the_same_destination_is_refused(tmp_path):
    dst = tmp_path / "out"
    with atomic_output_dir(dst) as tmp:
        with pytest.raises(OutputLockedError, match=rf"being written by another conversion \({os.getpid()} "):
            with atomic_output_dir(dst, overwrite=True):
                pass
        (tmp / "weights").write_text("first")
    assert (dst / "weights").read_text() == "first"
    assert _entries(tmp_path) == ["out"]


def test_a_destination_that_appears_meanwhile_is_kept_without_overwrite(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(FileExistsError, match="already exists"), atomic_output_dir(dst) as tmp:
        (tmp / "weights").write_text("mine")
        dst.mkdir()
        (dst / "theirs").write_text("theirs")
    assert _entries(dst) == ["theirs"] and _entries(tmp_path) == ["out"]
    with atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "weights").write_text("mine")
    assert _entries(dst) == ["weights"] and _entries(tmp_path) == ["out"]


def test_overwrite_never_replaces_a_file(tmp_path):
    dst = tmp_path / "out"
    dst.write_text("the user's file")
    with pytest.raises(FileExistsError, match="is not a folder"), atomic_output_dir(dst, overwrite=True):
        pytest.fail("the block must not run")
    assert dst.read_text() == "the user's file" and _entries(tmp_path) == ["out"]


def test_the_leftovers_of_a_killed_conversion_are_removed_by_the_next(tmp_path, caplog):
    dst = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time
        from ttt_hf.conversion.common import atomic_output_dir
        with atomic_output_dir({str(dst)!r}) as tmp:
            (tmp / "part").write_text("half")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        with pytest.raises(OutputLockedError, match=str(writer.pid)):  # while it runs
            with atomic_output_dir(dst):
                pass
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    leftovers = _entries(tmp_path)
    assert ".out.lock" in leftovers and any(name.startswith(".out.tmp-") for name in leftovers)
    with caplog.at_level(logging.WARNING, logger="ttt_hf.conversion.common"):
        with atomic_output_dir(dst) as tmp:
            (tmp / "weights").write_text("complete")
    assert _entries(tmp_path) == ["out"] and _entries(dst) == ["weights"]
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert ".out.lock" in warned and ".out.tmp-" in warned
