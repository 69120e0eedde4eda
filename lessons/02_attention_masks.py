"""Lesson 02: attention masks, every one minispec uses

In minispec the mask is data: GPT.forward never assumes causality, every caller passes a boolean
[T_query, S_keys] mask (True = may attend), and minispec/masks.py builds each one as a pure
function. Every speculative method is "one target forward over a block of tokens" and differs
only in the block and its mask: a chain of drafts, a tree of candidates, [M] placeholders, a
Jacobi window with n-grams. Here each mask is drawn, and one measured fact about each is checked
on the real model: a tree verifies several chains at once, the [M] tokens never disturb the
cached prefix, one training forward equals many drafting steps, and every Lookahead row sees
exactly one token per earlier position.

Papers: gpt-fast's static cache; SpecInfer (Miao et al. 2024) and Medusa (Cai et al. 2024) for
trees; SpecDec (Xia et al. 2023) for [M]; Lookahead decoding (Fu et al. 2024).
File: minispec/masks.py (tests/test_masks.py compares each mask with one drawn by hand).
"""

import torch

from common import lesson, prompts, run, section, show_mask
from minispec import masks
from minispec.kvcache import KVCache
from minispec.speculative import prefill


def forward(model, cache, tokens, pos, block, start):
    """A block of tokens at cache slots start.. behind a cached prefix, under its own block mask."""
    slots = torch.arange(start, start + len(tokens))
    mask = masks.cached_block(start, block, start + len(tokens))
    return model(torch.tensor([tokens]), torch.tensor(pos), mask, cache, slots)[0][0]  # (T, V)


def main():
    model, tok, ckpt = lesson(__doc__)
    prompt = prompts(ckpt, tok, 1)[0]
    n = len(prompt) - 1  # the prefix in the cache; x_t = prompt[-1] is fed with each block
    cache = KVCache.for_model(model)
    prefill(model, cache, prompt[:-1])
    x_t = prompt[-1]

    section("1. causal: token i sees tokens 0..i (training, prefill, and Jacobi's forward)")
    show_mask(masks.causal(4))

    section("2. a cached chain block: verifying k drafts in one forward")
    print("x_t and drafts d1, d2 at slots 3..5 behind a prefix in slots 0..2; slots 6..7 hold stale entries")
    print("of rejected drafts, hidden (this is why rollback is free):")
    show_mask(masks.cached_block(3, masks.causal(3), 8), ["x_t", "d1", "d2"],
              ["p0", "p1", "p2", "x_t", "d1", "d2", "old", "old"])

    section("3. a tree (draft) mask: several candidate continuations in one block")
    print("x_t with two candidate next tokens a and b, and c after b. Each node sees the prefix, x_t and")
    print("its ancestors only; a and b share position t+1, so slot and position differ here:")
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    show_mask(tree, ["x_t", "a", "b", "c"])
    a, b, c = (int(t) for t in torch.randint(model.config.vocab_size, (3,)))
    tree_logits = forward(model, cache, [x_t, a, b, c], [n, n + 1, n + 1, n + 2], tree, n)
    chain_a = forward(model, cache, [x_t, a], [n, n + 1], masks.causal(2), n)
    chain_bc = forward(model, cache, [x_t, b, c], [n, n + 1, n + 2], masks.causal(3), n)
    diff = max(float((tree_logits[[0, 1]] - chain_a).abs().max()),
               float((tree_logits[[0, 2, 3]] - chain_bc).abs().max()))
    print(f"measured: the tree's logits equal those of the chains [x_t a] and [x_t b c] run separately: "
          f"max |difference| = {diff:.2e}")

    section("4. the [M] block (SpecDec drafter, decoder form): prefix causal, every [M] sees everything")
    show_mask(masks.mask_token_block(3, 3), ["p1", "p2", "p3", "M1", "M2", "M3"])
    block = prompt[-4:]  # 4 prefix tokens, then 3 placeholders (any token id stands in for [M] here)
    T = len(block) + 3
    with_m = model(torch.tensor([block + [0, 0, 0]]), torch.arange(T), masks.mask_token_block(len(block), 3))[0][0]
    plain = model(torch.tensor([block]), torch.arange(len(block)), masks.causal(len(block)))[0][0]
    print(f"measured: the prefix rows' logits with the [M]s present equal a plain causal forward's: "
          f"max |difference| = {float((with_m[:len(block)] - plain).abs().max()):.2e}")
    print("so the prefix's cache entries stay valid and only the [M] entries are thrown away.")

    section("5. the [M] training mask: many drafting steps on one sequence in one forward")
    print("5 tokens, then a group of 2 [M]s cut after x1 and another cut after x3; each group sees its own")
    print("prefix and itself, exactly what the [M] block of lesson 05 would show it:")
    cuts, k = [2, 4], 2
    show_mask(masks.mask_token_training(5, cuts, k), ["x0", "x1", "x2", "x3", "x4", "M1", "M2", "M1", "M2"])
    x = prompt[-5:]
    pos = list(range(5)) + [r + i for r in cuts for i in range(k)]  # [M]_i of the cut at r sits at r + i
    train_logits = model(torch.tensor([x + [0] * (len(cuts) * k)]), torch.tensor(pos),
                         masks.mask_token_training(5, cuts, k))[0][0]
    diff = 0.0
    for j, r in enumerate(cuts):
        alone = model(torch.tensor([x[:r] + [0] * k]), torch.arange(r + k), masks.mask_token_block(r, k))[0][0]
        diff = max(diff, float((train_logits[5 + j * k:5 + (j + 1) * k] - alone[r:]).abs().max()))
    print(f"measured: each group's logits equal a separate [M]-block forward at its cut: max |difference| = {diff:.2e}")

    section("6. Lookahead: a 2-D Jacobi window and G n-grams in one block (W=5, N=4, G=2)")
    W, N, G = 5, 4, 2
    la = masks.lookahead(W, N, G)
    names = ["x_t"] + [f"a{c}" for c in range(1, W)] + [f"b{c}" for c in range(W)] + [f"c{c}" for c in range(W)]
    names += [f"n{i}" for i in range(1, N)] + [f"m{i}" for i in range(1, N)]
    show_mask(la, names, [name[0] for name in names])
    depth = (torch.arange(N - 1)[:, None] + torch.arange(W)).flatten().tolist()  # level + column
    depth += list(range(1, N)) * G
    one_each = all(sorted(depth[j] for j in row.nonzero().flatten().tolist()) == list(range(depth[i] + 1))
                   for i, row in enumerate(la))
    print(f"measured: every row sees exactly one token at each position t..its own: {one_each}")
    print(f"this {la.size(0)} x {la.size(1)} mask is the LookaheadDecoding README figure; {int(la.sum())} of "
          f"{la.numel()} entries may attend ({la.float().mean():.0%}).")


if __name__ == "__main__":
    run(main)
