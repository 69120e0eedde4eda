"""The two scripts as a user runs them: a smoke run, and every bad input as one line + exit 2."""

import json

import numpy as np
import pytest
import torch

from minispec import checkpoint
from minispec.model import GPT, GPTConfig
from minispec.train import eval_lm, train_lm
from tests.helpers import run_script


def test_decode_all_table_and_json(tiny_ckpt, tmp_path):
    out = tmp_path / "r.json"
    proc = run_script("decode.py", "--ckpt", tiny_ckpt, "--method", "all", "--max-new-tokens", "24", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "draft_model" in proc.stdout and "speedup" in proc.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["max_new_tokens"] == 24
    rows = {r["method"]: r for r in report["methods"]}
    assert rows["ar"]["tau"] == 1.0 and rows["ar"]["speedup"] == 1.0
    for r in rows.values():
        assert r["identical_to_ar"] is True
        assert {"k", "tau", "alpha", "accept_at", "tokens_per_s", "new_tokens", "target_forwards"} <= r.keys()


def test_decode_one_method_with_a_prompt(tiny_ckpt):
    proc = run_script("decode.py", "--ckpt", tiny_ckpt, "--method", "draft_model", "--prompt", "def main(",
                      "--max-new-tokens", "16", "--show", "--temperature", "0.8", "--top-k", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def main(") and "tokens/s" in proc.stdout
    assert "\033[" not in proc.stdout  # no colour when the output is not a terminal


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_missing_checkpoint(tmp_path):
    one_line_error(run_script("decode.py", "--ckpt", tmp_path / "nothing"), "no checkpoint", "train_tiny.py")


def test_foreign_checkpoint(tmp_path):
    (tmp_path / "target.pt").write_bytes(b"not a checkpoint at all")
    one_line_error(run_script("decode.py", "--ckpt", tmp_path), "not a minispec checkpoint")
    torch.save({"kind": "something else"}, tmp_path / "target.pt")
    one_line_error(run_script("decode.py", "--ckpt", tmp_path), "not a minispec target checkpoint")


@pytest.mark.parametrize("args, words", [
    (["--prompt", "x = 1\n" * 200], ["does not fit"]),
    (["--max-new-tokens", "100000"], ["does not fit"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--method", "nonsense"], ["nonsense"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--k", "0"], ["--k"]),
    (["--k", "100000"], ["--k"]),
    (["--prompt", ""], ["empty"]),
])
def test_bad_decode_input(tiny_ckpt, args, words):
    one_line_error(run_script("decode.py", "--ckpt", tiny_ckpt, *args), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tiny_ckpt):
    one_line_error(run_script("decode.py", "--ckpt", tiny_ckpt, "--device", "cuda"), "GPU")
    one_line_error(run_script("train_tiny.py", "--preset", "test", "--device", "cuda"), "GPU")


def test_data_without_text(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    one_line_error(run_script("train_tiny.py", "--preset", "test", "--data", tmp_path, "--out", tmp_path / "o"),
                   "no text")
    one_line_error(run_script("train_tiny.py", "--preset", "test", "--data", tmp_path / "missing"), "missing")


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
