"""Lesson 06: Jacobi iteration and Lookahead decoding (drafting with no draft model)

The m greedy tokens after a prompt solve a system of equations, y_i = argmax p(. | x, y_<i).
Autoregressive decoding solves it one token at a time; Jacobi iteration guesses all m, runs ONE
causal forward over [x, guesses] and replaces every guess by the argmax at the position before
it, until nothing changes. The first token is right after one update, the second after at most
two: at most m updates reach exactly the greedy output. On a model trained left to right a guess
rarely becomes right before the one ahead of it is, so plain Jacobi gains little. Lookahead
decoding keeps the whole Jacobi trajectory in a 2-D window, harvests the n-grams along it into a
pool, and verifies pool n-grams that start with the current token in the same forward: no
training, no second model, and n-grams that do pay off. Consistency training (CLLM) takes the
other road: it fine-tunes the target itself to jump from any Jacobi state to the fixed point.

Papers: Santilli et al., "Accelerating Transformer Inference for Translation via Parallel
Decoding" (ACL 2023); Fu, Bailis, Stoica & Zhang, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding" (ICML 2024); Kou, Hu, He, Deng & Zhang, "CLLMs: Consistency
Large Language Models" (ICML 2024).
Files: minispec/drafters/jacobi.py (jacobi_solve, the Jacobi drafter, Lookahead and its pool),
minispec/drafters/consistency.py (trajectories, the consistency loss, the tuning).
Run it with --ckpt out/tiny-cllm (python train_tiny.py --consistency --out out/tiny-cllm) to see
one trajectory before and after consistency tuning.
"""

import torch

from common import decode_prompts, lesson, prompts, run, section, show_mask
from minispec import checkpoint, generate, make_drafter, masks
from minispec.drafters.consistency import (FAST_FORWARDED, STATIONARY, jacobi_counts, jacobi_trajectories,
                                           load_plain_target)
from minispec.drafters.jacobi import jacobi_solve

M = 12  # tokens solved by Jacobi iteration
N = 16  # tokens per block in the consistency-training section, as in CLLM


def main():
    model, tok, ckpt = lesson(__doc__)
    test_prompts = prompts(ckpt, tok, 2)

    section(f"Jacobi iteration: solve {M} greedy tokens at once")
    prompt = test_prompts[1]
    n = len(prompt)
    greedy = generate(model, prompt, M).tokens
    print(f"One causal forward over the prompt and the {M} guesses per update (the mask: causal, as in lesson 02).")
    print("Start: every guess is the prompt's last token. '#' = equal to the greedy token there:")
    guess = torch.tensor([prompt[-1]] * M)
    for update in range(M + 1):
        right = "".join("#" if g == y else "." for g, y in zip(guess.tolist(), greedy))
        print(f"  after {update:>2} updates: {right}")
        logits, _ = model(torch.tensor([prompt + guess.tolist()]), torch.arange(n + M), masks.causal(n + M))
        new = logits[0, n - 1:-1].argmax(-1)  # the Jacobi update: each position's prediction from the one before
        if torch.equal(new, guess):
            break
        guess = new
    tokens, iterations = jacobi_solve(model, prompt, M, init=[prompt[-1]] * M)
    print(f"measured: the fixed point equals greedy decoding: {guess.tolist() == greedy == tokens}, after "
          f"{iterations} updates for {M} tokens (autoregressive decoding needs {M} forwards too)")

    section(f"Consistency training (CLLM): one {N}-token Jacobi trajectory before and after tuning")
    plain = load_plain_target(ckpt)
    print("The block starts from tokens drawn from the prompt, as CLLM's trajectories do. '#' = right and every "
          "token before it right,\n'+' = right although a token before it is still wrong, '.' = wrong:")
    targets = ({"this target (not consistency-tuned)": model} if plain is None else
               {"target before tuning": plain, "consistency-tuned target": model})
    for name, m in targets.items():
        show_trajectory(name, m, tok, prompt)
    tuning = checkpoint.target_meta(ckpt)["train"].get("consistency")  # what train_tiny.py measured
    if plain is not None and tuning:
        before, after = tuning["before"], tuning["after"]
        print(f"measured by train_tiny.py --consistency on {before['blocks']} held-out blocks, before -> after "
              f"tuning, per block: " + ", ".join(f"{key.replace('_', '-')} {before[key]:.2f} -> {after[key]:.2f}"
                                                for key in ("iterations", "fast_forwarded", "stationary", "distinct"))
              + " (distinct: distinct tokens in the greedy block)")
    if plain is None:
        print("no target_plain.pt in this checkpoint: `python train_tiny.py --consistency --out out/tiny-cllm` "
              "tunes one, and --ckpt out/tiny-cllm shows it before and after")

    section("Lookahead's block: a Jacobi window (W=2 columns, N-1=4 levels) and G=2 n-grams (k = 4)")
    names = ["x_t", "a1"] + [f"{lvl}{c}" for lvl in "bcd" for c in range(2)] + [f"n{i}" for i in range(1, 5)]
    names += [f"m{i}" for i in range(1, 5)]
    show_mask(masks.lookahead(W=2, N=5, G=2), names, [name[0] for name in names])
    print("a..d: the window, oldest level first; n, m: two pool n-grams starting with x_t, verified as candidates.")

    section("jacobi vs lookahead, k = 4, 2 held-out prompts x 48 tokens")
    print(f"{'method':<10} {'tau':>5} {'alpha':>5}  identical  acceptance at 1..k")
    for method in ("jacobi", "lookahead"):
        drafter = make_drafter(method, model, ckpt=ckpt, k=4)
        total, same = decode_prompts(model, drafter, test_prompts)
        print(f"{method:<10} {total.tau:>5.2f} {total.alpha:>5.2f}  {str(same):>9}  "
              + " ".join(f"{a:.2f}" for a in total.accept_at))
    print(f"after the last prompt the lookahead pool holds {sum(len(v) for v in drafter.pool.values())} n-grams "
          f"for {len(drafter.pool)} first tokens")


def show_trajectory(name, model, tok, prompt):
    """Print the Jacobi trajectory of N tokens after prompt with this model, and how its tokens converged."""
    states = jacobi_trajectories(model, torch.tensor([prompt]), N).states[0][:, 0]  # (J + 1, N)
    fixed = states[-1]
    print(f"{name}:")
    for j, state in enumerate(states.tolist()):
        right = [a == b for a, b in zip(state, fixed.tolist())]
        converged = (right + [False]).index(False)
        print(f"  state {j:>2}: " + "".join("#" if i < converged else "+" if r else "." for i, r in enumerate(right)))
    iterations, how = jacobi_counts(states[:, None])
    fast, kept = (how[0] == FAST_FORWARDED).tolist(), (how[0] == STATIONARY).tolist()
    print(f"  {name}: {int(iterations[0])} iterations to the fixed point of {N} tokens; fast-forwarded "
          f"{sum(fast)} ({texts(tok, fixed, fast)}), stationary {sum(kept)} ({texts(tok, fixed, kept)})")


def texts(tok, tokens, chosen):
    """The chosen tokens' text, quoted, or "none"."""
    return " ".join(repr(tok.decode([t])) for t, c in zip(tokens.tolist(), chosen) if c) or "none"


if __name__ == "__main__":
    run(main)
