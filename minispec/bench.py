"""Every method side by side on the same prompts: the benchmark behind `decode.py` and lesson 09.

Methodology (as Spec-Bench compares methods): the same target, the same prompts, the same loop;
only the drafter changes. Every method first decodes a warm-up, then the prompts are decoded
one by one, every method in turn on each prompt, so that a slow moment of the machine hits all
methods alike. The speedup of a method is its tokens/s over autoregressive decoding's (`ar`)
in the same run; `identical_to_ar` says whether its greedy tokens equal plain greedy decoding's
on every prompt (they must, unless the relaxed top-beta rule, which is lossy, is on).
"""

import sys

from .drafters import METHODS, make_drafter
from .errors import MinispecError
from .speculative import Stats, generate

UNSTEADY = 0.10  # autoregressive decoding timed at the start and the end of a run: speeds further apart warn


def make_drafters(model, ckpt, k, methods=None):
    """{method: drafter} for every method (default: all registered ones, "ar" first) and the list of
    methods skipped: with ckpt=None the trained ones, which have no drafter for this model."""
    drafters, skipped = {}, []
    for method in methods or METHODS:
        try:
            drafters[method] = make_drafter(method, model, ckpt=ckpt, k=k)
        except MinispecError:
            if ckpt is not None:
                raise
            skipped.append(method)  # a trained method, and no checkpoint holds its drafter
    return drafters, skipped


def row(method, k, stats):
    """One method's line of the report: the keys of decode.py's JSON."""
    return {"method": method, "k": 0 if method == "ar" else k, "tau": round(stats.tau, 3),
            "depth": round(stats.proposed / max(stats.target_forwards, 1), 2),  # mean draft depth per step
            "alpha": round(stats.alpha, 3), "accept_at": [round(a, 3) for a in stats.accept_at],
            "tokens_per_s": round(stats.tokens_per_s, 1), "new_tokens": stats.new_tokens,
            "target_forwards": stats.target_forwards, "draft_s": round(stats.draft_s, 3),
            "verify_s": round(stats.verify_s, 3)}


def side_by_side(model, prompts, drafters, max_new_tokens, k, *, temperature=0.0, top_k=None, seed=0, eot=None,
                 top_beta=None, static=None, progress=True):
    """Decode every prompt (lists of token ids) with every drafter ({method: drafter}, "ar"
    among them). Returns (rows, spread): one row per method, with its speedup over "ar" and, in
    greedy decoding, whether its tokens equal "ar"'s (differing_from_ar counts the tokens that
    differ); and how far apart two timings of "ar" in this run were (0.05 = 5%), "ar" being
    decoded again after the other methods on every prompt."""
    def decode(method, ids, n):
        return generate(model, ids, n, drafters[method], temperature=temperature, top_k=top_k, seed=seed,
                        eot=eot, top_beta=top_beta, static=static)

    # Warm-up: first calls pay for allocations and lazy initialisation. With static forwards every
    # prompt is decoded once in full first, so that each block shape is recorded (captured) before
    # the timed runs; greedy decoding then meets exactly the same shapes again.
    for method in drafters:
        for ids in prompts if static else prompts[:1]:
            decode(method, ids, max_new_tokens if static else min(16, max_new_tokens))
    totals = {method: Stats() for method in drafters}
    ar_again = Stats()  # "ar" once more after the other methods: how steady the machine was
    identical = dict.fromkeys(drafters, True)
    differing = dict.fromkeys(drafters, 0)  # new tokens unlike greedy's at the same place (lossy top-beta)
    for i, ids in enumerate(prompts):
        if progress:
            print(f"\rprompt {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
        reference = None
        for method in drafters:
            res = decode(method, ids, max_new_tokens)
            totals[method].add(res.stats)
            reference = res.tokens if method == "ar" else reference
            identical[method] &= res.tokens == reference
            differing[method] += (sum(a != b for a, b in zip(res.tokens, reference))
                                  + abs(len(res.tokens) - len(reference)))
        ar_again.add(decode("ar", ids, max_new_tokens).stats)
    if progress:
        print(file=sys.stderr)
    ar_speed = totals["ar"].tokens_per_s
    greedy = temperature == 0
    rows = [{**row(method, k, totals[method]), "speedup": round(totals[method].tokens_per_s / ar_speed, 3),
             "identical_to_ar": identical[method] if greedy else None,
             **({"differing_from_ar": differing[method]} if greedy else {})} for method in drafters]
    return rows, abs(ar_again.tokens_per_s / ar_speed - 1)


def unsteady(spread, limit=UNSTEADY):
    """A warning when autoregressive decoding ran at speeds `spread` apart in one run, else None."""
    if spread <= limit:
        return None
    return (f"warning: timings are unreliable: autoregressive decoding ran {spread:.0%} faster or slower at the end "
            f"of this run than at its start (another process is busy on this machine?). tau, alpha and the "
            f"tokens do not depend on it; rerun on a quiet machine to compare speeds")


def table(rows):
    """The rows as the aligned text table decode.py prints."""
    lines = [f"{'method':<12} {'k':>4} {'depth':>5} {'tau':>5} {'alpha':>5} {'tok/s':>7} {'speedup':>7} {'draft s':>7} "
             f"{'verify s':>8} {'identical':>9}  accept at 1..k"]
    for r in rows:
        same = ("-" if r["identical_to_ar"] is None else "yes" if r["identical_to_ar"] else
                f"NO {r['differing_from_ar']}/{r['new_tokens']}")
        lines.append(f"{r['method']:<12} {r['k']:>4} {r['depth']:>5.2f} {r['tau']:>5.2f} {r['alpha']:>5.2f} "
                     f"{r['tokens_per_s']:>7.1f} "
                     f"{r['speedup']:>6.2f}x {r['draft_s']:>7.2f} {r['verify_s']:>8.2f} {same:>9}  "
                     f"{' '.join(f'{a:.2f}' for a in r['accept_at'])}")
    return "\n".join(lines)
