"""Lesson 10: where the time goes (what a speculative step can buy on this machine)

A cached forward of the target over T tokens costs t(T): a part paid once per forward whatever
T is (Python and the module calls, reading every weight from memory, and launching kernels on a
GPU), and a part that grows with T (each token's own arithmetic). Autoregressive decoding pays
t(1) for every token; a speculative step pays t(k + 1) for its whole block, plus its drafts. So
a step saves the fixed part for every token it gets beyond the first, and pays the growing part
for every drafted token, accepted or not: the same drafter speeds up more where the fixed part
is large next to a token's arithmetic, and less where that arithmetic is dear. This lesson
measures t(T) here, predicts from it the speedup of a drafter that is right with probability
alpha, and checks the prediction on the draft model.

Source: Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding"
(ICML 2023), section 3: a step's expected tokens, (1 - alpha^(k+1)) / (1 - alpha), and the
walltime improvement that follows from the cost of a draft.
Files: minispec/speculative.py (step: one forward verifies the block), minispec/cudagraph.py
(seconds_per_call, the timer).
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
    ms = {T: forward_ms(model, cache, T) for T in range(1, K_MAX + 2)}
    print("   T      ms   x t(1)   the T-th token added")
    for T, m in ms.items():
        print(f"{T:>4} {m:7.3f} {m / ms[1]:8.2f}" + (f" {m - ms[T - 1]:10.3f} ms" if T > 1 else ""))
    later = (ms[K_MAX + 1] - ms[2]) / (K_MAX - 1)
    print(f"a block of k + 1 = {K + 1} tokens costs {ms[K + 1] / ms[1]:.2f} one-token forwards, where autoregressive "
          f"decoding pays {K + 1} for {K + 1} tokens.\nThe second token costs {ms[2] - ms[1]:.3f} ms, each later one "
          f"{later:.3f} ms on average: not a straight line.")
    head = model.lm_head.weight  # (V, C): the largest matrix of every forward
    us = {n: seconds_per_call(lambda x=torch.randn(1, n, head.size(1)): F.linear(x, head), 200, 3) * 1e6
          for n in (1, 2, 3, 4, 8)}
    print("The same holds for one matrix product, the LM head's, over 1, 2, 3, 4 and 8 rows: "
          + ", ".join(f"{t:.0f}" for t in us.values()) + " µs.\nHere each of the first rows costs about what "
          "one alone does, and later rows come nearly free: how the matrix\nlibrary splits small products on this "
          "CPU, measured, not a law.")

    section("one draft of the draft model (a one-layer GPT with a cache of its own)")
    drafter = make_drafter("draft_model", model, ckpt=ckpt, k=K)
    draft_ms = forward_ms(drafter.draft, KVCache.for_model(drafter.draft), 1)
    print(f"c = {draft_ms:.3f} ms a draft: {draft_ms / ms[1]:.2f} of a one-token target forward (it pays the fixed "
          f"part too: one layer, but the same embedding, LM head and calls)")

    section("predicted speedup: E[tokens] x t(1) / (t(k + 1) + k c)")
    print("alpha " + "".join(f"   k={k}" for k in range(1, K_MAX + 1)) + "   best k")
    for alpha in ALPHAS:
        speedups = [expected_tokens(alpha, k) * ms[1] / (ms[k + 1] + k * draft_ms) for k in range(1, K_MAX + 1)]
        best = int(np.argmax(speedups)) + 1
        print(f"{alpha:5.2f} " + "".join(f"{s:7.2f}" for s in speedups) + f" {best:>6}")
    print("Drafts right more often make deeper drafts pay; dearer tokens in the block, or dearer drafts, less.")

    section(f"checked on the draft model: greedy, k = {K}, 2 held-out prompts x {NEW_TOKENS} tokens")
    rows, _ = bench.side_by_side(model, prompts(ckpt, tok, 2), {"ar": None, "draft_model": drafter}, NEW_TOKENS, K,
                                 eot=tok.eot_token, progress=False)
    row = next(r for r in rows if r["method"] == "draft_model")
    predicted = row["tau"] * ms[1] / (ms[K + 1] + K * draft_ms)
    print(f"measured tau {row['tau']:.2f}, acceptance at 1..{K} {' '.join(f'{x:.2f}' for x in row['accept_at'])}")
    print(f"speedup: predicted {predicted:.2f}x from tau and the timings above, measured {row['speedup']:.2f}x: "
          f"the rest is what\nthe timings leave out, the loop's own work (each draft's choice and Python, the "
          f"acceptance rule,\nthe cache bookkeeping), which autoregressive decoding pays once a token and a step once "
          f"a block.")


if __name__ == "__main__":
    run(main)
