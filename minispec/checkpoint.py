"""Checkpoints: one file per model in a folder (out/tiny/target.pt, out/tiny/draft_model.pt, ...).

Each file is a dict with a "kind" that says what it holds, written to a temporary file and then
renamed over the old one, so an interrupted run never leaves a half-written checkpoint.
"""

import os
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import MinispecError
from .model import GPT, GPTConfig
from .tokenizer import encoding_from_state, encoding_state

TRAIN_HINT = "python train_tiny.py --out {folder}"


def save(path, kind, **payload):
    """Write {"kind": kind, **payload} to path atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"kind": kind, **payload}, tmp)
    os.replace(tmp, path)


def load(path, kind, device="cpu"):
    """Read a checkpoint of this kind, or raise MinispecError saying what is wrong and what to run."""
    path = Path(path)
    if not path.is_file():
        raise MinispecError(f"no checkpoint at {path}: make one with `{TRAIN_HINT.format(folder=path.parent)}`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise MinispecError(f"{path} is not a minispec checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise MinispecError(f"{path} is not a minispec {kind} checkpoint (it holds {found!r})")
    return ckpt


def save_gpt(path, kind, model, **payload):
    """Save a GPT with its config (and whatever else the caller passes, e.g. the tokenizer)."""
    save(path, kind, config=asdict(model.config), model=model.state_dict(), **payload)


def load_gpt(ckpt, device="cpu"):
    """Rebuild the GPT stored in a loaded checkpoint dict, in eval mode."""
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def save_target(folder, model, enc, meta):
    save_gpt(Path(folder) / "target.pt", "target", model, tokenizer=encoding_state(enc), meta=meta)


def load_target(folder, device="cpu"):
    """The target GPT and its tiktoken Encoding from folder/target.pt."""
    ckpt = load(Path(folder) / "target.pt", "target", device)
    return load_gpt(ckpt, device), encoding_from_state(ckpt["tokenizer"])


def target_meta(folder):
    """What train_tiny.py recorded with the target: preset, data, training result, held-out prompts."""
    return load(Path(folder) / "target.pt", "target")["meta"]
