"""Exercise step 1: attention masks as boolean matrices (lessons 01, 02, 05, 06).

A mask is a bool tensor [T_query, S_keys]: True means "this query may attend to this key".
Fill in each function; `python -m pytest -q tests/test_exercises.py -k step1` checks them against
matrices drawn by hand. The reference is minispec/masks.py: peek only when stuck.
"""

import torch


def causal(T):
    """Token i sees tokens 0..i: a (T, T) lower triangle of True."""
    raise NotImplementedError


def cached_block(start, block, width):
    """A block of T new tokens at cache slots start..start+T-1, behind a prefix in slots 0..start-1.

    block (T, T) bool says which new tokens see which. Every new token sees the whole prefix;
    slots from start+T to width-1 (stale entries of rejected drafts) are hidden. Returns (T, width).
    """
    raise NotImplementedError


def mask_token_block(n, k):
    """SpecDec's [M]-token block as a decoder: n prefix tokens, then k [M] placeholders.

    Prefix rows are causal and never see an [M]; every [M] row sees the whole prefix and all k
    [M]s. Returns (n + k, n + k).
    """
    raise NotImplementedError


def lookahead(W, N, G):
    """(Stretch) Lookahead decoding's block: x_t, a Jacobi window of N-1 levels x W columns stored
    level by level (x_t is level 0, column 0), then G n-grams of N-1 tokens each.

    The token at level l, column c sees the level-0 tokens of columns 0..c and its own column at
    levels 1..l. Each n-gram token sees x_t and the n-gram's earlier tokens and itself. The window
    and the n-grams never see each other. Returns ((N-1) * (W + G), (N-1) * (W + G)).
    """
    raise NotImplementedError
