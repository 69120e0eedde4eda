"""Load a Hugging Face GPT-2 folder (gpt2, gpt2-medium, -large, -xl, distilgpt2...) into minispec's GPT.

    model, tok = minispec.load_gpt2("path/to/gpt2")   # e.g. what `huggingface-cli download gpt2` fetched

The folder holds four things, and this file reads each with the standard library, torch and tiktoken:

- config.json: GPT2Config's fields. n_positions is the context (block_size); n_embd, n_layer, n_head
  and vocab_size give the size, from 124M (12 layers x 768) to 1.5B (48 x 1600). Settings minispec's
  GPT implements only one way (GELU's tanh form, LayerNorm eps 1e-5, a tied head...) are checked.
- model.safetensors or pytorch_model.bin: the weights, named as in transformers' GPT2Model, either
  bare ("h.0.attn.c_attn.weight", as the gpt2 repo stores them) or under GPT2LMHeadModel's
  "transformer." prefix. nanoGPT's names, which minispec uses, are the same names; three things differ:
  * the four projections (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are GPT-2's "Conv1D",
    which stores its weight as [in, out] and computes x @ W + b, where nn.Linear stores [out, in]
    and computes x @ W.T + b: each of these matrices is transposed on the way in;
  * the LM head is the token embedding (tied): lm_head.weight is often absent, and must equal
    wte.weight when present;
  * attn.bias and attn.masked_bias are buffers holding GPT-2's causal mask; minispec takes the mask
    as an input instead, so they are skipped.
  A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each name
  to {"dtype": "F32" | "F16" | "BF16" ..., "shape": [...], "data_offsets": [begin, end]} (plus an
  optional "__metadata__"), then the raw little-endian tensor bytes; offsets count from byte 8 + N.
- vocab.json and merges.txt: GPT-2's byte-level BPE as OpenAI published it (encoder.json, vocab.bpe).
  Both spell bytes as printable characters: a printable byte other than the space stands for itself,
  the 68 others become chr(256), chr(257)... in byte order (so " " is "Ġ"). A token's id is its
  tiktoken rank, and merges.txt lists merges in rank order, which is checked: tiktoken merges the
  pair whose merged token has the lowest rank, so ids out of merge order would tokenize differently.
  (tiktoken.load.data_gym_to_mergeable_bpe_ranks reads the same files, but caches by path in a
  temporary folder, so a folder whose files changed would get stale ranks, and it reports a
  mismatch as an AssertionError.)
"""

import json
import math
import re
import struct
from pathlib import Path

import tiktoken
import torch

from .errors import MinispecError
from .model import GPT, GPTConfig
from .tokenizer import EOT, make_encoding

LAYOUT = ("a GPT-2 folder in the Hugging Face layout holds config.json, model.safetensors or "
          "pytorch_model.bin, vocab.json and merges.txt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one present is read
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool}
# GPT2Config settings that minispec's GPT implements one way only: key -> (HF's default, other accepted values...)
FIXED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are GELU's tanh approximation
         "layer_norm_epsilon": (1e-5,), "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
         "add_cross_attention": (False,), "tie_word_embeddings": (True,)}


def read_json(path):
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise MinispecError(f"{path} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise MinispecError(f"{path} should hold a JSON object, it holds a {type(data).__name__}")
    return data


def read_config(path):
    """config.json -> GPTConfig, or MinispecError if it is not a GPT-2 that minispec's GPT can run."""
    cfg = read_json(path)
    if cfg.get("model_type") != "gpt2":
        raise MinispecError(f"{path} describes a {cfg.get('model_type')!r} model, not GPT-2 (model_type 'gpt2')")
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        value = cfg.get(key)
        if type(value) is not int or value < 1:
            raise MinispecError(f"{path}: {key} must be a positive integer, got {value!r}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise MinispecError(f"{path}: n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}")
    for key, accepted in {**FIXED, "n_inner": (None, 4 * cfg["n_embd"])}.items():
        if cfg.get(key, accepted[0]) not in accepted:
            raise MinispecError(f"{path}: {key} = {cfg[key]!r}, but minispec's GPT (like GPT-2) "
                                f"needs one of {accepted}")
    return GPTConfig(block_size=cfg["n_positions"], vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"])


def read_safetensors(path):
    """{name: tensor} from a .safetensors file (the format is described at the top of this file)."""
    tensors = {}
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size - 8:
                raise ValueError(f"a header of {n} bytes runs past the end of the file")
            header = json.loads(f.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise MinispecError(f"{path}: {name} has dtype {info['dtype']}, which minispec does not read")
                begin, end = info["data_offsets"]
                buf = bytearray(end - begin)
                f.seek(8 + n + begin)
                if f.readinto(buf) != len(buf) or len(buf) != math.prod(info["shape"]) * dtype.itemsize:
                    raise ValueError(f"{name}'s bytes do not match its shape")
                tensors[name] = torch.frombuffer(buf, dtype=dtype).view(info["shape"])
        except (struct.error, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise MinispecError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    return tensors


def read_weights(folder):
    """(path, {HF name: tensor}) from the folder's model.safetensors, else its pytorch_model.bin."""
    path = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if path is None:
        raise MinispecError(f"{folder} has no model.safetensors or pytorch_model.bin: {LAYOUT}")
    if path.suffix == ".safetensors":
        return path, read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        raise MinispecError(f"{path} is not a PyTorch state dict ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise MinispecError(f"{path} is not a PyTorch state dict of tensors")
    return path, state


def convert(hf, model, source):
    """HF GPT-2 tensors -> a state dict for `model`: strip the prefix, drop the mask buffers,
    transpose the Conv1D matrices, tie the head. Every name and shape is checked against model."""
    hf = {name.removeprefix("transformer."): t for name, t in hf.items()}
    hf = {name: t for name, t in hf.items() if not MASK_BUFFER.fullmatch(name)}
    head = hf.pop("lm_head.weight", None)
    expected = model.state_dict()
    state = {}
    for name, t in hf.items():
        key = "transformer." + name
        if key not in expected:
            raise MinispecError(f"{source} holds {name}, which a {model.config.n_layer}-layer GPT-2 "
                                f"(as config.json describes it) does not have")
        conv1d = name.endswith(CONV1D)
        want = expected[key].shape[::-1] if conv1d else expected[key].shape  # in the file's orientation
        if t.shape != want:
            raise MinispecError(f"{source}: {name} has shape {list(t.shape)}, but config.json implies {list(want)}")
        state[key] = t.t() if conv1d else t  # Conv1D [in, out] -> nn.Linear [out, in]
    missing = [key.removeprefix("transformer.") for key in expected if key not in state and key != "lm_head.weight"]
    if missing:
        more = f" and {len(missing) - 1} more tensors" if missing[1:] else ""
        raise MinispecError(f"{source} lacks {missing[0]}{more}")
    if head is not None and not torch.equal(head, hf["wte.weight"]):
        raise MinispecError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 (and minispec's GPT) ties them")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def byte_decoder():
    """Character -> byte, undoing GPT-2's printable spelling of bytes (see the top of this file)."""
    kept = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    shifted = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(shifted)}


def read_tokenizer(folder):
    """vocab.json + merges.txt -> a tiktoken Encoding with <|endoftext|> as its last id."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab = read_json(vocab_path)
    eot = vocab.pop(EOT, None)
    decoder = byte_decoder()
    try:
        ranks = {bytes(decoder[c] for c in token): rank for token, rank in vocab.items()}
        lines = merges_path.read_text("utf-8").splitlines()
        merged = [bytes(decoder[c] for c in a + b)
                  for a, b in (line.split(" ") for line in lines if line and not line.startswith("#version"))]
    except (KeyError, ValueError) as e:  # a character outside GPT-2's byte spelling, a line that is not "a b"
        raise MinispecError(f"{vocab_path} and merges.txt are not GPT-2's byte-level BPE "
                            f"({type(e).__name__}: {e})") from None
    if len(ranks) != 256 + len(merged) or any(ranks.get(token) != 256 + i for i, token in enumerate(merged)):
        raise MinispecError(f"{merges_path} and vocab.json disagree: the i-th merge must make token 256 + i, "
                            f"after the 256 single bytes")
    if eot != len(ranks):
        raise MinispecError(f"{vocab_path}: {EOT} must be the last id, {len(ranks)}; it is {eot}")
    return make_encoding(ranks, name="gpt2-hf")  # also checks that all 256 bytes are tokens


def load_gpt2(folder, device="cpu", dtype=torch.float32) -> tuple[GPT, tiktoken.Encoding]:
    """The GPT-2 in a Hugging Face folder: (minispec GPT in eval mode, its tiktoken Encoding)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MinispecError(f"no GPT-2 folder at {folder}: {LAYOUT}")
    for name in ("config.json", "vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise MinispecError(f"{folder / name} is missing: {LAYOUT}")
    config = read_config(folder / "config.json")
    enc = read_tokenizer(folder)
    if enc.n_vocab != config.vocab_size:
        raise MinispecError(f"{folder / 'config.json'} says vocab_size {config.vocab_size}, "
                            f"but vocab.json and merges.txt make {enc.n_vocab} tokens")
    source, hf = read_weights(folder)
    model = GPT(config)
    model.load_state_dict(convert(hf, model, source))
    return model.to(device=device, dtype=dtype).eval(), enc
