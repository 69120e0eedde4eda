"""Lesson 05: the [M]-token drafter ("distinct attention")

A separate, shallow drafter reads the accepted prefix followed by k placeholder tokens [M] at
positions t+1..t+k, and its output at [M]_i is the guess for the token i places ahead. Unlike
blockwise heads (lesson 04), where every guess reads the one hidden state h_t, each [M] is its
own query in every layer, with its own attention over the prefix and the other [M]s: "distinct
attention". All k drafts come out of ONE drafter forward, where a classic draft model needs k.
minispec's drafter is a decoder with a KV cache: the prefix rows are causal and never see an
[M], so their cache entries stay valid, and the [M] entries are simply never kept.

Paper: Xia, Ge, Wang, Chen, Wei & Sui, "Speculative Decoding: Exploiting Speculative Execution
for Accelerating Seq2seq Generation" (SpecDec, Findings of EMNLP 2023).
Files: minispec/drafters/mask_drafter.py (the drafter and its masks), mask_training.py (its training, with glancing).
"""

import torch

from common import decode_prompts, label, lesson, prompts, run, section, show_mask, val_tokens
from minispec import generate, make_drafter, masks
from minispec.drafters.mask_training import mask_overlap, right_at_cuts
from minispec.train import SAMPLE_T

K = 4


def main():
    model, tok, ckpt = lesson(__doc__)
    test_prompts = prompts(ckpt, tok, 2)

    section(f"the drafter's block: the tokens accepted since the last step, then {K} [M]s")
    new = test_prompts[0][-3:]
    t = len(test_prompts[0]) - 3  # the drafter's cache already holds the tokens before these
    block = masks.mask_token_block(len(new), K)
    print(f"Each step feeds the new accepted tokens and the [M]s in one forward behind its cached prefix "
          f"(slots 0..{t - 1}, the last one drawn):")
    names = label(tok, new) + [f"[M]{i}" for i in range(1, K + 1)]
    mask = masks.cached_block(t, block, t + len(new) + K)
    show_mask(mask[:, t - 1:], names, [f"s{t - 1}"] + names)
    print("During training one forward holds many such groups, each cut at its own place (lesson 02, mask 5).")

    section(f"one decoding, step by step (k = {K})")
    drafter = make_drafter("mask", model, ckpt=ckpt, k=K)
    res = generate(model, test_prompts[1], 32, drafter)
    for i, (emitted, accepted, depth) in enumerate(res.steps[:5]):
        print(f"step {i + 1}: drafted {depth}, accepted {accepted} {label(tok, emitted[:accepted])} "
              f"+ target's token {label(tok, emitted[accepted:])}")

    section(f"distinct vs shared attention vs a draft model, k = {K}, 2 held-out prompts x 48 tokens")
    print(f"{'method':<12} {'drafter forwards/step':>21} {'draft ms/step':>13} {'tau':>5} {'alpha':>5}  "
          f"identical  acceptance at 1..k")
    for method, forwards in (("mask", "1"), ("blockwise", "0 (heads only)"), ("draft_model", f"{K}")):
        drafter = make_drafter(method, model, ckpt=ckpt, k=K)
        total, same = decode_prompts(model, drafter, test_prompts)
        print(f"{method:<12} {forwards:>21} {total.draft_s * 1e3 / total.target_forwards:>13.2f} {total.tau:>5.2f} "
              f"{total.alpha:>5.2f}  {str(same):>9}  " + " ".join(f"{a:.2f}" for a in total.accept_at))
    print("One shallow forward for k guesses is cheap; what decides is how often guesses that never saw")
    print("each other's tokens are right: compare the acceptance at 1..k. SpecDec trains the drafter on the")
    print("target's own outputs and also relaxes verification (decode.py --beta), which is LOSSY.")

    section("where the [M]s are right: at every cut of the benchmark's greedy text (8 prompts x 128 tokens)")
    print("Each row: one of decode.py's prompts, how often [M]_1..[M]_4 are right at EVERY cut of the")
    print("target's greedy continuation of it (not only where a step starts), and how the text ends.")
    drafter = make_drafter("mask", model, ckpt=ckpt, k=K).drafter
    every = []
    for p in prompts(ckpt, tok, 8):
        seq = p + generate(model, p, 128).tokens
        right = right_at_cuts(drafter, model, torch.tensor([seq]), len(p), K).float()  # (cuts, K)
        every.append(right)
        print(" ".join(f"{a:.2f}" for a in right.mean(0).tolist()) + f"   ...{tok.decode(seq[-12:])!r}")
    print(" ".join(f"{a:.2f}" for a in torch.cat(every).mean(0).tolist()) + "   all prompts")
    print("Compare the rows: the misses sit in a few of the loops the target falls into, not spread evenly.")
    print("[M]_2 drafts x_{t+2} without seeing x_{t+1}: it cannot chain next-token guesses as a draft model")
    print("does, so it is right only on the two-step patterns its training labels held.")

    section(f"sampling (T = {SAMPLE_T}): a sampled draft is accepted with probability 1 - TV(p, q)")
    val = val_tokens(ckpt)
    sets = make_drafter("mask", model, ckpt=ckpt, k=K)
    for name, net in (("greedy set", sets.drafter), ("sampling set", sets.sampling_drafter)):
        one_minus_tv = mask_overlap(net, model, val, n_seqs=4, k=K)
        print(f"{name:>12}: 1 - TV(p, q) per [M] on held-out sampled text: "
              + " ".join(f"{o:.2f}" for o in one_minus_tv))
    print("The greedy set's q is a spike on the greedy token; the sampling set learned the target's whole")
    print("distributions on sampled text, so decoding samples its drafts from it. [M]_2.. cannot know the")
    print("tokens drafted before them: lesson 04 measures the ceiling that puts on them.")


if __name__ == "__main__":
    run(main)
