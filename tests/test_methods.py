"""Every registered method, automatically: identical to greedy, and lossless when sampling.

Parametrized over minispec.METHODS, so a new drafter goes through all of it the moment it is
registered. Exactness is tested in float32.
"""

import pytest
import torch

import minispec
from minispec import masks, speculative
from minispec.kvcache import KVCache
from minispec.speculative import Draft, Drafter, generate
from tests.helpers import chi_square_p_value, exact_first_two, prompts, random_gpt, sampled_first_two

DRAFTERS = [m for m in minispec.METHODS if m != "ar"]


@pytest.fixture(scope="module")
def greedy_reference(tiny, tiny_ckpt):
    model, _ = tiny
    return {tuple(p): generate(model, p, 48).tokens for p in prompts(tiny_ckpt)}


@pytest.mark.parametrize("method", DRAFTERS)
@pytest.mark.parametrize("k", [1, 2, 4, 8, "auto"])
def test_greedy_identical_to_autoregressive(method, k, tiny, tiny_ckpt, greedy_reference):
    model, _ = tiny
    drafter = minispec.make_drafter(method, model, ckpt=tiny_ckpt, k=k)
    accepted = 0
    for prompt, expected in greedy_reference.items():
        res = generate(model, list(prompt), 48, drafter)
        diverge = next((i for i, (a, b) in enumerate(zip(res.tokens, expected)) if a != b), None)
        assert res.tokens == expected, f"{method} k={k}: first divergence at new token {diverge}"
        accepted += res.stats.accepted
    assert accepted > 0, f"{method} never had a draft accepted: the test would not exercise acceptance"


@pytest.fixture(scope="module")
def sharp_model():
    return random_gpt(vocab_size=6, scale=4.0, seed=3)


@pytest.mark.parametrize("method", ["ar"] + DRAFTERS)
def test_sampling_keeps_the_target_distribution(method, sharp_model):
    """Chi-square on the first two sampled tokens, with an untrained (deliberately poor) drafter."""
    prompt = [1, 2, 3]
    drafter = minispec.make_drafter(method, sharp_model, k=2, untrained=True)
    counts, _ = sampled_first_two(sharp_model, prompt, drafter, 3000)
    assert chi_square_p_value(counts, exact_first_two(sharp_model, prompt)) > 0.01


def test_the_chi_square_test_catches_a_planted_bug(sharp_model, monkeypatch):
    """Sampling the correction from p instead of norm(max(0, p - q)) must fail the same test."""
    def buggy(draft, q, p, generator):
        for i in range(len(draft)):
            d = int(draft[i])
            if torch.rand(1, generator=generator) * q[i, d] >= p[i, d]:
                return i, int(torch.multinomial(p[i], 1, generator=generator))  # the bug: p, not the residual
        return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=generator))
    monkeypatch.setattr(speculative, "accept_sampled", buggy)
    prompt = [1, 2, 3]
    drafter = minispec.make_drafter("draft_model", sharp_model, k=2, untrained=True)
    counts, _ = sampled_first_two(sharp_model, prompt, drafter, 3000)
    assert chi_square_p_value(counts, exact_first_two(sharp_model, prompt)) < 0.01


def test_seeds_reproduce_and_differ(tiny):
    model, _ = tiny
    a = generate(model, [5, 6, 7], 20, temperature=1.0, seed=1).tokens
    assert a == generate(model, [5, 6, 7], 20, temperature=1.0, seed=1).tokens
    assert a != generate(model, [5, 6, 7], 20, temperature=1.0, seed=2).tokens


class Oracle(Drafter):
    """Drafts from a known continuation, optionally wrong on purpose: to force edge cases."""

    def __init__(self, continuation, k, wrong=False, vocab=None):
        self.continuation, self.k, self.wrong, self.vocab = continuation, k, wrong, vocab

    def start(self, prompt, cache):
        self.prompt_len = len(prompt)

    def propose(self, seq, room, sampling):
        done = len(seq) - self.prompt_len
        d = self.continuation[done:done + min(self.k, room)]
        return Draft.chain([(x + 1) % self.vocab for x in d] if self.wrong else d)


def test_all_drafts_accepted_gives_k_plus_one_per_step(tiny):
    model, _ = tiny
    prompt = [10, 11, 12]
    expected = generate(model, prompt, 40).tokens
    res = generate(model, prompt, 40, Oracle(expected, k=4))
    assert res.tokens == expected
    assert res.stats.target_forwards == 8 and res.stats.tau == 5.0  # 40 tokens, 5 a step
    assert res.stats.accept_at == [1.0] * 4 and res.stats.accepted_lengths == {4: 8}


def test_no_draft_accepted_still_exact(tiny):
    model, _ = tiny
    prompt = [10, 11, 12]
    expected = generate(model, prompt, 30).tokens
    res = generate(model, prompt, 30, Oracle(expected, k=3, wrong=True, vocab=model.config.vocab_size))
    assert res.tokens == expected and res.stats.tau == 1.0 and res.stats.alpha == 0.0


def test_max_new_tokens_inside_a_block(tiny):
    model, _ = tiny
    expected = generate(model, [10, 11], 7).tokens
    for n in range(1, 8):
        res = generate(model, [10, 11], n, Oracle(expected, k=4))
        assert res.tokens == expected[:n]


def test_end_of_text_inside_the_accepted_block(tiny):
    model, _ = tiny
    prompt = [10, 11, 12]
    expected = generate(model, prompt, 30).tokens
    eot = expected[6]  # pretend the 7th token ends the text
    res = generate(model, prompt, 30, Oracle(expected, k=4), eot=eot)
    assert res.tokens == expected[:expected.index(eot) + 1]


def test_context_end_stops_generation(tiny):
    model, _ = tiny
    context = model.config.block_size
    prompt = list(range(1, context - 5))
    expected = generate(model, prompt, 100).tokens
    assert len(expected) == 6  # the sequence fills the context exactly
    assert generate(model, prompt, 100, Oracle(expected, k=4)).tokens == expected


class ForkedOracle(Drafter):
    """Two candidate paths: a wrong one first, the right one second, so the accepted path is not
    contiguous in the block and its cache entries must be compacted."""
    k = 2

    def __init__(self, continuation, vocab):
        self.continuation, self.vocab = continuation, vocab

    def start(self, prompt, cache):
        self.prompt_len = len(prompt)

    def propose(self, seq, room, sampling):
        done = len(seq) - self.prompt_len
        right = self.continuation[done:done + min(2, room)]
        if len(right) < 2:
            return Draft.chain(right)
        wrong = (right[0] + 1) % self.vocab
        tokens = torch.tensor([wrong, right[0], right[1]])
        mask = masks.causal(4)
        mask[2, 1] = mask[3, 1] = False  # the right path (0, 2, 3) does not see the wrong node 1
        return Draft(tokens, torch.tensor([1, 1, 2]), mask, [[0, 1], [0, 2, 3]])


def test_tree_paths_are_compacted(tiny, monkeypatch):
    model, _ = tiny
    prompt = [10, 11, 12]
    expected = generate(model, prompt, 30).tokens
    caches, for_model = [], KVCache.for_model
    monkeypatch.setattr(KVCache, "for_model", staticmethod(lambda m, **kw: caches.append(for_model(m, **kw)) or caches[-1]))
    res = generate(model, prompt, 30, ForkedOracle(expected, model.config.vocab_size))
    assert res.tokens == expected and res.stats.tau > 2.5
    # the cache now holds the accepted sequence at slots == positions: compare with a fresh prefill
    seq = prompt + res.tokens
    fresh = for_model(model)
    speculative.prefill(model, fresh, seq[:-1])
    n = len(seq) - 1
    assert torch.allclose(caches[0].kv[..., :n, :], fresh.kv[..., :n, :], atol=1e-5)
