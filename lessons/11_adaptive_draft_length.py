"""Lesson 11: the draft length, chosen as decoding goes (`--k auto`)

A fixed k is a guess made before decoding: too short, and a drafter that is right leaves tokens
on the table; too long, and every step pays for drafts that are rejected. `Adaptive` wraps any
drafter and, before each step, picks the depth k (0 is a plain autoregressive step) with the
most expected tokens per second, E[tokens | k] / seconds(k), both measured on the steps so far:
the acceptance at each depth (kept apart after a fully accepted step, "hot", and after the
others, "cold") and the wall time of steps at each depth. It never reads the current step's
target outputs before choosing, so every step stays an exact speculative step. This lesson runs
the draft model under it, greedily and at T = 0.8, and prints what it learned; then a drafter
that is never right.

Sources: Leviathan, Kalman & Matias (ICML 2023), section 3, for a step's expected tokens, here
1 + a_1 + a_1 a_2 + ... with a_i measured per depth. SpecDec++ (Huang et al. 2024) and DISCO
(Mamou et al. 2024) choose the draft length with a trained predictor instead; here nothing is
trained, it is all counted and timed. Files: minispec/adaptive.py (the rules, in its docstring),
minispec/drafters/__init__.py (AUTO_K_MAX, AUTO_K_SWEEP).
"""

import math

from common import lesson, prompts, run, section, show_mask
from minispec import AUTO_K_MAX, generate, make_drafter, masks

NEW_TOKENS = 64


def decode(model, drafter, test_prompts, temperature):
    """Decode every prompt -> (the new tokens of each, steps, steps that drafted nothing)."""
    outputs, steps, autoregressive = [], 0, 0
    for p in test_prompts:
        res = generate(model, p, NEW_TOKENS, drafter, temperature=temperature)
        outputs.append(res.tokens)
        steps += len(res.steps)
        autoregressive += sum(depth == 0 for _, _, depth in res.steps)
    return outputs, steps, autoregressive


def show_estimates(auto):
    """What `auto` has measured, per depth: the tokens it expects in each state, the seconds a step
    took, the speed that gives, and how often the depth was chosen."""
    cold, hot, seconds = auto.expected_tokens(0), auto.expected_tokens(1), auto.seconds()
    best = auto.best(auto.hot)
    print(f"{'k':>3} {'E cold':>7} {'E hot':>7} {'ms/step':>8} {'tokens/ms':>10} {'chosen':>7}")
    for k in range(auto.k + 1):
        timed = not math.isinf(seconds[k])
        speed = (hot if auto.hot else cold)[k] / (seconds[k] * 1e3) if timed else 0.0
        ms = f"{seconds[k] * 1e3:8.3f}" if timed else f"{'never':>8}"
        mark = "  <- the choice now" if k == best else ""
        print(f"{k:>3} {cold[k]:7.2f} {hot[k]:7.2f} {ms} {speed:10.3f} {auto.chosen[k]:7}{mark}")


def main():
    model, tok, ckpt = lesson(__doc__)
    test_prompts = prompts(ckpt, tok, 4)

    section("what a step drafting k deep verifies")
    print("Depth 0 verifies x_t alone (an autoregressive step); depth 3 the chain [x_t, d1, d2, d3], causally:")
    show_mask(masks.causal(4), ["x_t", "d1", "d2", "d3"])
    print(f"`auto` may choose any depth from 0 to {AUTO_K_MAX} for each step: the block grows or shrinks with it.")

    for temperature in (0.0, 0.8):
        section(f"the draft model under `auto`, {'greedy' if temperature == 0 else f'T = {temperature}'}, "
                f"{len(test_prompts)} prompts x {NEW_TOKENS} tokens")
        auto = make_drafter("draft_model", model, ckpt=ckpt, k="auto")
        outputs, steps, _ = decode(model, auto, test_prompts, temperature)
        if temperature == 0:
            plain = [generate(model, p, NEW_TOKENS).tokens for p in test_prompts]
            print(f"tokens identical to plain greedy decoding: {outputs == plain}")
        print(f"{steps} steps. E = expected new tokens of a step drafting k deep, from the acceptance measured\n"
              f"at each depth; ms/step = the mean time of the steps timed at k ('never': a depth past the\n"
              f"first {auto.sweep} that the run never found worth timing); the choice is the most tokens/ms\n"
              f"in the current state ({'hot' if auto.hot else 'cold'}):")
        show_estimates(auto)
    print("\nGreedy, the draft model is right for long stretches and the deep depths pay. At T = 0.8 each\n"
          "draft is accepted less often, so E grows more slowly with k while the cost grows as before. The\n"
          "timings are this machine's, now: run the lesson again and the choice may move by a depth or two.")

    section("a drafter that is never right")
    auto = make_drafter("draft_model", model, k="auto", untrained=True)  # random weights
    _, steps, autoregressive = decode(model, auto, test_prompts, 0.0)
    print(f"never right: {autoregressive} of {steps} steps drafted nothing (the rest: the first sweep over the\n"
          f"depths and the exploring steps, which keep every depth's cost measured)")
    print(f"chosen per depth: {auto.chosen}")


if __name__ == "__main__":
    run(main)
