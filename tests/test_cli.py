"""The two scripts as a user runs them (bad input: tests/test_bad_input.py), and training itself."""

import json

import numpy as np
import pytest
import torch

from minispec import checkpoint
from minispec.model import GPT, GPTConfig
from minispec.train import eval_lm, train_lm
from tests.helpers import run_script


def test_decode_all_table_and_json(tiny_ckpt, tmp_path):
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    proc = run_script("decode.py", "--ckpt", tiny_ckpt, "--method", "all", "--max-new-tokens", "24", "--json", out,
                      "--html", page)
    assert proc.returncode == 0, proc.stderr
    assert "draft_model" in proc.stdout and "speedup" in proc.stdout
    assert f"wrote {page}" in proc.stdout and page.read_text().startswith("<!DOCTYPE html>")
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["max_new_tokens"] == 24
    rows = {r["method"]: r for r in report["methods"]}
    assert rows["ar"]["tau"] == 1.0 and rows["ar"]["speedup"] == 1.0
    for r in rows.values():
        assert r["identical_to_ar"] is True
        assert {"k", "tau", "alpha", "accept_at", "tokens_per_s", "new_tokens", "target_forwards"} <= r.keys()


def test_decode_one_method_with_a_prompt(tiny_ckpt, tmp_path):
    proc = run_script("decode.py", "--ckpt", tiny_ckpt, "--method", "draft_model", "--prompt", "def main(",
                      "--max-new-tokens", "16", "--show", "--temperature", "0.8", "--top-k", "20",
                      "--html", tmp_path / "one.html")
    assert proc.returncode == 0, proc.stderr
    assert "def main(" in (tmp_path / "one.html").read_text()
    assert proc.stdout.startswith("def main(") and "tokens/s" in proc.stdout
    assert "\033[" not in proc.stdout  # no colour when the output is not a terminal


def test_training_lowers_the_loss():
    g = np.random.default_rng(0)
    ids = np.tile(g.integers(0, 50, 97), 40).astype(np.uint16)  # a repeating text: learnable
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    before = eval_lm(model, ids, 8, 32)
    train_lm(model, ids, ids, steps=60, batch_size=8, lr=3e-3, log=lambda line: None)
    assert eval_lm(model, ids, 8, 32) < before - 1.0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save_gpt(tmp_path / "m.pt", "draft_model", model)

    def interrupted(obj, f):
        open(f, "wb").write(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_gpt(tmp_path / "m.pt", "draft_model", model)
    assert checkpoint.load_gpt(checkpoint.load(tmp_path / "m.pt", "draft_model")).config == model.config
