import os

# Read by huggingface_hub at import time: nothing in the tests may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter; read when the kernels are defined (at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`-n N`) the workers share the cores instead of each taking all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def no_tf32():
    """fp32 comparisons on CUDA: TF32 matmuls would round to ~1e-3."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Our code: the package, and the model folders' files copied next to a checkpoint for trust_remote_code.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent / "src" / "ttt_hf"
_MODEL_FILES = {
    path.name
    for folder in ("ttt", "block_state")
    for path in (_PACKAGE_DIR / folder).glob("*.py")
    if path.name != "__init__.py"
}


def _called_from_ttt_hf() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        # The models' `generate` hands its arguments on unchanged: a deprecated one is its caller's.
        passing_on = frame.f_code.co_name == "generate" and path.name.startswith("modeling_")
        if not passing_on and (_PACKAGE_DIR in path.parents or path.name in _MODEL_FILES):
            return True
        frame = frame.f_back
    return False


class _LoggedDeprecations(logging.Handler):
    def __init__(self, found: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower() and _called_from_ttt_hf():
            self.found.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_deprecation_warnings_from_ttt_hf(monkeypatch):
    """Deprecations that our code causes fail the test, so that the next rename in transformers (like the cache
    argument's in 5.24) is noticed at once: transformers' logged ones and Python's Deprecation/FutureWarnings
    raised while our code is on the stack (`filterwarnings` can't tell: transformers attributes its warnings to
    its callers, often torch's `Module.__call__`). Test code calling old names itself is not concerned."""
    found: list[str] = []
    warn = warnings.warn

    def checked_warn(message, category=None, stacklevel=1, source=None, **kwargs):
        if isinstance(category, type) and issubclass(category, (DeprecationWarning, FutureWarning)):
            if _called_from_ttt_hf():
                found.append(str(message))
        return warn(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", checked_warn)
    # `warning_once` remembers what it said in another test: forget it so each test sees its own warnings.
    logging.Logger.warning_once.cache_clear()
    handler = _LoggedDeprecations(found)
    logger = transformers.logging.get_logger()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not found, f"ttt_hf caused deprecation warnings: {found}"
