"""minispec: speculative decoding from scratch, small enough to read top to bottom.

    import minispec
    model, tok = minispec.load("out/tiny")
    drafter = minispec.make_drafter("draft_model", model, ckpt="out/tiny", k=4)
    res = minispec.generate(model, tok.encode("def main("), max_new_tokens=64, drafter=drafter)
    print(tok.decode(res.tokens), res.stats.tau)
"""

from .checkpoint import load_target as load
from .drafters import METHODS, make_drafter
from .errors import MinispecError
from .gpt2 import load_gpt2
from .model import GPT, GPTConfig
from .speculative import Draft, Drafter, generate

__all__ = ["load", "load_gpt2", "generate", "make_drafter", "METHODS", "GPT", "GPTConfig", "Draft", "Drafter",
           "MinispecError"]
