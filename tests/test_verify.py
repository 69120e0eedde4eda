"""The acceptance rules, one by one, on hand-made distributions."""

import pytest
import torch

from minispec.verify import (accept_candidates, accept_greedy, accept_greedy_paths, accept_paths, accept_sampled,
                             accept_top_beta, best_overlap, overlap, sample, target_probs)
from tests.helpers import chi_square_p_value


def one_hot_logits(tokens, V=5):
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float() * 10


def test_greedy_all_none_some():
    logits = one_hot_logits([1, 2, 3, 4])  # target's argmax after each block token
    assert accept_greedy(torch.tensor([1, 2, 3]), logits) == (3, 4)  # all accepted + bonus
    assert accept_greedy(torch.tensor([0, 2, 3]), logits) == (0, 1)  # none: correction
    assert accept_greedy(torch.tensor([1, 2, 0]), logits) == (2, 3)  # later drafts after a miss never count
    assert accept_greedy(torch.tensor([1, 0, 3]), logits) == (1, 2)
    assert accept_greedy(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 1)


def test_greedy_paths_takes_the_longest():
    tokens = torch.tensor([9, 0, 1, 2, 1])  # root, then paths [0,1] and [0,2,3] and [0,4]
    logits = one_hot_logits([1, 0, 2, 3, 0], V=10)  # after root: 1; after node 2: 2; after node 3: 3
    assert accept_greedy_paths(tokens, [[0, 1], [0, 2, 3], [0, 4]], logits) == ([0, 2, 3], 3)
    assert accept_greedy_paths(tokens, [[0, 1]], logits) == ([0], 1)


def test_target_probs():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert target_probs(logits, 0).tolist() == [0, 1, 0, 0]
    p = target_probs(logits, 1.0, top_k=2)
    assert p[0] == 0 and p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    assert torch.allclose(target_probs(logits, 2.0), torch.softmax(logits / 2, -1))


def unscaled_sample(probs, generator):
    """PLANTED BUG: verify.sample with u uniform in [0, 1) instead of [0, total): right only when
    probs sum to 1 (the residuals of verification do not)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1).squeeze(-1)


PROBS = torch.tensor([[0.0, 0.6, 0.0, 0.2, 0.2],  # zeros first, inside and last
                      [0.2, 0.0, 0.1, 0.1, 0.0]])  # sums to 0.4, as an unnormalised residual may


def draws_follow(sampler, n=20000):
    """Whether n draws of both rows of PROBS at once follow each row's distribution: never a token
    of probability zero, and a chi-square p-value above 0.01."""
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sampler(PROBS, g) for _ in range(n)])  # (n, 2)
    counts = [torch.bincount(draws[:, row], minlength=5) for row in range(2)]
    return all(c[p == 0].sum() == 0 and chi_square_p_value(c, p) > 0.01 for c, p in zip(counts, PROBS))


def test_sample_draws_each_row_from_its_own_distribution():
    assert draws_follow(sample)
    assert sample(PROBS[0], torch.Generator()).shape == ()  # one row: one token


def test_the_sample_test_catches_an_unscaled_uniform():
    assert not draws_follow(unscaled_sample)


def test_sample_refuses_a_row_with_nothing_to_draw():
    for row in (torch.zeros(5), torch.full((5,), float("nan"))):
        with pytest.raises(ValueError, match="no probability"):
            sample(row, torch.Generator())


def first_token_counts(rule, V, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    for _ in range(n):
        counts[rule(g)] += 1
    return counts


P = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]])  # p_1, p_2
Q = torch.tensor([[0.1, 0.1, 0.2, 0.6]])  # a poor drafter


def draw_first(g, q=Q):
    d = torch.multinomial(Q[0], 1, generator=g)
    a, token = accept_sampled(d, q, P, g)
    return int(d) if a == 1 else token


def test_speculative_sampling_keeps_the_distribution():
    assert chi_square_p_value(first_token_counts(draw_first, 4), P[0]) > 0.01


def test_speculative_sampling_test_catches_a_wrong_q():
    # sampling d from Q but telling the rule it came from a uniform q breaks the guarantee
    uniform = torch.full((1, 4), 0.25)
    counts = first_token_counts(lambda g: draw_first(g, uniform), 4)
    assert chi_square_p_value(counts, P[0]) < 1e-6


def test_deterministic_draft_keeps_the_distribution():
    def draw(g):
        a, token = accept_sampled(torch.tensor([3]), None, P, g)  # always drafts token 3
        return 3 if a == 1 else token
    assert chi_square_p_value(first_token_counts(draw, 4), P[0]) > 0.01


def test_candidates_keep_the_distribution():
    tokens = torch.tensor([0, 3, 2, 3])  # two children (3 and 2) of the root; the second tried after the first fails
    p = torch.stack([P[0], P[1], P[1], P[1]])

    def draw(g):
        path, token = accept_candidates(tokens, [[0, 1], [0, 2], [0, 3]], p, g)
        return int(tokens[path[1]]) if len(path) > 1 else token
    assert chi_square_p_value(first_token_counts(draw, 4), P[0]) > 0.01


def test_candidates_bonus_after_full_path():
    tokens = torch.tensor([0, 1])
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert accept_candidates(tokens, [[0, 1]], p, torch.Generator()) == ([0, 1], 2)


def test_top_beta_is_greedy_at_beta_1_and_looser_above():
    logits = torch.log(torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]))
    draft = torch.tensor([1, 1])
    assert accept_top_beta(draft, logits, beta=1, margin=10.0) == accept_greedy(draft, logits) == (0, 0)
    assert accept_top_beta(draft, logits, beta=2, margin=1.0) == (2, 2)  # 0.4 is close enough to 0.5
    assert accept_top_beta(draft, logits, beta=2, margin=0.1) == (0, 0)  # but not within a margin of 0.1


def test_top_beta_applies_to_every_candidate_path():
    # two paths: [0, 1] drafts token 3 (the target's second choice), [0, 2, 3] drafts 4 then 2
    tokens = torch.tensor([9, 3, 4, 2])
    logits = torch.log(torch.tensor([[0.05, 0.05, 0.05, 0.35, 0.5],  # after the root: 4 first, 3 second
                                     [0.6, 0.1, 0.1, 0.1, 0.1],  # after node 1: 0 first
                                     [0.1, 0.1, 0.4, 0.3, 0.1],  # after node 2: 2 first
                                     [0.6, 0.1, 0.1, 0.1, 0.1]]))  # after node 3: 0 first
    paths = [[0, 1], [0, 2, 3]]
    greedy = lambda d, lg: accept_greedy(d, lg)  # noqa: E731
    assert accept_paths(greedy, tokens, paths, logits) == accept_greedy_paths(tokens, paths, logits) == ([0, 2, 3], 0)
    relaxed = lambda d, lg: accept_top_beta(d, lg, beta=2, margin=1.0)  # noqa: E731
    assert accept_paths(relaxed, tokens, [[0, 1]], logits) == ([0, 1], 0)  # 3 is within the top 2 and the margin
    assert accept_paths(relaxed, tokens, paths, logits) == ([0, 2, 3], 0)  # the longest accepted path wins


def test_overlap_is_the_chance_a_sampled_draft_is_accepted():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.1, 0.4, 0.4])
    accept = (q * torch.where(q > 0, (p / q).clamp(max=1.0), torch.zeros_like(q))).sum()  # E_{d~q} min(1, p/q)
    assert float(overlap(p, q)) == pytest.approx(float(accept))
    assert float(overlap(p, p)) == pytest.approx(1.0)
    assert float(overlap(p, torch.tensor([0.0, 0.0, 0.0, 1.0]))) == 0.0


def test_best_overlap_beats_the_marginal_where_the_situations_disagree():
    w, p = torch.tensor([0.6, 0.4]), torch.eye(2)  # two situations, each sure of another token
    q, best = best_overlap(w, p)
    assert torch.equal(q, torch.tensor([1.0, 0.0])) and float(best) == pytest.approx(0.6)
    marginal = w @ p
    assert float((w * overlap(p, marginal)).sum()) == pytest.approx(0.52)
    p = torch.tensor([[0.5, 0.3, 0.2]])  # one situation: its own distribution, always accepted
    q, best = best_overlap(torch.ones(1), p)
    assert torch.allclose(q, p[0]) and float(best) == pytest.approx(1.0)


def test_best_overlap_is_the_best_q_on_a_grid():
    """Against every q on a grid of the simplex over 3 tokens (steps of 0.01): its value is what
    its q gives, no grid point does better, and it never does worse than the marginal. The best q
    rounded down to the grid in its first two tokens moves at most 0.02 of mass to the third, and
    moving mass m changes the value by at most m (no gain exceeds sum w = 1): the grid's best is
    within 0.02 of the best."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.meshgrid(torch.arange(101), torch.arange(101), indexing="ij")
    grid = torch.stack([a, b, 100 - a - b], -1).view(-1, 3)
    grid = grid[grid[:, 2] >= 0].double() / 100  # (5151, 3)
    for _ in range(20):
        n = int(torch.randint(1, 5, (1,), generator=g))
        w = torch.rand(n, generator=g, dtype=torch.float64)
        w /= w.sum()
        p = torch.softmax(3 * torch.randn(n, 3, generator=g, dtype=torch.float64), -1)
        q, best = best_overlap(w, p)
        assert float(q.sum()) == pytest.approx(1.0) and float(q.min()) >= 0
        assert float(best) == pytest.approx(float((w * overlap(p, q)).sum()))
        on_grid = (w * torch.minimum(p[None], grid[:, None]).sum(-1)).sum(-1)  # (5151,)
        assert float(on_grid.max()) <= float(best) + 1e-12
        assert float(best) <= float(on_grid.max()) + 0.02
        assert float(best) >= float((w * overlap(p, w @ p)).sum()) - 1e-12
