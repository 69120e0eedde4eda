"""Shared fixtures: a checkpoint trained on the test preset, and tiny random models."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minispec
from minispec.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args):
    """Run one of the top-level scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


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


def random_gpt(vocab_size=11, n_layer=3, n_head=2, n_embd=16, block_size=32, seed=0, scale=1.0):
    """A random float32 GPT; scale > 1 sharpens its distributions (random init is near uniform)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size, vocab_size, n_layer, n_head, n_embd))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(scale)
    return model.eval()
