"""Blockwise heads: proposals come for free from the verification forward; the candidate tree."""

import pytest
import torch

import minispec
from minispec.drafters.blockwise import tree_draft, tree_nodes
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


def test_twelve_heads_are_trained(tiny, tiny_ckpt):
    model, _ = tiny
    drafter = minispec.make_drafter("blockwise", model, ckpt=tiny_ckpt, k=12)
    assert generate(model, [10, 11, 12, 13], 20, drafter).tokens == generate(model, [10, 11, 12, 13], 20).tokens


def test_tree_keeps_the_likeliest_nodes_and_each_sees_its_ancestors():
    acc = torch.tensor([[0.6, 0.2, 0.1], [0.5, 0.3, 0.1]])  # (heads, ranks)
    nodes = tree_nodes(acc, k=2, size=4)
    # scores: (0,) .6, (0,0) .3, (1,) .2, (0,1) .18, (2,) .1, (1,0) .1, ...
    assert nodes == [(0,), (1,), (0, 0), (0, 1)]
    draft, head, rank = tree_draft(nodes)
    assert draft.depth.tolist() == [1, 1, 2, 2] and head.tolist() == [0, 0, 1, 1] and rank.tolist() == [0, 1, 0, 1]
    assert draft.paths == [[0, 2], [0, 1, 3], [0, 1, 4]]
    expected = torch.tensor([[1, 0, 0, 0, 0],   # x_t
                             [1, 1, 0, 0, 0],   # (0,)
                             [1, 0, 1, 0, 0],   # (1,)
                             [1, 1, 0, 1, 0],   # (0, 0)
                             [1, 1, 0, 0, 1]],  # (0, 1)
                            dtype=torch.bool)
    assert torch.equal(draft.mask, expected)


def test_a_tree_allowed_deeper_than_it_reaches_runs_only_the_heads_it_reads(tiny, tiny_ckpt):
    """8 nodes reach at most 8 deep, so at k = 12 the heads past the tree's depth are not run, and
    the tree's tokens are what running all 12 heads gives."""
    model, _ = tiny
    drafter = minispec.make_drafter("blockwise", model, ckpt=tiny_ckpt, k=12)
    assert drafter.heads_read[12] <= 8 < 12
    all_heads = minispec.make_drafter("blockwise", model, ckpt=tiny_ckpt, k=12)
    all_heads.heads_read = list(range(13))
    ran = []  # how many heads each call of the drafter's heads runs
    heads_forward = drafter.heads.forward
    drafter.heads.forward = lambda h, e, n=None: ran.append(n) or heads_forward(h, e, n)
    greedy, generator = minispec.Sampling(), torch.Generator().manual_seed(0)
    seq = [10, 11, 12, 13] + generate(model, [10, 11, 12, 13], 12).tokens
    for cut in range(5, len(seq)):  # any hidden state: the two must agree
        drafter.hidden = all_heads.hidden = torch.randn(model.config.n_embd, generator=generator)
        tokens = drafter.propose(seq[:cut], 12, greedy).tokens
        assert torch.equal(tokens, all_heads.propose(seq[:cut], 12, greedy).tokens)
    assert set(ran) == {drafter.heads_read[12]}
