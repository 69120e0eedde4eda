"""Jacobi iteration and Lookahead decoding: the mask drawn by hand, the solver view, the pool."""

import torch

import minispec
from minispec import masks
from minispec.drafters.jacobi import Lookahead, jacobi_solve
from minispec.kvcache import KVCache
from minispec.speculative import Step, generate
from tests.helpers import (LOOKAHEAD_W5_N4_G2, chi_square_p_value, exact_first_two, prompts, random_gpt,
                           sampled_first_two)


def test_lookahead_mask_w5_n4_g2():
    assert torch.equal(masks.lookahead(W=5, N=4, G=2), LOOKAHEAD_W5_N4_G2)


def test_jacobi_solve_reaches_greedy_within_m_iterations(tiny, tiny_ckpt):
    model, _ = tiny
    m = 16
    for prompt in prompts(tiny_ckpt, n=5):
        greedy = generate(model, prompt, m).tokens
        tokens, iterations = jacobi_solve(model, prompt, m, init=[0] * m)  # a poor guess
        assert tokens == greedy and iterations <= m
        assert jacobi_solve(model, prompt, m, init=greedy) == (greedy, 0)  # already the fixed point


def test_lookahead_harvests_the_window_columns():
    drafter = Lookahead(W=3, N=3, G=2, seed_pool=False)
    drafter.start([7], KVCache(n_layer=1, n_head=1, head_dim=1, max_len=32))
    drafter.updates = 1  # the window already holds a Jacobi output at every level above 0
    drafter.window = torch.tensor([[0, 11, 12],
                                   [20, 21, 22]])
    draft = drafter.propose([7, 5], room=10, sampling=None)  # x_t = 5 becomes level 0, column 0
    assert draft.tokens.tolist() == [11, 12, 20, 21, 22] and draft.paths == [[0]]  # empty pool
    outputs = torch.tensor([30, 31, 32])  # the forward's argmax after the newest level (20, 21, 22)
    logits = torch.zeros(6, 40)
    logits[torch.arange(3, 6), outputs] = 1.0
    drafter.observe(Step(1, torch.cat([torch.tensor([5]), draft.tokens]), [0], logits, None, [11]))
    assert drafter.pool == {5: [(20, 30)], 11: [(21, 31)], 12: [(22, 32)]}  # one n-gram per column
    assert drafter.window.tolist() == [[20, 21, 22], [30, 31, 32]]  # shifted up one level
    draft = drafter.propose([7, 5, 11], room=10, sampling=None)  # the pool has an n-gram for 11
    assert draft.tokens[-2:].tolist() == [21, 31] and draft.paths == [[0, 6, 7]]


def test_lookahead_to_the_end_of_the_context(tiny):
    model, _ = tiny
    prompt = list(range(1, model.config.block_size - 9))
    expected = generate(model, prompt, 100).tokens
    assert len(expected) == 10
    assert generate(model, prompt, 100, minispec.make_drafter("lookahead", model, k=4)).tokens == expected


def test_sampling_through_several_ngram_candidates():
    """Chi-square on the first two sampled tokens when the pool offers several n-grams for x_t, so
    that verify.accept_candidates tries them in turn (the registry's test rarely gets there)."""
    model = random_gpt(vocab_size=6, scale=4.0, seed=3)
    prompt = [1, 2, 4, 1, 3, 5, 1, 0, 2, 1]  # x_t = 1 has continuations (0, 2), (3, 5), (2, 4) in the text
    drafter = Lookahead(W=1, N=3, G=3)  # a one-column window: the whole block fits in 3 new tokens
    counts, accepted = sampled_first_two(model, prompt, drafter, 3000, new_tokens=3)
    assert accepted > 0
    assert chi_square_p_value(counts, exact_first_two(model, prompt)) > 0.01
