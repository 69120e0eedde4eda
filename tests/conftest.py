"""Shared fixtures: a checkpoint trained on the test preset, once per session."""

import pytest
import torch

import minispec
from tests.helpers import run_script

torch.set_num_threads(1)  # the tests' models are tiny: a second thread only waits on a busy machine


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """train_tiny.py --preset test, once per test session: a real (if small) trained checkpoint."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    proc = run_script("train_tiny.py", "--preset", "test", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def tiny(tiny_ckpt):
    model, tok = minispec.load(tiny_ckpt)
    return model, tok
