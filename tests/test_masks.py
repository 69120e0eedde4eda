"""Every mask equals a matrix drawn by hand."""

import torch

from minispec import masks
from tests.helpers import drawn


def test_causal():
    assert torch.equal(masks.causal(4), drawn("""
        1 . . .
        1 1 . .
        1 1 1 .
        1 1 1 1
    """))


def test_cached_chain_block():
    # prefix in slots 0..2, a block of 3 (x_t, d1, d2) in slots 3..5, stale slots 6..7 hidden
    assert torch.equal(masks.cached_block(3, masks.causal(3), 8), drawn("""
        1 1 1 1 . . . .
        1 1 1 1 1 . . .
        1 1 1 1 1 1 . .
    """))


def test_cached_tree_block():
    # root 0 with two children 1 and 2; node 3 continues node 2
    tree = drawn("""
        1 . . .
        1 1 . .
        1 . 1 .
        1 . 1 1
    """)
    assert torch.equal(masks.tree([0, 0, 2]), tree)
    assert torch.equal(masks.tree([0, 1, 2, 0]), drawn("""
        1 . . . .
        1 1 . . .
        1 1 1 . .
        1 1 1 1 .
        1 . . . 1
    """))  # a chain of three and a second child of the root
    assert torch.equal(masks.cached_block(2, tree, 6), drawn("""
        1 1 1 . . .
        1 1 1 1 . .
        1 1 1 . 1 .
        1 1 1 . 1 1
    """))


def test_render():
    text = masks.render(masks.causal(3), row_labels=["a", "b", "c"], col_labels=["a", "b", "c"])
    assert text == "  a b c\na 1 . .\nb 1 1 .\nc 1 1 1"


def test_shared_prefix():
    # a prefix of 2, then 2 blocks of 2 that each see the prefix and themselves, never each other
    assert torch.equal(masks.shared_prefix(2, 2, 2), drawn("""
        1 . . . . .
        1 1 . . . .
        1 1 1 . . .
        1 1 1 1 . .
        1 1 . . 1 .
        1 1 . . 1 1
    """))
