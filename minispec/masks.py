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
