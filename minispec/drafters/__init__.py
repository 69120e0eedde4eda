"""The registry of decoding methods: a name -> a function making its drafter.

Every method in METHODS goes through the same tests (tests/test_methods.py) and the same
benchmark (decode.py --method all), so a new drafter cannot skip either. "ar" is plain
autoregressive decoding: no drafter at all. k="auto" wraps a method's drafter, built for
k = AUTO_K_MAX, in adaptive.Adaptive: its depth is then chosen before every step.
"""

import torch

from ..adaptive import Adaptive
from ..errors import MinispecError
from . import blockwise, draft_model, jacobi, layerskip, mask_drafter

METHODS = {
    "ar": None,
    "draft_model": draft_model.make,
    "jacobi": jacobi.make_jacobi,
    "lookahead": jacobi.make_lookahead,
    "blockwise": blockwise.make,
    "layerskip": layerskip.make_layerskip,
    "earlyexit": layerskip.make_earlyexit,
    "mask": mask_drafter.make,
}
AUTO_K_MAX = 8  # the deepest draft k="auto" may choose


def make_drafter(name, model, ckpt=None, k=4, untrained=False, **options):
    """The drafter for method `name` over the target `model` (None for "ar").

    ckpt: the checkpoint folder holding trained drafters. Training-free methods do without it.
    k: the draft length, or "auto" to choose it before every step (adaptive.Adaptive).
    untrained=True builds a trained method's drafter with random weights instead: still lossless,
    just rarely right (the tests use it as a deliberately poor drafter).
    """
    if name not in METHODS:
        raise MinispecError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    if k != "auto" and (not isinstance(k, int) or k < 1):
        raise MinispecError(f"k must be a whole number of at least 1, or 'auto'; got {k!r}")
    factory = METHODS[name]
    if factory is None:
        return None
    with torch.random.fork_rng():  # untrained weights are the same every time; the caller's RNG is untouched
        torch.manual_seed(0)
        drafter = factory(model, ckpt=ckpt, k=AUTO_K_MAX if k == "auto" else k, untrained=untrained, **options)
    return Adaptive(drafter, AUTO_K_MAX) if k == "auto" else drafter
