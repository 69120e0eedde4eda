"""Lesson 01: the tiny GPT and its KV cache

A GPT predicts the next token from all the tokens before it. Decoding one token at a time
would redo the whole prefix at every step; a KV cache keeps each token's keys and values, so a
step only feeds the one new token and attends over the cache. minispec's cache is static, as
in gpt-fast: one tensor allocated once, written at slot indices, and the attention mask alone
decides which slots a query reads. Here we check, with numbers, that cached decoding gives the
same logits as recomputing everything, how much faster it is, and why a stale slot costs
nothing to roll back.

Papers: GPT-2 (Radford et al. 2019) for the model; gpt-fast (PyTorch team, 2023) for the static
cache. Files: minispec/model.py, minispec/kvcache.py, minispec/speculative.py (prefill).
"""

import time

import torch

from common import label, lesson, prompts, run, section, show_mask
from minispec import masks
from minispec.kvcache import KVCache
from minispec.speculative import prefill

STEPS = 32  # tokens decoded each way


def main():
    model, tok, ckpt = lesson(__doc__)
    prompt = prompts(ckpt, tok, 1)[0]
    n = len(prompt)

    section("without a cache: every step recomputes the whole sequence")
    print("The mask is data: GPT.forward takes a boolean [T_query, S_keys] tensor, True = may attend.")
    print("Over the whole sequence it is the causal mask (first 6 tokens of the prompt):")
    show_mask(masks.causal(6), label(tok, prompt[:6]))
    seq, uncached = list(prompt), []
    t0 = time.perf_counter()
    for _ in range(STEPS):
        T = len(seq)
        logits, _ = model(torch.tensor([seq]), torch.arange(T), masks.causal(T))  # (1, T, V)
        uncached.append(logits[0, -1])
        seq.append(int(logits[0, -1].argmax()))
    uncached_s = time.perf_counter() - t0

    section("with the static KV cache: one token per step")
    print(f"Prefill writes the prompt's {n - 1} first tokens at slots 0..{n - 2}; then each step feeds one "
          f"token at slot t\nand its query sees slots 0..t. The mask of the first step (t = {n - 1}):")
    show_mask(masks.cached_block(n - 1, masks.causal(1), n), ["x_t"], list(range(n)))
    cache = KVCache.for_model(model)
    t0 = time.perf_counter()
    prefill(model, cache, prompt[:-1])
    cached_seq, cached = list(prompt), []
    for _ in range(STEPS):
        t = len(cached_seq) - 1
        pos = torch.tensor([t])
        logits, _ = model(torch.tensor([[cached_seq[-1]]]), pos, masks.cached_block(t, masks.causal(1), t + 1),
                          cache, pos)  # (1, 1, V)
        cached.append(logits[0, -1])
        cached_seq.append(int(logits[0, -1].argmax()))
    cached_s = time.perf_counter() - t0

    diff = max(float((a - b).abs().max()) for a, b in zip(cached, uncached))
    print(f"\ncached == uncached: max |logit difference| over {STEPS} steps = {diff:.2e} "
          f"(float32 rounding), same tokens: {cached_seq == seq}")
    print(f"time for {STEPS} tokens: without cache {uncached_s * 1e3:.0f} ms, with cache {cached_s * 1e3:.0f} ms "
          f"({uncached_s / cached_s:.1f}x faster; the gap grows with the length)")
    print(f"continuation: {tok.decode(cached_seq[n:])!r}")

    section("rollback is free: the mask hides stale slots")
    t = len(cached_seq) - 1
    junk = torch.randint(model.config.vocab_size, (1, 4))
    slots = torch.arange(t + 1, t + 5)  # write 4 junk tokens after the sequence, as rejected drafts would
    model(junk, slots, masks.cached_block(t + 1, masks.causal(4), t + 5), cache, slots)
    pos = torch.tensor([t])
    again, _ = model(torch.tensor([[cached_seq[-1]]]), pos, masks.cached_block(t, masks.causal(1), t + 1), cache, pos)
    ref, _ = model(torch.tensor([cached_seq]), torch.arange(t + 1), masks.causal(t + 1))
    print(f"after writing 4 junk entries at slots {t + 1}..{t + 4}, the next step's logits still match the "
          f"uncached ones: max |difference| = {float((again[0, -1] - ref[0, -1]).abs().max()):.2e}")
    print("Nothing was undone: the next mask only reads slots 0..t, and the next tokens overwrite the junk.")


if __name__ == "__main__":
    run(main)
