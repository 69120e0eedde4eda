"""Lesson 07: layer skipping and early exit (the target drafts for itself)

No second model: a cheaper version of the target proposes and the full target verifies, so the
output is still exactly the target's. Draft & Verify skips some attention and MLP sub-layers
(each replaced by the identity on the residual stream) and drafts autoregressively through the
target's own KV cache; verification then overwrites the entries the sparse model wrote. LayerSkip
exits early: the first E layers plus the shared final norm and LM head draft, and verification
runs only layers E..L-1, reusing the early layers' work, which is exact because those layers are
the same. What makes either pay is how often the cheap model agrees with the full one, against
how much of a forward it saves; below both are measured for every exit layer and every single
skipped sub-layer. The default checkpoint's target is trained with LayerSkip's recipe (layer
dropout and an early-exit loss) so that its early layers agree with it often; for a plainly
trained target's, far rarer agreement, run this lesson with --ckpt out/tiny-plain after
`python train_tiny.py --no-layerskip --out out/tiny-plain`.

Papers: Zhang et al., "Draft & Verify: Lossless Large Language Model Acceleration via
Self-Speculative Decoding" (ACL 2024); Elhoushi et al., "LayerSkip: Enabling Early Exit
Inference and Self-Speculative Decoding" (ACL 2024).
File: minispec/drafters/layerskip.py (both drafters, the skip-set search, LayerSkip training).
"""

from pathlib import Path

import numpy as np
import torch

from common import lesson, prompts, run, section, show_mask, val_tokens
from minispec import Stats, generate, make_drafter, masks
from minispec.verify import overlap

K = 4
TEMPERATURE = 0.8  # for the sampled drafts' acceptance


def agreement(model, x, layers=None, skip=frozenset()):
    """How close the cheap model is to the full one over the token ids x (1, T): how often its
    argmax is the full model's (a greedy draft's acceptance), and the mean of sum_x min(p, q) =
    1 - TV(p, q) at TEMPERATURE (a sampled draft's acceptance, q the cheap model's distribution)."""
    T = x.size(1)
    pos, mask = torch.arange(T), masks.causal(T)
    full = model(x, pos, mask)[0]  # (1, T, V)
    cheap = model.head(model.run_layers(model.embed(x, pos), mask, layers=layers, skip=skip))[0]
    p, q = (torch.softmax(logits / TEMPERATURE, -1) for logits in (full, cheap))
    return float((cheap.argmax(-1) == full.argmax(-1)).float().mean()), float(overlap(p, q).mean())


def decode(model, ckpt, method, test_prompts, **options):
    """The statistics of a method over the prompts (48 new tokens each), and its drafter."""
    drafter = make_drafter(method, model, ckpt=ckpt, k=K, **options)
    total = Stats()
    for p in test_prompts:
        total.add(generate(model, p, 48, drafter).stats)
    return total, drafter


def main():
    model, tok, ckpt = lesson(__doc__)
    test_prompts = prompts(ckpt, tok, 2)
    L = model.config.n_layer
    val = val_tokens(ckpt)[:model.config.block_size]
    x = torch.tensor(val.astype(np.int64))[None]  # (1, T) held-out text

    section("the masks: drafting feeds one token at a time through the target's own cache")
    t = 3
    print("the draft step that feeds d2 (at slot t+2, to draft d3) sees the prefix, x_t and d1 (t = 3):")
    show_mask(masks.cached_block(t + 2, masks.causal(1), t + 3), ["d2"], ["p0", "p1", "p2", "x_t", "d1", "d2"])
    print("and verification is the usual chain block over [x_t, d1..dk] (lesson 03).")

    section("early exit: agreement of the first E layers (+ final norm and LM head) with the full model")
    print(f"agreement on {x.size(1)} held-out tokens; tau decoding 2 prompts x 48 tokens with k = {K} drafts a step;")
    print("estimate = tau / (1 + k c), c = a draft's cost in target forwards (Leviathan et al.; c ~ E/L here);")
    print(f"1 - TV: how often a draft sampled at temperature {TEMPERATURE} is accepted, on the same tokens")
    print(f"{'exit E':>6} {'c':>5} {'agreement':>9} {'tau':>5} {'estimate':>8} {'1 - TV':>6}")
    for E in range(1, L):
        total, _ = decode(model, ckpt, "earlyexit", test_prompts, exit_layer=E, gamma=None)
        agree, one_minus_tv = agreement(model, x, layers=range(E))
        print(f"{E:>6} {E / L:>5.2f} {agree:>9.2f} {total.tau:>5.2f} {total.tau / (1 + K * E / L):>7.2f}x "
              f"{one_minus_tv:>6.2f}")

    section("layer skipping: agreement with ONE sub-layer skipped (the rest of the model runs)")
    for layer in range(L):
        scores = [agreement(model, x, skip={(layer, part)})[0] for part in ("attn", "mlp")]
        print(f"  layer {layer}: skip attn {scores[0]:.2f}   skip mlp {scores[1]:.2f}")
    total, drafter = decode(model, ckpt, "layerskip", test_prompts, gamma=None)
    c = len(drafter.drafted_parts()) / (2 * L)
    print(f"the layerskip drafter ({'searched' if (Path(ckpt) / 'layerskip.pt').is_file() else 'default'} skip set) "
          f"skips {sorted(drafter.skip)}")
    print(f"measured: it runs {len(drafter.drafted_parts())} of {2 * L} sub-layers (c ~ {c:.2f}), agreement "
          f"{agreement(model, x, skip=drafter.skip)[0]:.2f}, tau {total.tau:.2f}, "
          f"estimate {total.tau / (1 + K * c):.2f}x")
    print("Skipping a sub-layer that barely changes the argmax is nearly free in acceptance; a good skip set")
    print("(exercise 5) saves the most compute for the least agreement. train_tiny.py searches one (by default")
    print("after LayerSkip's training) by timing the pieces of a forward; lesson 09 and decode.py measure real")
    print("tokens/s.")


if __name__ == "__main__":
    run(main)
