"""Lesson 04: blockwise parallel decoding heads ("shared attention")

The target's final hidden state h_t already knows something about the tokens after the next
one. Blockwise decoding trains k small heads on top of the frozen target: head i reads the SAME
h_t and guesses the token i+1 places ahead, while the model's own LM head gives the next one.
All the guesses share one attention computation, the target's, which is what sets this method
apart from the [M]-token drafter of lesson 05. The trick that makes it cheap: verifying a block
already computes the target's hidden state at every block position, so the hidden state at the
last accepted token is h for the next step, and proposing costs the heads only, never an extra
target forward. The very first step has no such state yet, so it proposes nothing.

Paper: Stern, Shazeer & Uszkoreit, "Blockwise Parallel Decoding for Deep Autoregressive
Models" (NeurIPS 2018); the head form of Medusa (Cai et al. 2024).
File: minispec/drafters/blockwise.py (the heads, their training, and how they propose).
"""

import numpy as np
import torch

from common import decode_prompts, label, lesson, prompts, run, section, show_mask, val_tokens
from minispec import generate, make_drafter, masks
from minispec.drafters.blockwise import head_overlap
from minispec.train import SAMPLE_T, continuations
from minispec.verify import best_overlap, overlap

BRANCHES = 32  # the likeliest values of token t+1 summed over


def parallel_ceiling(model, seqs, positions, temperature=SAMPLE_T):
    """How often a sampled draft of token t+2 can be accepted when it is drawn WITHOUT knowing
    token t+1 (a head further ahead, an [M] after the first). Token t+1 is x with probability
    p(x | prefix) when it is the target's own (behind a drafted d_1 it follows min(p, q_1)
    instead); a draft drawn from the same q whatever x is then passes with probability
    overlap(p(. | prefix, x), q). Averaged over x (its BRANCHES likeliest values, renormalised,
    so an estimate) and over the given positions of the sequences (N, T), for two q: the
    marginal m(y) = sum_x p(x | prefix) p(y | prefix, x), which cross-entropy training leads to,
    and the best q for acceptance (verify.best_overlap). Returns (marginal's, best's)."""
    marginal, best = [], []
    for x in seqs:
        for t in positions:
            logits = model(x[None, :t + 1], torch.arange(t + 1), masks.causal(t + 1))[0][0, -1]
            w, nxt = torch.softmax(logits / temperature, -1).topk(BRANCHES)  # (B,) the likeliest x_{t+1}
            w = w / w.sum()
            branch = torch.cat([x[:t + 1].expand(BRANCHES, -1), nxt[:, None]], 1)  # (B, t + 2)
            p = torch.softmax(model(branch, torch.arange(t + 2), masks.causal(t + 2))[0][:, -1] / temperature, -1)
            marginal.append(float((w * overlap(p, w @ p)).sum()))
            best.append(float(best_overlap(w, p)[1]))
    return sum(marginal) / len(marginal), sum(best) / len(best)


def main():
    model, tok, ckpt = lesson(__doc__)
    test_prompts = prompts(ckpt, tok, 2)

    section("shared attention: every head reads the one hidden state of the last accepted token")
    print("    h_t --> LM head --> x_(t+1)     (the target's own token, emitted by verification)")
    print("     +----> head 1  --> d_1 = x_(t+2)")
    print("     +----> head 2  --> d_2 = x_(t+3)   ...")
    print("The target verifies [x_t, d_1..d_k] with the usual chain mask; the row of the last accepted")
    print("token is the h of the next step's proposal (k = 3, after a prefix in slots 0..t-1):")
    show_mask(masks.causal(4), ["x_t", "d1", "d2", "d3"])

    section("one decoding, step by step (k = 4)")
    drafter = make_drafter("blockwise", model, ckpt=ckpt, k=4)
    res = generate(model, test_prompts[0], 32, drafter)
    for i, (emitted, accepted, depth) in enumerate(res.steps[:5]):
        print(f"step {i + 1}: drafted {depth}, accepted {accepted} {label(tok, emitted[:accepted])} "
              f"+ target's token {label(tok, emitted[accepted:])}")
    print(f"measured: {len(res.steps)} steps, {res.stats.target_forwards} target forwards, and no other model forward "
          f"(the heads took {res.stats.draft_s * 1e3:.1f} ms, verification {res.stats.verify_s * 1e3:.1f} ms)")

    section("acceptance as k grows, on 2 held-out prompts x 48 tokens")
    print(f"{'k':>2} {'tau':>5} {'alpha':>5}  identical  acceptance at 1..k")
    for k in (1, 2, 4, 6):
        drafter = make_drafter("blockwise", model, ckpt=ckpt, k=k)
        total, same = decode_prompts(model, drafter, test_prompts)
        print(f"{k:>2} {total.tau:>5.2f} {total.alpha:>5.2f}  {str(same):>9}  "
              + " ".join(f"{a:.2f}" for a in total.accept_at))
    print("A head further ahead guesses from the same h_t with less to go on: the gain flattens with k.")

    section(f"sampling (T = {SAMPLE_T}): a sampled draft is accepted with probability 1 - TV(p, q)")
    val = val_tokens(ckpt)
    drafter = make_drafter("blockwise", model, ckpt=ckpt, k=4)
    for name, heads in (("greedy set", drafter.heads), ("sampling set", drafter.sampling_heads)):
        one_minus_tv = head_overlap(heads, model, val, n_seqs=8, new_tokens=64)
        print(f"{name:>12}: 1 - TV(p, q) per head on held-out sampled text: "
              + " ".join(f"{o:.2f}" for o in one_minus_tv))
    T = model.config.block_size
    sampled = torch.as_tensor(continuations(model, val, 8, seed=7, temperature=SAMPLE_T, log=lambda line: None)
                              .astype(np.int64)).view(8, T + 1)[:, :T]
    marginal, best = parallel_ceiling(model, sampled, range(T // 4, T - 2, T // 16))
    print(f"a draft made without knowing the token before it is accepted at most about {best:.2f} of the time")
    print(f"(the best q), {marginal:.2f} with the marginal over that token (what cross-entropy training leads to;")
    print("both summed over its likeliest values). Head 1 knows x_(t+1), which verification gives it; heads")
    print("2.. do not, and neither do the [M]s after the first (lesson 05). A draft model drafts one token")
    print("after the other and knows them all: it is not bound by this.")


if __name__ == "__main__":
    run(main)
