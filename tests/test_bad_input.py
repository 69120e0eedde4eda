"""Every bad input to the two scripts: one clear line on stderr, exit status 2, no traceback, and
nothing half-written. Checkpoints that are missing, foreign, damaged, mismatched or malicious are
refused the same way, and loading one never runs code. An interrupted training run leaves the
earlier checkpoint loadable."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import minispec
from minispec import checkpoint
from minispec.model import GPT, GPTConfig
from tests.helpers import ROOT, run_script


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--prompt", "x = 1\n" * 200], ["does not fit"]),
    (["--prompt", ""], ["empty"]),
    (["--max-new-tokens", "100000"], ["does not fit"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--max-new-tokens", "many"], ["--max-new-tokens"]),
    (["--method", "nonsense"], ["nonsense"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", "inf"], ["--temperature"]),
    (["--temperature", "1e-45"], ["--temperature"]),
    (["--temperature", "1e9"], ["--temperature"]),
    (["--top-k", "0"], ["--top-k"]),
    (["--k", "0"], ["--k"]),
    (["--k", "-3"], ["--k"]),
    (["--k", "100000"], ["--k"]),
    (["--k", "banana"], ["--k", "auto"]),
    (["--seed", str(2 ** 70)], ["--seed"]),
    (["--seed", "-1"], ["--seed"]),
    (["--beta", "0"], ["--beta"]),
    (["--beta", "100000"], ["--beta", "vocabulary"]),
    (["--beta", "2", "--temperature", "1"], ["--beta", "greedy"]),
    (["--margin", "1"], ["--beta"]),
    (["--beta", "2", "--margin", "-1"], ["--margin"]),
    (["--beta", "2", "--margin", "nan"], ["--margin"]),
    (["--json", "no/such/folder/r.json"], ["--json"]),
    (["--json", "."], ["--json"]),
    (["--json", ""], ["--json"]),
    (["--html", "no/such/folder/r.html"], ["--html"]),
    (["--no-graphs", "--static"], ["--static"]),
    (["--device", "tpu"], ["--device"]),
    (["--threads", "0"], ["--threads"]),
    (["--threads", "4096"], ["--threads"]),
])
def test_bad_decode_flag(tiny_ckpt, args, words):
    one_line_error(run_script("decode.py", "--ckpt", tiny_ckpt, *args), *words)


def test_prompt_that_is_not_utf8(tiny_ckpt):
    proc = subprocess.run([sys.executable, str(ROOT / "decode.py"), "--ckpt", str(tiny_ckpt), "--prompt",
                           b"def \xff\xfe(", "--method", "ar"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    one_line_error(proc, "UTF-8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tiny_ckpt):
    one_line_error(run_script("decode.py", "--ckpt", tiny_ckpt, "--device", "cuda"), "GPU")
    one_line_error(run_script("train_tiny.py", "--preset", "test", "--device", "cuda"), "GPU")


@pytest.mark.parametrize("args, words", [
    (["--out", ""], ["--out"]),
    (["--out", "   "], ["--out"]),
    (["--seed", str(2 ** 70)], ["--seed"]),
    (["--preset", "huge"], ["--preset"]),
    (["--data", "no/such/corpus"], ["no/such/corpus"]),
    (["--init-from", "no/such/gpt2"], ["no/such/gpt2"]),
    (["--tune-from", "out/tiny"], ["--tune-from", "--consistency"]),
    (["--consistency", "--tune-from", "no/such/ckpt"], ["no checkpoint", "no/such/ckpt"]),
    (["--consistency", "--tune-from", "out/tiny", "--layerskip"], ["--tune-from", "--layerskip"]),
    (["--init-from", "no/such/gpt2", "--layerskip"], ["--layerskip", "--init-from"]),
    (["--threads", "0"], ["--threads"]),
])
def test_bad_training_flag(args, words, tmp_path):
    extra = [] if "--out" in args else ["--out", tmp_path / "o"]
    one_line_error(run_script("train_tiny.py", "--preset", "test", *args, *extra), *words)


def test_training_into_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    one_line_error(run_script("train_tiny.py", "--preset", "test", "--out", tmp_path / "file"), "not a folder")
    one_line_error(run_script("train_tiny.py", "--preset", "test", "--out", tmp_path / "file" / "sub"), "--out")


def test_data_without_text(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    one_line_error(run_script("train_tiny.py", "--preset", "test", "--data", tmp_path, "--out", tmp_path / "o"),
                   "no text")


# Checkpoints: a copy of the test checkpoint, one file damaged at a time.

@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    return folder


def edit(path, change):
    """Load a checkpoint file as plain data, change it, save it back."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_missing_and_foreign_checkpoints(tmp_path):
    one_line_error(run_script("decode.py", "--ckpt", tmp_path / "nothing"), "no checkpoint", "train_tiny.py")
    (tmp_path / "target.pt").write_bytes(b"not a checkpoint at all")
    one_line_error(run_script("decode.py", "--ckpt", tmp_path), "not a minispec checkpoint")
    torch.save({"kind": "something else"}, tmp_path / "target.pt")
    one_line_error(run_script("decode.py", "--ckpt", tmp_path), "not a minispec target checkpoint")
    torch.save([1, 2, 3], tmp_path / "target.pt")
    one_line_error(run_script("decode.py", "--ckpt", tmp_path), "not a minispec target checkpoint")


class RunsCode:
    """A pickle that would run a shell command if it were ever unpickled with full pickle."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "code-ran"
    with open(tmp_path / "target.pt", "wb") as f:
        pickle.dump({"kind": "target", "config": RunsCode(marker)}, f)
    torch.save({"kind": "target", "model": RunsCode(marker)}, tmp_path / "draft_model.pt")
    one_line_error(run_script("decode.py", "--ckpt", tmp_path), "not a minispec checkpoint")
    with pytest.raises(minispec.MinispecError):
        checkpoint.load(tmp_path / "draft_model.pt", "draft_model")
    assert not marker.exists()


@pytest.mark.parametrize("field", ["meta", "config", "model", "tokenizer"])
def test_target_without_a_field(ckpt_copy, field):
    edit(ckpt_copy / "target.pt", lambda s: s.pop(field))
    one_line_error(run_script("decode.py", "--ckpt", ckpt_copy, "--method", "ar"), repr(field))


@pytest.mark.parametrize("change, words", [
    (lambda s: s["meta"].pop("prompts"), ["prompts"]),
    (lambda s: s.update(config={**s["config"], "n_layer": 0}), ["n_layer"]),
    (lambda s: s.update(config={**s["config"], "colour": "red"}), ["config"]),
    (lambda s: s.update(config={**s["config"], "n_layer": 7}), ["do not match"]),
    (lambda s: s.update(model={**s["model"], "lm_head.weight": torch.zeros(3, 3)}), ["do not match"]),
    (lambda s: s.update(tokenizer={"kind": "bpe", "tokens": "nonsense"}), ["tokenizer"]),
])
def test_damaged_target(ckpt_copy, change, words):
    edit(ckpt_copy / "target.pt", change)
    one_line_error(run_script("decode.py", "--ckpt", ckpt_copy, "--method", "ar"), *words)


@pytest.mark.parametrize("method, file, change, words", [
    ("blockwise", "blockwise.pt", lambda s: s.pop("acc"), ["'acc'"]),
    ("blockwise", "blockwise.pt", lambda s: s.pop("sampling_heads"), ["'sampling_heads'"]),
    ("blockwise", "blockwise.pt", lambda s: s.update(n_heads="12"), ["'n_heads'"]),
    ("blockwise", "blockwise.pt", lambda s: s.update(acc=s["acc"][:, :2]), ["accuracies"]),
    ("blockwise", "blockwise.pt", lambda s: s.update(n_tokens=s["n_tokens"] + 1), ["do not match"]),
    ("draft_model", "draft_model.pt", lambda s: s.pop("model"), ["'model'"]),
    ("draft_model", "draft_model.pt", lambda s: s.update(config={**s["config"], "n_layer": 3}), ["do not match"]),
    ("mask", "mask.pt", lambda s: s.update(k_max=None), ["'k_max'"]),
    ("mask", "mask.pt", lambda s: s.update(model={}), ["do not match"]),
    ("mask", "mask.pt", lambda s: s.pop("sampling_model"), ["'sampling_model'"]),
    ("mask", "mask.pt", lambda s: s.update(sampling_model={}), ["do not match"]),
    ("layerskip", "layerskip.pt", lambda s: s.update(exit_layer="2"), ["'exit_layer'"]),
])
def test_damaged_drafter(ckpt_copy, method, file, change, words):
    edit(ckpt_copy / file, change)
    one_line_error(run_script("decode.py", "--ckpt", ckpt_copy, "--method", method, "--max-new-tokens", "4"), *words)


@pytest.mark.parametrize("change", [{"vocab_size": 500}, {"block_size": 64}, {"n_embd": 32, "n_head": 2}])
def test_drafter_made_for_another_target(ckpt_copy, change):
    target, _ = minispec.load(ckpt_copy)
    other = GPT(GPTConfig(**{**vars(target.config), "n_layer": 1, **change}))
    checkpoint.save_gpt(ckpt_copy / "draft_model.pt", "draft_model", other)
    one_line_error(run_script("decode.py", "--ckpt", ckpt_copy, "--method", "draft_model", "--max-new-tokens", "4"),
                   "another target")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_training_keeps_the_earlier_checkpoint(ckpt_copy, sig):
    before = {p.name: p.read_bytes() for p in ckpt_copy.glob("*.pt")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), "--preset", "test", "--out", str(ckpt_copy),
                             "--seed", "1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal, even
    # when pytest itself runs in the background, where the shell has it (and its children) ignore SIGINT
    time.sleep(6)  # well into training: corpus, tokenizer, the target's steps
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and stderr.strip() == "interrupted", stderr
    for name in before:  # each file is the old one or a complete new one, never half of one
        state = checkpoint.load(ckpt_copy / name, torch.load(ckpt_copy / name, weights_only=True)["kind"])
        assert state["kind"]
    minispec.load(ckpt_copy)
    for method in ("draft_model", "blockwise", "mask"):
        minispec.make_drafter(method, minispec.load(ckpt_copy)[0], ckpt=ckpt_copy)
