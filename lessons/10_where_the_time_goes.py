"""Lesson 10: where the time goes (what a speculative step can buy on this machine)

A cached forward of the target over T tokens costs t(T): a part paid once per forward whatever
T is (Python and the module calls, reading every weight from memory, and launching kernels on a
GPU), and a part that grows with T (each token's own arithmetic). Autoregressive decoding pays
t(1) for every token; a speculative step pays t(k + 1) for its whole block, plus its drafts. So
against autoregressive decoding a step saves the fixed part for every token it gets beyond the
first, and wastes the growing part on every draft that is not accepted, besides the drafts' own
cost: the same drafter speeds up more where the fixed part is large next to a token's
arithmetic, and less where that arithmetic is dear. This lesson measures t(T) here, predicts
from it the speedup of a drafter that is right with probability alpha, and checks the
prediction on the draft model.

Source: Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding"
(ICML 2023), section 3: a step's expected tokens, (1 - alpha^(k+1)) / (1 - alpha) (their gamma
is k), and the walltime improvement that follows. Their formula assumes that verifying the block
costs what one token's forward does, t(k + 1) = t(1), and counts a draft's cost c in t(1)s;
this lesson keeps their expected tokens but uses the measured t(k + 1), and c in ms.
Files: minispec/speculative.py (step: one forward verifies the block), minispec/bench.py
(side_by_side), minispec/drafters/draft_model.py, lessons/common.py (forward_ms, the timer).
"""

import numpy as np
import torch
import torch.nn.functional as F

from common import forward_ms, lesson, prompts, run, section, show_mask
from minispec import bench, make_drafter, masks
from minispec.cudagraph import seconds_per_call
from minispec.kvcache import KVCache

K = 4
K_MAX = 8  # the deepest draft predicted: forwards of 1 to K_MAX + 1 tokens are timed
ALPHAS = (0.5, 0.7, 0.8, 0.9, 0.95)
NEW_TOKENS = 48
ROUNDS = 3  # timing rounds, interleaved over the block sizes: a slow moment hits every size alike


def expected_tokens(alpha, k):
    """A step's expected new tokens when each draft is right with probability alpha, independently:
    1 + alpha + ... + alpha^k (the leading run of right drafts, then the target's own token)."""
    return sum(alpha ** i for i in range(k + 1))


def main():
    model, tok, ckpt = lesson(__doc__)

    section(f"the block a step verifies: x_t and k = {K} drafts, behind the cached prefix")
    t = 3
    show_mask(masks.cached_block(t, masks.causal(K + 1), t + K + 1), ["x_t"] + [f"d{i}" for i in range(1, K + 1)],
              [f"p{i}" for i in range(t)] + ["x_t"] + [f"d{i}" for i in range(1, K + 1)])
    print("One forward computes all k + 1 rows; each row costs its own arithmetic, the forward's fixed part once.")

    section("t(T): a cached forward of the target over T tokens")
    cache = KVCache.for_model(model)
    ms = dict.fromkeys(range(1, K_MAX + 2), float("inf"))  # T -> the fastest round's ms
    for _ in range(ROUNDS):
        for T in ms:
            ms[T] = min(ms[T], forward_ms(model, cache, T, reps=35))
    print("   T      ms   x t(1)   t(T) - t(T-1)")
    for T, m in ms.items():
        print(f"{T:>4} {m:7.3f} {m / ms[1]:8.2f}" + (f" {m - ms[T - 1]:12.3f} ms" if T > 1 else ""))
    later = (ms[K_MAX + 1] - ms[2]) / (K_MAX - 1)
    print(f"a block of k + 1 = {K + 1} tokens costs {ms[K + 1] / ms[1]:.2f} one-token forwards, where autoregressive "
          f"decoding pays {K + 1} for {K + 1} tokens.\nThe second token costs {ms[2] - ms[1]:.3f} ms, each later one "
          f"{later:.3f} ms on average (a straight line would make the two equal).")
    head = model.lm_head.weight  # (V, C): the largest matrix of every forward
    us = {n: seconds_per_call(lambda x=torch.randn(1, n, head.size(1)): F.linear(x, head), 200, ROUNDS) * 1e6
          for n in (1, 2, 3, 4, 8)}
    print("One matrix product, the LM head's, over 1, 2, 3, 4 and 8 rows: "
          + ", ".join(f"{u:.0f}" for u in us.values()) + " µs. Compare the steps between them: what\nanother row "
          "costs depends on how the matrix library splits a small product on this CPU; it is measured, not a law.")

    section("one draft of the draft model (a one-layer GPT with a cache of its own)")
    drafter = make_drafter("draft_model", model, ckpt=ckpt, k=K)
    draft_ms = forward_ms(drafter.draft, KVCache.for_model(drafter.draft), 1)
    print(f"c = {draft_ms:.3f} ms a draft: {draft_ms / ms[1]:.2f} of a one-token target forward. It pays a fixed "
          f"part too:\none layer, but an embedding and an LM head as large as the target's, and the same calls.")

    section("predicted speedup: E[tokens] x t(1) / (t(k + 1) + k c)")
    print("alpha " + "".join(f"{f'k={k}':>7}" for k in range(1, K_MAX + 1)) + " best k")
    for alpha in ALPHAS:
        speedups = [expected_tokens(alpha, k) * ms[1] / (ms[k + 1] + k * draft_ms) for k in range(1, K_MAX + 1)]
        best = int(np.argmax(speedups)) + 1
        print(f"{alpha:5.2f} " + "".join(f"{s:7.2f}" for s in speedups) + f" {best:>6}")
    print(f"The more often drafts are right, the deeper the best k; the more each extra row or each draft costs, "
          f"the shallower.\n(k = {K_MAX} is the table's edge: there it means {K_MAX} or deeper.)")

    section(f"checked on the draft model: greedy, k = {K}, 4 held-out prompts x {NEW_TOKENS} tokens")
    rows, spread = bench.side_by_side(model, prompts(ckpt, tok, 4), {"ar": None, "draft_model": drafter}, NEW_TOKENS,
                                      K, eot=tok.eot_token, progress=False)
    ar, row = rows  # side_by_side keeps the order of the drafters given
    predicted = row["tau"] * ms[1] / (ms[K + 1] + K * draft_ms)
    print(f"measured tau {row['tau']:.2f}, acceptance at 1..{K} {' '.join(f'{x:.2f}' for x in row['accept_at'])}")
    print(f"speedup: predicted {predicted:.2f}x from tau and the timings above, measured {row['speedup']:.2f}x")
    steps = row["target_forwards"]
    print(f"Inside the loop, per step: drafting {row['draft_s'] / steps * 1e3:.3f} ms (the bare k c: "
          f"{K * draft_ms:.3f}), verifying {row['verify_s'] / steps * 1e3:.3f} ms (the bare t({K + 1}): "
          f"{ms[K + 1]:.3f});\nper autoregressive token, verifying {ar['verify_s'] / ar['target_forwards'] * 1e3:.3f} "
          f"ms (the bare t(1): {ms[1]:.3f}).\nEach forward in the loop also builds its inputs and mask and writes the "
          f"cache, each draft is chosen in Python, and the\nacceptance rule runs: a step pays more of that than an "
          f"autoregressive token does, which is what the prediction leaves out.")
    if bench.unsteady(spread):
        print(bench.unsteady(spread))


if __name__ == "__main__":
    run(main)
