"""The static-buffer path of cudagraph.py: on CPU it runs eagerly and must equal the plain path
token for token for every method; on a GPU, graphs must equal eager (skipped without one)."""

import pytest
import torch

import minispec
from minispec import cudagraph, masks
from minispec.cudagraph import StaticForwards
from minispec.kvcache import KVCache
from minispec.speculative import Drafter, generate
from tests.helpers import prompts

METHODS = list(minispec.METHODS)


def decode_all_prompts(model, ckpt, method, k, static, **sampling):
    """One drafter and one StaticForwards (or none) for all prompts, as decode.py uses them."""
    drafter = minispec.make_drafter(method, model, ckpt=ckpt, k=k)
    return [generate(model, p, 40, drafter, static=static, **sampling).tokens for p in prompts(ckpt, n=6)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [2, 5])
def test_static_path_equals_plain_path(method, k, tiny, tiny_ckpt):
    """Greedy and sampled tokens are the same with every forward at a fixed shape over static buffers,
    with the caches and recordings reused from prompt to prompt."""
    model, _ = tiny
    static = StaticForwards(graphs=False)
    for sampling in ({}, {"temperature": 1.0, "seed": 7}):
        plain = decode_all_prompts(model, tiny_ckpt, method, k, None, **sampling)
        assert decode_all_prompts(model, tiny_ckpt, method, k, static, **sampling) == plain, sampling
    assert static.recordings, "nothing went through the static path"


class NowAndThen(Drafter):
    """`inner`, drafting on every `every`-th step only and taking plain steps between, as --k auto
    does while drafting does not pay: then a drafter with a cache of its own has a backlog to read."""

    def __init__(self, inner, every):
        self.inner, self.every, self.k = inner, every, inner.k

    def start(self, prompt, cache):
        self.steps = 0
        self.inner.start(prompt, cache)

    def propose(self, seq, room, sampling):
        self.steps += 1
        return self.inner.propose(seq, room if self.steps % self.every == 0 else 0, sampling)

    def observe(self, step):
        self.inner.observe(step)


@pytest.mark.parametrize("method", ["draft_model", "mask"])
def test_a_backlog_is_read_without_recording_a_forward_per_length(method, tiny, tiny_ckpt):
    """A drafter that skipped steps reads the tokens accepted meanwhile before it drafts. Through
    recorded forwards, every backlog length would be one more recording (a CUDA graph captured in
    the middle of a timed run); as a plain prefill, the recorded block sizes stay those of drafting
    on every step: the tokens one step can accept (1 or 2 that the draft model has not read yet;
    up to k + 1 for mask). And the tokens stay the plain path's."""
    model, _ = tiny
    k, static = 3, StaticForwards(graphs=False)
    for sampling in ({}, {"temperature": 1.0, "seed": 7}):
        runs = {}
        for forwards in (None, static):
            drafter = NowAndThen(minispec.make_drafter(method, model, ckpt=tiny_ckpt, k=k), every=5)
            runs[forwards] = [generate(model, p, 40, drafter, static=forwards, **sampling).tokens
                              for p in prompts(tiny_ckpt, n=3)]
        assert runs[static] == runs[None], sampling
    own_caches = {id(cache) for _, cache in static.caches.values()} - {id(static.cache_for(model))}
    sizes = {key[1] for key in static.recordings if key[0] in own_caches}
    assert sizes and sizes <= ({1, 2} if method == "draft_model" else set(range(1, k + 2))), sizes


def test_static_forward_reads_the_full_cache_width(tiny):
    """A static forward widens the mask to every cache slot and still gives the plain logits."""
    model, _ = tiny
    static = StaticForwards(graphs=False)
    ids = torch.randint(model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)
    plain_logits, _ = model(ids, pos, masks.causal(12))
    cache = static.cache_for(model)
    assert static.cache_for(model) is cache and cache.static is static
    for t in range(12):  # token by token, as the autoregressive loop feeds them
        mask = masks.cached_block(t, masks.causal(1), t + 1)
        logits, _ = cudagraph.forward(model, ids[:, t:t + 1], pos[t:t + 1], mask, cache, pos[t:t + 1])
        torch.testing.assert_close(logits[0, 0], plain_logits[0, t], atol=1e-5, rtol=1e-5)
    assert list(static.recordings) == [(id(cache), 1, "forward", id(model))]  # one shape, one recording
    assert static.recordings[(id(cache), 1, "forward", id(model))].inputs[2].shape == (1, cache.max_len)


def test_plain_cache_runs_the_function_as_is():
    cache = KVCache(1, 1, 2, 8)
    seen = []
    cudagraph.run(cache, ("k",), lambda *inputs: seen.append(inputs) or (), torch.zeros(1, 2), torch.arange(2),
                  masks.causal(2), torch.arange(2))
    assert seen[0][2].shape == (2, 2)  # no widening without a static owner


def test_graphs_need_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(minispec.MinispecError, match="CUDA"):
        StaticForwards(graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_graphs_equal_eager(method, tiny_ckpt):
    """Replayed graphs against the same static forwards run eagerly: the same shapes and kernels.
    (Static against plain, on a GPU, may differ in a near-tie: they attend over other widths.)"""
    model, _ = minispec.load(tiny_ckpt, "cuda")
    for sampling in ({}, {"temperature": 1.0, "seed": 7}):
        eager = decode_all_prompts(model, tiny_ckpt, method, 4, StaticForwards(graphs=False), **sampling)
        graphed = decode_all_prompts(model, tiny_ckpt, method, 4, StaticForwards(graphs=True), **sampling)
        assert graphed == eager, sampling
