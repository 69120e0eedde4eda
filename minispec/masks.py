"""Every attention mask minispec uses, as pure functions, and a renderer that prints them.

A mask is a boolean tensor [T_query, S_keys]: True means "this query may attend to this key".
GPT.forward never assumes causality, so the mask alone decides what a token sees, and a test or
a lesson can print it and compare it with a matrix drawn by hand.

With a static KV cache a block of T new tokens sits at cache slots start..start+T-1 behind a
prefix in slots 0..start-1. `cached_block` turns the block's own T x T mask into the full
[T, S] mask over the cache: every query sees the whole prefix, the block mask decides which new
tokens see which, and slots past the block (stale entries of rejected drafts) are hidden.
"""

import torch


def causal(T, device=None):
    """Token i sees tokens 0..i: the lower triangle. (T, T)"""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def cached_block(start, block, width, device=None):
    """Mask of a block at cache slots start..start+T-1 behind a prefix in slots 0..start-1.

    block: (T, T) bool, which new tokens see which. width: S, the number of cache slots the
    forward reads (at least start + T). Returns (T, S).
    """
    T = block.size(0)
    assert start + T <= width, f"block of {T} at slot {start} does not fit in {width} slots"
    mask = torch.zeros(T, width, dtype=torch.bool, device=device)
    mask[:, :start] = True
    mask[:, start:start + T] = block
    return mask


def widen(mask, width):
    """mask (T, S) -> (T, width): the same mask over more cache slots, the extra ones hidden.
    A CUDA graph reads the cache over its full width, whatever the step (cudagraph.py)."""
    return torch.cat([mask, mask.new_zeros(mask.size(0), width - mask.size(1))], dim=1)


def render(mask, row_labels=None, col_labels=None, on="1", off="."):
    """The mask as a labelled grid of characters, one row per query, one column per key."""
    T, S = mask.shape
    rows = [str(r) for r in (row_labels if row_labels is not None else range(T))]
    cols = [str(c) for c in (col_labels if col_labels is not None else range(S))]
    row_w = max(len(r) for r in rows)
    col_w = max(len(c) for c in cols)
    lines = [" " * row_w + " " + " ".join(c.rjust(col_w) for c in cols)]
    for label, row in zip(rows, mask.tolist()):
        lines.append(label.rjust(row_w) + " " + " ".join((on if m else off).rjust(col_w) for m in row))
    return "\n".join(lines)


def tree(parents, device=None):
    """A draft tree's block (Medusa, SpecInfer): the root x_t, then node i = 1..n whose parent is
    block index parents[i-1] (0 is the root; parents come before their children). Each node sees
    the root, its ancestors and itself, so every root-to-leaf path is a causal chain while siblings
    never see each other. Returns (n + 1, n + 1); for parents [0, 0, 2] (the root's children 1
    and 2, and node 3 under node 2):

         x 1 2 3
     x   1 . . .
     1   1 1 . .
     2   1 . 1 .
     3   1 . 1 1
    """
    mask = torch.eye(len(parents) + 1, dtype=torch.bool, device=device)
    mask[:, 0] = True
    for node, parent in enumerate(parents, start=1):
        assert parent < node, "a parent must come before its children"
        mask[node] |= mask[parent]  # the parent's row holds the root and every ancestor
    return mask


def lookahead(W, N, G, device=None):
    """Lookahead decoding's block (Fu et al. 2024): x_t, a 2-D Jacobi window, then G n-grams.

    The window has N-1 levels of W columns, stored level by level; x_t itself is level 0,
    column 0. The token at level l, column c sits at position t + c + l and sees the level-0
    tokens of columns 0..c and its own column at levels 1..l: exactly one token for each
    position before its own. Then G candidate n-grams of N-1 tokens each (positions t+1..t+N-1)
    each see x_t and their own earlier tokens. The window and the n-grams never see each other.
    Returns ((N-1) * (W + G), (N-1) * (W + G)); for W=5, N=4, G=2 it is the 21 x 21 mask of the
    LookaheadDecoding README, drawn in drafters/jacobi.py and in tests/helpers.py.
    """
    levels = N - 1
    window = levels * W
    T = window + G * levels
    mask = torch.zeros(T, T, dtype=torch.bool, device=device)
    for level in range(levels):
        rows = slice(level * W, (level + 1) * W)
        mask[rows, :W] = causal(W, device)  # level 0, columns <= c
        for lower in range(1, level + 1):  # the same column at levels 1..level (itself included)
            mask[rows, lower * W:(lower + 1) * W].fill_diagonal_(True)
    for g in range(G):
        ngram = slice(window + g * levels, window + (g + 1) * levels)
        mask[ngram, 0] = True  # x_t
        mask[ngram, ngram] = causal(levels, device)
    return mask


def mask_token_block(n, k, device=None):
    """SpecDec's [M]-token drafter (Xia et al. 2023) as a decoder: n prefix tokens, then k [M]s.

    Prefix rows are causal and never see an [M], so their keys and values are exactly what a
    plain prefill gives and can stay in a cache; every [M] row sees the whole prefix and all k
    [M]s ("distinct attention": each [M] is its own query). Returns (n + k, n + k); for n=3, k=3:

         p1 p2 p3 M1 M2 M3
     p1   1  .  .  .  .  .
     p2   1  1  .  .  .  .
     p3   1  1  1  .  .  .
     M1   1  1  1  1  1  1
     M2   1  1  1  1  1  1
     M3   1  1  1  1  1  1
    """
    mask = torch.zeros(n + k, n + k, dtype=torch.bool, device=device)
    mask[:n, :n] = causal(n, device)
    mask[n:] = True
    return mask


def mask_token_training(T, cuts, k, device=None):
    """Many [M]-token drafting steps on one sequence, for training in one forward.

    T tokens, causal; then for each cut r in `cuts` a group of k [M]s that sees tokens 0..r-1
    and its own group, nothing else. Each group sees exactly what mask_token_block(r, k) shows
    it, and the prefix rows never see any [M], so len(cuts) drafting steps share one prefix
    computation. Returns (T + len(cuts) * k, T + len(cuts) * k); for T=3, cuts=[1, 2], k=2:

         x0 x1 x2 M1 M2 M1 M2
     x0   1  .  .  .  .  .  .
     x1   1  1  .  .  .  .  .
     x2   1  1  1  .  .  .  .
     M1   1  .  .  1  1  .  .
     M2   1  .  .  1  1  .  .
     M1   1  1  .  .  .  1  1
     M2   1  1  .  .  .  1  1
    """
    n = T + len(cuts) * k
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:T, :T] = causal(T, device)
    for j, r in enumerate(cuts):
        group = slice(T + j * k, T + (j + 1) * k)
        mask[group, :r] = True
        mask[group, group] = True
    return mask


def shared_prefix(T, n, branches, device=None):
    """Several n-token blocks that continue the same T-token prefix, in one forward (consistency
    training: a Jacobi trajectory's fixed point and some of its states, drafters/consistency.py).

    The prefix is causal; each block sees the whole prefix and is causal within itself, and the
    blocks never see each other, so each one gets exactly the logits a causal forward over
    prefix + that block gives, and the prefix is computed once. Returns (T + branches * n) square;
    for T=2, n=2, branches=2:

         x0 x1 a1 a2 b1 b2
     x0   1  .  .  .  .  .
     x1   1  1  .  .  .  .
     a1   1  1  1  .  .  .
     a2   1  1  1  1  .  .
     b1   1  1  .  .  1  .
     b2   1  1  .  .  1  1
    """
    size = T + branches * n
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[:T, :T] = causal(T, device)
    for b in range(branches):
        block = slice(T + b * n, T + (b + 1) * n)
        mask[block, :T] = True
        mask[block, block] = causal(n, device)
    return mask
