"""Lesson 08: CUDA graphs (what must be static, and why)

A small model's forward is hundreds of tiny kernels; on a GPU, launching them from Python costs
more than running them, so speculative decoding's extra tokens per step only turn into speed
once each forward is launched at once. A CUDA graph records one forward's kernels and replays
them with one call, but a replay repeats the SAME kernels on the SAME memory: the shapes, the
KV cache, and buffers for every input (token ids, positions, slots, the mask) and output must
be fixed. So every step copies its values into those buffers, the mask is widened to the whole
cache, and there is one recording per block shape. On a CPU there is nothing to capture: this
lesson runs the same static-buffer code path eagerly and shows it gives the very same tokens.

Source: the CUDA graphs section of the PyTorch docs (capture, warm-up on a side stream, shared
memory pools); gpt-fast (Meta, 2023) for the static KV cache.
File: minispec/cudagraph.py (StaticForwards, run, forward, seconds_per_call).
"""

from common import forward_ms, lesson, prompts, run, section, show_mask
from minispec import StaticForwards, generate, make_drafter, masks
from minispec.kvcache import KVCache


def main():
    model, tok, ckpt = lesson(__doc__)
    device = next(model.parameters()).device.type
    graphs = device == "cuda"

    section("the mask must have a fixed width: the whole cache, stale slots hidden")
    t, T, max_len = 4, 3, 10
    block = masks.cached_block(t, masks.causal(T), t + T)
    cols = [f"s{i}" for i in range(max_len)]
    print(f"plain: a chain of {T} at slot {t} reads slots 0..{t + T - 1}, so its width changes every step")
    show_mask(block, ["x_t", "d1", "d2"], cols[:t + T])
    print(f"static: the same block over all {max_len} slots of the cache; only the values change from step to step")
    show_mask(masks.widen(block, max_len), ["x_t", "d1", "d2"], cols)

    section(f"one recording per block shape ({'CUDA graphs' if graphs else 'eager: this machine has no GPU'})")
    static = StaticForwards(graphs=graphs)
    test_prompts = prompts(ckpt, tok, 2)
    for method in ("ar", "draft_model", "lookahead", "mask"):
        drafter = make_drafter(method, model, ckpt=ckpt, k=4)
        plain = [generate(model, p, 48, drafter).tokens for p in test_prompts]
        fixed = [generate(model, p, 48, drafter, static=static).tokens for p in test_prompts]
        print(f"{method:<12} static tokens == plain tokens: {fixed == plain}")
    print(f"{len(static.recordings)} recordings (whose cache, block size T, what runs; an [M] block is T accepted "
          f"tokens plus k [M]s; near the end of the budget the loop trims drafts, a few more shapes):")
    names = {id(cache): "target" if owner is model else "drafter" for owner, cache in static.caches.values()}
    for cache_id, T, what, *_ in static.recordings:
        print(f"    {names[cache_id]:<8} T={T:<3} {what}")

    section("what it costs here: one cached forward, plain vs over the static buffers")
    plain_cache = KVCache.for_model(model)
    rows = [(T, forward_ms(model, plain_cache, T), forward_ms(model, static.cache_for(model), T)) for T in (1, 5)]
    for T, plain_ms, static_ms in rows:
        print(f"T={T}: plain {plain_ms:.3f} ms, {'graphed' if graphs else 'static (eager)'} {static_ms:.3f} ms "
              f"({static_ms / plain_ms:.2f}x)")
    if not graphs:
        print("On a CPU the static path only adds work (copies, and attention over the whole cache): graphs pay\n"
              "on a GPU, where launches dominate. `python decode.py --device cuda` uses them; --no-graphs compares.")


if __name__ == "__main__":
    run(main)
