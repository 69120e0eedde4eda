"""minispec: speculative decoding from scratch, small enough to read top to bottom.

    import minispec
    model, tok = minispec.load("out/tiny")
    drafter = minispec.make_drafter("draft_model", model, ckpt="out/tiny", k=4)
    res = minispec.generate(model, tok.encode("def main("), max_new_tokens=64, drafter=drafter)
    print(tok.decode(res.tokens), res.stats.tau)

A drafter of your own subclasses Drafter: propose(seq, room, sampling) returns a Draft (use
sampling.draw(logits) to pick its tokens), observe(step) receives the verification's Step.

The layers, each importing only from those below it:
    tools     bench (methods side by side), html_report
    methods   drafters/ (one file per method) and their registry
    loop      speculative: Draft, Drafter, Sampling, Step, Stats, Result, step, generate;
              adaptive: the draft length chosen before every step (k="auto")
    runtime   cudagraph: fixed-shape forwards (CUDA graphs, or their buffers eagerly), the timer
    core      model, kvcache, masks, verify, errors
    support   tokenizer, data, train, checkpoint, gpt2, cli (used by the methods and the scripts)
"""

from .adaptive import Adaptive
from .checkpoint import load_target as load
from .cudagraph import StaticForwards
from .drafters import AUTO_K_MAX, AUTO_K_SWEEP, METHODS, make_drafter
from .errors import MinispecError
from .gpt2 import load_gpt2
from .model import GPT, GPTConfig
from .speculative import Draft, Drafter, Result, Sampling, Stats, Step, generate, step

__all__ = ["Adaptive", "load", "load_gpt2", "generate", "step", "make_drafter", "METHODS", "AUTO_K_MAX",
           "AUTO_K_SWEEP", "GPT", "GPTConfig", "Draft", "Drafter", "Sampling", "Step", "Stats", "Result",
           "StaticForwards", "MinispecError"]
