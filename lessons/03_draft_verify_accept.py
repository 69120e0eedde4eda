"""Lesson 03: draft, verify, accept, and speculative sampling

Every method in minispec runs the same step. A cheap drafter proposes k tokens; the target runs
ONE forward over [x_t, d_1..d_k] and so gets its own next-token distribution after each of
them; the longest acceptable prefix of the drafts is kept, and the target always adds one more
token: the correction at the first rejected draft, or a bonus token after all k. A step emits 1
to k+1 tokens for one target forward, and tau (tokens per target forward) measures the gain.
Greedy decoding accepts d_i when it equals the target's argmax. Sampling uses speculative
sampling: accept d_i with probability min(1, p(d_i)/q(d_i)), and at the first rejection sample
from the residual max(0, p - q) renormalised. That keeps the output distributed exactly as the
target's own samples, whatever the drafter; the experiment below shows it.

Papers: Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding"
(ICML 2023); Chen et al., "Accelerating LLM Decoding with Speculative Sampling" (2023).
Files: minispec/speculative.py (the loop), minispec/verify.py (the rules),
minispec/drafters/draft_model.py (the small draft GPT used here).
"""

from pathlib import Path

import torch

from common import label, lesson, prompts, run, section, show_mask
from minispec import GPT, checkpoint, generate, make_drafter, masks
from minispec.verify import accept_sampled

K = 4
SAMPLES = 4000  # first tokens drawn per row of the experiment
BINS = 15  # the target's most likely tokens get a bin each; the rest share one
BUG = " + BUG: argmax draft"


def binned(counts_or_probs, top):
    """Counts or probabilities over the vocabulary -> BINS + 1 bins: the top tokens, then the rest."""
    v = counts_or_probs.double()
    v = v / v.sum()
    return torch.cat([v[top], (1 - v[top].sum()).clamp(min=0)[None]])


def tv(a, b):
    """Total variation distance between two distributions: half the L1 distance."""
    return 0.5 * float((a - b).abs().sum())


def main():
    model, tok, ckpt = lesson(__doc__)
    prompt = prompts(ckpt, tok, 1)[0]

    section(f"one step: the target verifies x_t and {K} drafts in one forward")
    t = len(prompt) - 1
    drafts = [f"d{i}" for i in range(1, K + 1)]
    mask = masks.cached_block(t, masks.causal(K + 1), t + K + 1)  # (K+1, t+K+1)
    show_mask(mask[:, t - 2:], ["x_t"] + drafts, [f"s{t - 2}", f"s{t - 1}", "x_t"] + drafts)
    print(f"(slots 0..{t - 1} hold the cached prefix and every row sees all of them; the last two are drawn)")
    print("Row i gives p_{i+1}: d_{i+1} is accepted if it is the argmax there (greedy).")

    section(f"greedy decoding with the draft model, k = {K}")
    drafter = make_drafter("draft_model", model, ckpt=ckpt, k=K)
    res = generate(model, prompt, 48, drafter)
    ar = generate(model, prompt, 48)
    for i, (emitted, accepted, depth) in enumerate(res.steps[:6]):
        extra = "bonus" if accepted == depth else "correction"
        print(f"step {i + 1}: drafted {depth}, accepted {accepted} {label(tok, emitted[:accepted])} "
              f"+ target's {extra} {label(tok, emitted[accepted:])}")
    s = res.stats
    alpha = s.alpha
    print(f"\nmeasured over 48 tokens: tau {s.tau:.2f} (ar: 1.00), alpha {alpha:.2f}, acceptance at positions 1..{K}: "
          f"{' '.join(f'{a:.2f}' for a in s.accept_at)}")
    print(f"accepted drafts per step (histogram): {dict(sorted(s.accepted_lengths.items()))}")
    if alpha < 1:
        print(f"i.i.d. estimate (1 - alpha^(k+1)) / (1 - alpha) = {(1 - alpha ** (K + 1)) / (1 - alpha):.2f} "
              f"(Leviathan et al.; acceptance is not really i.i.d.)")
    print(f"tokens identical to plain greedy decoding: {res.tokens == ar.tokens}")

    section("speculative sampling keeps the target's distribution: an experiment")
    logits, _ = model(torch.tensor([prompt]), torch.arange(len(prompt)), masks.causal(len(prompt)))
    p = torch.softmax(logits[0, -1], -1)  # the target's distribution of the first new token (temperature 1)
    trained = checkpoint.load_gpt(checkpoint.load(Path(ckpt) / "draft_model.pt", "draft_model"))
    drafters = {"trained draft model": trained, "random draft model (poor)": GPT(trained.config).eval()}
    top = p.topk(BINS).indices
    g = torch.Generator().manual_seed(0)
    print(f"{SAMPLES} first tokens per row, at temperature 1; TV = total variation distance to the target's p over "
          f"its {BINS} most likely tokens + one bin for the rest.")
    direct = torch.bincount(torch.multinomial(p, SAMPLES, replacement=True, generator=g), minlength=len(p))
    floor = tv(binned(direct, top), binned(p, top))
    print(f"{'drafter':<45} {'accept rate':>11} {'1 - TV(p,q)':>11} {'TV(samples, p)':>14}")
    print(f"{'none: sample p directly (the noise floor)':<45} {'':>11} {'':>11} {floor:>14.3f}")
    rows = {}
    for name, draft in drafters.items():
        q_logits, _ = draft(torch.tensor([prompt]), torch.arange(len(prompt)), masks.causal(len(prompt)))
        q = torch.softmax(q_logits[0, -1], -1)
        for rule in ("", BUG):
            counts, accepted = torch.zeros(len(p)), 0
            drafts = torch.multinomial(q, SAMPLES, replacement=True, generator=g)
            if rule == BUG:  # transformers #32867: a greedy draft checked against q's softmax
                drafts = q.argmax().repeat(SAMPLES)
            for d in drafts:
                a, token = accept_sampled(d[None], q[None], torch.stack([p, p]), g)  # p_2 only matters when a = 1
                counts[int(d) if a == 1 else token] += 1
                accepted += a
            rows[name + rule] = counts
            print(f"{name + rule:<45} {accepted / SAMPLES:>11.3f} {1 - tv(p, q):>11.3f} "
                  f"{tv(binned(counts, top), binned(p, top)):>14.3f}")
    print("With the right rule the samples are as close to p as direct sampling is, with a good or a poor")
    print("drafter alike, and the acceptance rate is 1 - TV(p, q). The bug (transformers #32867): drafting")
    print("greedily but accepting with the drafter's softmax q, as if the draft had been sampled from q.")
    poor = next(iter(reversed(drafters)))
    print(f"\nthe {BINS} bins for the poor drafter: target p vs the empirical frequency of speculative sampling")
    emp = binned(rows[poor], top)
    bug = binned(rows[poor + BUG], top)
    for i, name in enumerate(label(tok, top.tolist()) + ["(rest)"]):
        print(f"  {name:>12} p {float(binned(p, top)[i]):.3f}  spec {float(emp[i]):.3f}  bug {float(bug[i]):.3f}  "
              + "#" * round(60 * float(emp[i])))

    section("sampling end to end: the same loop at temperature 1")
    res = generate(model, prompt, 48, drafter, temperature=1.0, seed=0)
    print(f"measured: tau {res.stats.tau:.2f}, alpha {res.stats.alpha:.2f}; text: {tok.decode(res.tokens)!r}")


if __name__ == "__main__":
    run(main)
