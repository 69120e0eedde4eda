"""What every lesson shares: the --ckpt flag, finding (or making) a checkpoint, and printing.

A lesson reads the checkpoint that `python train_tiny.py` writes to out/tiny. If there is none,
it trains a micro model with `train_tiny.py --preset test` (about 20 seconds) into out/micro,
says so, and goes on with that: every lesson runs from a fresh clone.
"""

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python lessons/NN_....py` works from a clone without installing minispec

import minispec  # noqa: E402
from minispec import checkpoint, masks  # noqa: E402
from minispec.cli import run  # noqa: E402,F401  (the lessons' entry point: one-line errors, exit status 2)
from minispec.cudagraph import forward, seconds_per_call  # noqa: E402

OUT = ROOT / "out"  # what the lessons write
DEFAULT = OUT / "tiny"
MICRO = OUT / "micro"


def lesson(doc):
    """Parse the lesson's flags, print its title and idea, and return (model, tok, ckpt folder).

    doc: the lesson's module docstring; its first line is the title, its first paragraph after
    that the idea printed before anything runs."""
    title, _, rest = doc.strip().partition("\n")
    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (default: out/tiny, or a micro model trained now)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint()
    model, tok = minispec.load(ckpt)
    print(f"{title}\n{'=' * len(title)}\n")
    print(textwrap.fill(rest.strip().split("\n\n")[0].replace("\n", " "), 96, break_on_hyphens=False), "\n")
    c = model.config
    print(f"checkpoint {display(ckpt)}: a {c.n_layer}-layer GPT, {c.n_head} heads, width {c.n_embd}, "
          f"vocabulary {c.vocab_size}, context {c.block_size} ({model.num_params() / 1e6:.2f}M parameters)\n")
    return model, tok, ckpt


def find_checkpoint():
    """out/tiny when it holds a target; else out/micro, trained now on the test preset if need be."""
    for folder in (DEFAULT, MICRO):
        if (folder / "target.pt").is_file():
            return folder
    print(f"no checkpoint in {display(DEFAULT)}: training a micro model now "
          f"(python train_tiny.py --preset test --out {display(MICRO)}, about 20 s; "
          f"`python train_tiny.py` makes the real one in about 13 min)", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train_tiny.py"), "--preset", "test", "--out", str(MICRO)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return MICRO


def display(path):
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def val_tokens(ckpt):
    """The held-out token ids that train_tiny.py cached in the checkpoint folder (a numpy array)."""
    return np.load(next(Path(ckpt).glob("tokens-val*.npy")))


def prompts(ckpt, tok, n=2):
    """n held-out prompts as token ids: those train_tiny.py stored with the target, then (a micro
    model's small corpus may give fewer) 16-token windows of the validation tokens."""
    ids = [tok.encode(text, allowed_special="all") for text in checkpoint.target_meta(ckpt)["prompts"][:n]]
    val = val_tokens(ckpt)
    return ids + [val[i * 100:i * 100 + 16].tolist() for i in range(n - len(ids))]


def decode_prompts(model, drafter, test_prompts, new_tokens=48):
    """Decode every prompt with `drafter` -> (the summed Stats, whether every output equals plain
    greedy decoding's)."""
    total, same = minispec.Stats(), True
    for p in test_prompts:
        res = minispec.generate(model, p, new_tokens, drafter)
        total.add(res.stats)
        same &= res.tokens == minispec.generate(model, p, new_tokens).tokens
    return total, same


def forward_ms(model, cache, T, start=64, reps=100):
    """Milliseconds per cached forward of T tokens at slot `start`, plain or static (the cache says)."""
    idx = torch.zeros(1, T, dtype=torch.long, device=cache.kv.device)
    pos = torch.arange(start, start + T, device=cache.kv.device)
    mask = masks.cached_block(start, masks.causal(T), start + T, cache.kv.device)

    def call():
        forward(model, idx, pos, mask, cache, pos)[0].view(-1)[0].item()  # the host reads the result
    return seconds_per_call(call, reps, rounds=3) * 1e3


def section(title):
    print(f"\n--- {title} " + "-" * max(3, 92 - len(title)))


def show_mask(mask, labels=None, cols=None):
    """Print a mask with minispec.masks.render, indented."""
    text = masks.render(mask, labels, cols if cols is not None else labels)
    print(textwrap.indent(text, "    "))


def label(tok, ids):
    """Readable labels for token ids: their text, with whitespace made visible."""
    return [repr(tok.decode([i]))[1:-1].replace(" ", "·") or "?" for i in ids]
