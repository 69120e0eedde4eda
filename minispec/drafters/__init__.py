"""The registry of decoding methods: a name -> a function making its drafter.

Every method in METHODS goes through the same tests (tests/test_methods.py) and the same
benchmark (decode.py --method all), so a new drafter cannot skip either. "ar" is plain
autoregressive decoding: no drafter at all. k="auto" wraps a method's drafter, built for
k = AUTO_K_MAX (those in SHAPED_BY_K for AUTO_K_SWEEP), in adaptive.Adaptive: its depth is then
chosen before every step, among depths 0..AUTO_K_SWEEP at first and deeper only while the
deepest timed is the best.
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
AUTO_K_MAX = 12  # the deepest draft k="auto" may choose
AUTO_K_SWEEP = 8  # depths it times first; deeper ones only while the deepest timed is the best
SHAPED_BY_K = {"lookahead"}  # whose whole block, not only its depth, is built for k (its n-grams)


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
        if k == "auto":
            built_for = AUTO_K_SWEEP if name in SHAPED_BY_K else AUTO_K_MAX
            drafter = factory(model, ckpt=ckpt, k=built_for, untrained=untrained, **options)
            return Adaptive(drafter, sweep=AUTO_K_SWEEP)
        return factory(model, ckpt=ckpt, k=k, untrained=untrained, **options)
