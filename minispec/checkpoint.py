"""Checkpoints: one file per model in a folder (out/tiny/target.pt, out/tiny/draft_model.pt, ...).

Each file is a dict with a "kind" that says what it holds, written to a temporary file and then
renamed over the old one, so an interrupted run never leaves a half-written checkpoint.
"""

import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import MinispecError
from .model import GPT, GPTConfig
from .tokenizer import encoding_from_state, encoding_state

TRAIN_HINT = "python train_tiny.py --out {folder}"


def save(path, kind, **payload):
    """Write {"kind": kind, **payload} to path atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"kind": kind, **payload}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise MinispecError(f"cannot write {path}: {e.strerror or e}") from None


def load(path, kind, device="cpu", **fields):
    """Read a checkpoint of this kind, or raise MinispecError saying what is wrong and what to run.

    weights_only=True: tensors and plain containers only, so loading a file never runs its code.
    fields: name=type (or a tuple of types) for what the caller needs; a missing or mistyped one
    is reported like a foreign file."""
    path = Path(path)
    if not path.is_file():
        raise MinispecError(f"no checkpoint at {path}: make one with `{TRAIN_HINT.format(folder=path.parent)}`")
    try:
        with warnings.catch_warnings():  # torch warns about pickles it is about to refuse anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise MinispecError(f"{path} is not a minispec checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise MinispecError(f"{path} is not a minispec {kind} checkpoint (it holds {found!r})")
    for name, types in fields.items():
        if not isinstance(ckpt.get(name), types):
            what = "lacks" if name not in ckpt else f"has a {type(ckpt[name]).__name__} for"
            raise MinispecError(f"{path} {what} {name!r}: it is damaged or from another version; "
                                f"remake it with `{TRAIN_HINT.format(folder=path.parent)}`")
    return ckpt


def save_gpt(path, kind, model, **payload):
    """Save a GPT with its config (and whatever else the caller passes, e.g. the tokenizer)."""
    save(path, kind, config=asdict(model.config), model=model.state_dict(), **payload)


def load_gpt(ckpt, device="cpu", source="the checkpoint"):
    """Rebuild the GPT stored in a loaded checkpoint dict, in eval mode."""
    return load_weights(GPT(gpt_config(ckpt["config"], source)), ckpt["model"], source).to(device).eval()


def gpt_config(config, source):
    """A GPTConfig from a checkpoint's dict, every field a positive integer."""
    try:
        config = GPTConfig(**config)
    except TypeError as e:
        raise MinispecError(f"{source} has a model config minispec does not know ({e})") from None
    for name, value in asdict(config).items():
        if not isinstance(value, int) or value < 1:
            raise MinispecError(f"{source}: {name} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head:
        raise MinispecError(f"{source}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    return config


def load_weights(module, state, source):
    """module.load_state_dict(state), or a MinispecError when the weights do not fit the module."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise MinispecError(f"{source}: its weights do not match its config ({first})") from None
    return module


def check_drafter(config, target_config, source):
    """A drafter must share its target's vocabulary, context and width (it reads the target's
    tokens, positions and, for some methods, hidden states)."""
    for name in ("vocab_size", "block_size", "n_embd"):
        mine, theirs = getattr(config, name), getattr(target_config, name)
        if mine != theirs:
            raise MinispecError(f"{source} was trained for another target ({name} {mine}, the target has {theirs}): "
                                f"retrain the drafters with `python train_tiny.py`")


def save_target(folder, model, enc, meta):
    save_gpt(Path(folder) / "target.pt", "target", model, tokenizer=encoding_state(enc), meta=meta)


def load_target(folder, device="cpu"):
    """The target GPT and its tiktoken Encoding from folder/target.pt."""
    path = Path(folder) / "target.pt"
    ckpt = load(path, "target", device, config=dict, model=dict, tokenizer=dict, meta=dict)
    model = load_gpt(ckpt, device, path)
    try:
        enc = encoding_from_state(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise MinispecError(f"{path}: its tokenizer is damaged ({type(e).__name__})") from None
    if enc.n_vocab != model.config.vocab_size:
        raise MinispecError(f"{path}: its tokenizer has {enc.n_vocab} tokens, its model {model.config.vocab_size}")
    return model, enc


def target_meta(folder):
    """What train_tiny.py recorded with the target: preset, data, training result, held-out prompts."""
    path = Path(folder) / "target.pt"
    meta = load(path, "target", meta=dict)["meta"]
    prompts = meta.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise MinispecError(f"{path} holds no held-out prompts: give --prompt, or remake it with "
                            f"`{TRAIN_HINT.format(folder=folder)}`")
    return meta
