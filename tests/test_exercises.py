"""The classroom exercises (lessons/exercises.md): the same checks on the reference and the learner.

Each check runs against minispec's own implementation (it must pass), against the learner's file
under lessons/exercises/ (skipped while the stub still raises NotImplementedError), and against a
deliberately wrong answer (the check must catch it, or it proves nothing).
"""

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import minispec
from minispec import masks, verify
from minispec.drafters.jacobi import jacobi_solve
from tests.helpers import LOOKAHEAD_W5_N4_G2, M_BLOCK_3_3, chi_square_p_value, drawn, random_gpt

EXERCISES = Path(__file__).resolve().parents[1] / "lessons" / "exercises"
PARTS = ("attn", "mlp")


def learner(step):
    """The learner's module lessons/exercises/<step>.py."""
    spec = importlib.util.spec_from_file_location(f"exercise_{step}", EXERCISES / f"{step}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(check, *args):
    try:
        check(*args)
    except NotImplementedError:
        pytest.skip("not written yet: the stub still raises NotImplementedError")


def catches(check, *args):
    """The check rejects a wrong answer (fails an assertion)."""
    with pytest.raises(AssertionError):
        check(*args)


# Step 1: masks, against matrices drawn by hand.

def check_causal(causal):
    assert torch.equal(causal(1), drawn("1"))
    assert torch.equal(causal(4), drawn("""
        1 . . .
        1 1 . .
        1 1 1 .
        1 1 1 1
    """))


def check_cached_block(cached_block):
    chain = drawn("""
        1 . .
        1 1 .
        1 1 1
    """)
    assert torch.equal(cached_block(3, chain, 8), drawn("""
        1 1 1 1 . . . .
        1 1 1 1 1 . . .
        1 1 1 1 1 1 . .
    """))
    tree = drawn("""
        1 . . .
        1 1 . .
        1 . 1 .
        1 . 1 1
    """)
    assert torch.equal(cached_block(2, tree, 6), drawn("""
        1 1 1 . . .
        1 1 1 1 . .
        1 1 1 . 1 .
        1 1 1 . 1 1
    """))
    assert torch.equal(cached_block(0, chain, 3), chain)


def check_mask_token_block(mask_token_block):
    assert torch.equal(mask_token_block(3, 3), M_BLOCK_3_3)
    assert torch.equal(mask_token_block(2, 1), drawn("""
        1 . .
        1 1 .
        1 1 1
    """))
    assert torch.equal(mask_token_block(1, 2), drawn("""
        1 . .
        1 1 1
        1 1 1
    """))


def check_lookahead(lookahead):
    assert torch.equal(lookahead(2, 3, 1), drawn("""
        1 . . . . .
        1 1 . . . .
        1 . 1 . . .
        1 1 . 1 . .
        1 . . . 1 .
        1 . . . 1 1
    """))  # x_t a1 | b0 b1 | n1 n2
    assert torch.equal(lookahead(5, 4, 2), LOOKAHEAD_W5_N4_G2)  # the LookaheadDecoding README figure (W=5, N=4, G=2)


STEP1 = {"causal": check_causal, "cached_block": check_cached_block,
         "mask_token_block": check_mask_token_block, "lookahead": check_lookahead}
STEP1_WRONG = {
    "causal": lambda T: torch.ones(T, T, dtype=torch.bool).triu(),  # the upper triangle: sees the future
    "cached_block": lambda start, block, width: torch.ones(len(block), width, dtype=torch.bool).tril(start),  # a
    # causal band: ignores the block's own mask (wrong for a tree)
    "mask_token_block": lambda n, k: masks.causal(n + k),  # [M]s that cannot see the [M]s after them
    "lookahead": lambda W, N, G: masks.causal((N - 1) * (W + G)),
}


@pytest.mark.parametrize("name", STEP1)
def test_step1_reference(name):
    STEP1[name](getattr(masks, name))


@pytest.mark.parametrize("name", STEP1)
def test_step1_learner(name):
    run_check(STEP1[name], getattr(learner("step1_masks"), name))


@pytest.mark.parametrize("name", STEP1)
def test_step1_catches_a_wrong_mask(name):
    catches(STEP1[name], STEP1_WRONG[name])


# Step 2: greedy acceptance.

def one_hot_logits(tokens, V=5):
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float() * 10


def check_accept_greedy(accept_greedy):
    logits = one_hot_logits([1, 2, 3, 4])  # the target's argmax after x_t, d1, d2, d3
    cases = {(1, 2, 3): (3, 4),  # all accepted: the bonus token
             (0, 2, 3): (0, 1),  # none: the correction
             (1, 2, 0): (2, 3),
             (1, 0, 3): (1, 2)}  # d3 matches, but after a miss it never counts (vllm #2658)
    for draft, expected in cases.items():
        got = accept_greedy(torch.tensor(draft), logits)
        assert tuple(map(int, got)) == expected, f"draft {draft}: expected {expected}, got {got}"
    assert tuple(map(int, accept_greedy(torch.tensor([], dtype=torch.long), logits[:1]))) == (0, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # random drafts against the definition
        k = int(torch.randint(1, 6, (1,), generator=g))
        logits = torch.randn(k + 1, 4, generator=g)
        best = logits.argmax(-1)
        draft = torch.where(torch.rand(k, generator=g) < 0.7, best[:k], torch.randint(4, (k,), generator=g))
        a = 0
        while a < k and draft[a] == best[a]:
            a += 1
        assert tuple(map(int, accept_greedy(draft, logits))) == (a, int(best[a]))


def wrong_greedy(draft, logits):  # counts every matching draft, not the accepted prefix
    best = logits.argmax(-1)
    a = int((draft == best[:-1]).sum())
    return a, int(best[a])


def test_step2_reference():
    check_accept_greedy(verify.accept_greedy)


def test_step2_learner():
    run_check(check_accept_greedy, learner("step2_greedy").accept_greedy)


def test_step2_catches_counting_matches():
    catches(check_accept_greedy, wrong_greedy)


# Step 3: speculative sampling. Exact residuals by hand; the sampled distribution by chi-square.

P = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]])  # the target's p_1, p_2
Q = torch.tensor([[0.1, 0.1, 0.2, 0.6]])  # a poor drafter's q_1
SAMPLES = 8000


def check_residual(residual):
    got = residual(P[0], Q[0])
    assert torch.allclose(got, torch.tensor([0.8, 0.2, 0.0, 0.0]), atol=1e-6), got
    got = residual(P[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # a one-hot q: p with that token zeroed
    assert torch.allclose(got, torch.tensor([0.25, 0.0, 0.5, 0.25]), atol=1e-6), got


def first_tokens(accept_sampled, q, seed=0):
    """SAMPLES first emitted tokens with a one-draft step; d drawn from Q; returns (counts, accepted)."""
    g = torch.Generator().manual_seed(seed)
    counts, accepted = torch.zeros(4), 0
    for _ in range(SAMPLES):
        d = torch.multinomial(Q[0], 1, generator=g)
        a, token = accept_sampled(d, q, P, g)
        counts[int(d) if int(a) == 1 else int(token)] += 1
        accepted += int(a)
    return counts, accepted


def check_accept_sampled(accept_sampled):
    counts, accepted = first_tokens(accept_sampled, Q)
    assert chi_square_p_value(counts, P[0]) > 0.01, f"first tokens {counts.tolist()} do not follow p = {P[0].tolist()}"
    rate = float(torch.minimum(P[0], Q[0]).sum())  # expected acceptance: 1 - TV(p, q) = 0.5
    assert abs(accepted / SAMPLES - rate) < 4 * (rate * (1 - rate) / SAMPLES) ** 0.5, f"acceptance {accepted / SAMPLES}"
    g = torch.Generator().manual_seed(1)  # a deterministic draft (q=None): always token 3
    counts = torch.zeros(4)
    for _ in range(SAMPLES):
        a, token = accept_sampled(torch.tensor([3]), None, P, g)
        counts[3 if int(a) == 1 else int(token)] += 1
    assert chi_square_p_value(counts, P[0]) > 0.01, f"deterministic draft: {counts.tolist()}"
    bonus = torch.zeros(4)  # q == p: everything is accepted and the bonus token comes from p_2
    for _ in range(SAMPLES):
        d = torch.multinomial(P[0], 1, generator=g)
        a, token = accept_sampled(d, P[:1], P, g)
        assert int(a) == 1, "a draft sampled from q == p must always be accepted"
        bonus[int(token)] += 1
    assert chi_square_p_value(bonus, P[1]) > 0.01, f"bonus tokens {bonus.tolist()} do not follow p_2"


def wrong_ignores_q(draft, q, p, generator):  # accepts with probability p(d), as if q were one-hot
    return verify.accept_sampled(draft, None, p, generator)


def wrong_bonus(draft, q, p, generator):  # after full acceptance, samples the bonus from p_k, not p_{k+1}
    return verify.accept_sampled(draft, q, p[[0, 0]], generator)


def test_step3_reference():
    check_residual(verify.residual)
    check_accept_sampled(verify.accept_sampled)


def test_step3_learner_residual():
    run_check(check_residual, learner("step3_sampling").residual)


def test_step3_learner_accept_sampled():
    run_check(check_accept_sampled, learner("step3_sampling").accept_sampled)


@pytest.mark.parametrize("wrong", [wrong_ignores_q, wrong_bonus])
def test_step3_catches_a_wrong_rule(wrong):
    catches(check_accept_sampled, wrong)


def test_step3_catches_a_wrong_residual():
    catches(check_residual, lambda p, q: p)  # forgets to take q out
    catches(check_residual, lambda p, q: (p - q) / (p - q).sum())  # forgets max(0, .)


# Step 4: Jacobi iteration, against plain greedy decoding and minispec's jacobi_solve.

@pytest.fixture(scope="module")
def jacobi_model():
    return random_gpt(vocab_size=13, n_layer=2, block_size=48, seed=1, scale=3.0)


def check_jacobi(jacobi_decode, model):
    m = 10
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        prompt = torch.randint(13, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        greedy = minispec.generate(model, prompt, m).tokens
        init = torch.randint(13, (m,), generator=g).tolist()
        tokens, updates = jacobi_decode(model, prompt, m, init)
        assert list(tokens) == greedy, f"the fixed point {tokens} is not the greedy continuation {greedy}"
        assert updates == jacobi_solve(model, prompt, m, init)[1] and updates <= m, f"{updates} updates"
        assert tuple(jacobi_decode(model, prompt, m, greedy)) == (greedy, 0), "greedy is already the fixed point"


def wrong_jacobi(model, prompt, m, init):  # stops after one update: only the first token is sure by then
    n = len(prompt)
    logits, _ = model(torch.tensor([prompt + list(init)]), torch.arange(n + m), masks.causal(n + m))
    update = logits[0, n - 1:-1].argmax(-1).tolist()
    return update, int(update != list(init))


def test_step4_reference(jacobi_model):
    check_jacobi(jacobi_solve, jacobi_model)


def test_step4_learner(jacobi_model):
    run_check(check_jacobi, learner("step4_jacobi").jacobi_decode, jacobi_model)


def test_step4_catches_stopping_early(jacobi_model):
    catches(check_jacobi, wrong_jacobi, jacobi_model)


# Step 5: a skip set, ranked among every skip set of the same size.

N_SKIP = 3


def agreement(model, x, skip):
    T = x.size(1)
    pos, mask = torch.arange(T), masks.causal(T)
    with torch.no_grad():
        return float((model(x, pos, mask, skip=skip)[0].argmax(-1) == model(x, pos, mask)[0].argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def skip_setting(tiny, tiny_ckpt):
    """The test-preset target, held-out text, and the agreement of every skip set of N_SKIP sub-layers."""
    model, _ = tiny
    ids = np.load(next(tiny_ckpt.glob("tokens-val*.npy")))[:model.config.block_size]
    x = torch.tensor(ids.astype(np.int64))[None]
    every = [(layer, part) for layer in range(model.config.n_layer) for part in PARTS]
    scores = sorted(agreement(model, x, set(s)) for s in itertools.combinations(every, N_SKIP))
    return model, x, scores


def reference_pick_skip(model, x, n):
    """Greedy forward selection on agreement, with minispec's own skip= forward (layerskip.search
    selects the same way, but scores predicted tokens/s, which needs timing)."""
    skip = set()
    for _ in range(n):
        candidates = [(layer, part) for layer in range(model.config.n_layer) for part in PARTS
                      if (layer, part) not in skip]
        skip.add(max(candidates, key=lambda c: agreement(model, x, skip | {c})))
    return skip


def check_pick_skip(pick_skip, setting):
    model, x, scores = setting
    with torch.no_grad():
        chosen = {(int(layer), str(part)) for layer, part in pick_skip(model, x, N_SKIP)}
    assert len(chosen) == N_SKIP, f"expected {N_SKIP} distinct sub-layers, got {chosen}"
    assert all(0 <= layer < model.config.n_layer and part in PARTS for layer, part in chosen), chosen
    got = agreement(model, x, chosen)
    better = sum(s > got + 1e-9 for s in scores)
    assert better <= len(scores) // 10, (f"agreement {got:.3f}: {better} of {len(scores)} sets of {N_SKIP} do better "
                                         f"(best {scores[-1]:.3f}); aim for the top 10%")


def test_step5_reference(skip_setting):
    check_pick_skip(reference_pick_skip, skip_setting)


def test_step5_learner(skip_setting):
    run_check(check_pick_skip, learner("step5_skip").pick_skip, skip_setting)


def test_step5_catches_a_poor_set(skip_setting):
    catches(check_pick_skip, lambda model, x, n: {(0, "attn"), (0, "mlp"), (1, "attn")}, skip_setting)
