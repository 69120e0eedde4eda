"""Blockwise heads: proposals come for free from the verification forward."""

import pytest

import minispec
from minispec.speculative import generate


def test_proposing_costs_no_target_forward(tiny, tiny_ckpt):
    model, _ = tiny
    calls = []
    hook = model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        drafter = minispec.make_drafter("blockwise", model, ckpt=tiny_ckpt, k=4)
        res = generate(model, [10, 11, 12, 13], 40, drafter)
    finally:
        hook.remove()
    assert len(calls) == res.stats.target_forwards + 1  # every step's one verification, plus the prefill
    assert res.stats.target_forwards < 40 and res.stats.accepted > 0  # and the heads did propose


def test_more_heads_than_trained_is_a_clear_error(tiny, tiny_ckpt):
    model, _ = tiny
    with pytest.raises(minispec.MinispecError, match="k=99"):
        minispec.make_drafter("blockwise", model, ckpt=tiny_ckpt, k=99)
