"""Consistency training (CLLM): trajectories end at greedy decoding, the loss vanishes at the
fixed point, and the tuned target is as lossless a target as any."""

import copy
import re
import shutil

import numpy as np
import pytest
import torch

import minispec
from minispec import checkpoint, masks
from minispec.drafters.consistency import (FAST_FORWARDED, GUARANTEED, STATIONARY, consistency_loss,
                                           jacobi_counts, jacobi_trajectories, save_plain_target, tune_consistency)
from minispec.drafters.jacobi import jacobi_solve
from minispec.speculative import generate
from tests.helpers import chi_square_p_value, exact_first_two, prompts, run_script, sampled_first_two

N, BLOCKS, PROMPT_LEN = 8, 3, 12


def token_ids(ckpt, split):
    return np.load(next(ckpt.glob(f"tokens-{split}*.npy"))).astype(np.int64)


@pytest.fixture(scope="module")
def trajectories(tiny, tiny_ckpt):
    model, _ = tiny
    val = token_ids(tiny_ckpt, "val")
    starts = np.arange(6) * 500
    windows = torch.from_numpy(val[starts[:, None] + np.arange(PROMPT_LEN)])  # (6, PROMPT_LEN)
    return jacobi_trajectories(model, windows, N, BLOCKS, seed=1)


def test_trajectories_end_at_the_greedy_fixed_point(tiny, trajectories):
    model, _ = tiny
    for row, seq in enumerate(trajectories.seq.tolist()):
        prompt = seq[:PROMPT_LEN]
        assert seq[PROMPT_LEN:] == generate(model, prompt, N * BLOCKS).tokens
        for block in range(BLOCKS):
            states = trajectories.states[block][:, row]  # (J + 1, N)
            prefix = trajectories.prefix(block)[row].tolist()
            assert set(states[0].tolist()) <= set(prompt)  # the initial guess: tokens of the prompt
            assert torch.equal(states[-1], trajectories.fixed_point(block)[row])
            steps = int(trajectories.steps[block, row])
            assert jacobi_solve(model, prefix, N, init=states[0].tolist()) == (states[-1].tolist(), steps)
            assert 0 < steps <= N and not torch.equal(states[steps - 1], states[-1])  # J: the first state at y*


def test_jacobi_counts_by_hand():
    states = torch.tensor([[9, 9, 3, 9],  # state 0: token 2 right by chance
                           [1, 9, 3, 9],  # iteration 1: token 0 (guaranteed); token 2 still right
                           [1, 2, 3, 4]])[:, None]  # iteration 2: 1 guaranteed, 2 stationary, 3 fast-forwarded
    iterations, how = jacobi_counts(states)
    assert iterations.tolist() == [2] and how.tolist() == [[GUARANTEED, GUARANTEED, STATIONARY, FAST_FORWARDED]]


def test_shared_prefix_branches_equal_separate_causal_forwards(tiny, trajectories):
    model, _ = tiny
    prefix = trajectories.prefix(1)[:2]  # (2, T)
    a, b = trajectories.fixed_point(1)[:2], trajectories.states[1][0, :2]  # (2, N) each
    T = prefix.size(1)
    packed = model(torch.cat([prefix, a, b], 1), torch.cat([torch.arange(T + N), torch.arange(T, T + N)]),
                   masks.shared_prefix(T, N, 2))[0]
    for i, block in enumerate((a, b)):
        alone = model(torch.cat([prefix, block], 1), torch.arange(T + N), masks.causal(T + N))[0]
        assert torch.allclose(packed[:, T + i * N:T + (i + 1) * N], alone[:, T:], atol=1e-5)
    assert torch.allclose(packed[:, :T], alone[:, :T], atol=1e-5)


def test_loss_is_zero_at_the_fixed_point_and_positive_elsewhere(tiny, trajectories):
    model, _ = tiny
    original = copy.deepcopy(model)
    block = 1
    prefix, fixed = trajectories.prefix(block), trajectories.fixed_point(block)  # (B, T), (B, N)
    at_fixed = fixed[:, None].repeat(1, 2, 1)  # (B, 2, N): every state already its fixed point
    consistency, ar = consistency_loss(model, original, prefix, at_fixed, fixed)
    assert consistency.item() == 0.0 and abs(ar.item()) < 1e-5
    states = trajectories.states[block][:2].transpose(0, 1)  # (B, 2, N) the first two states of each row
    consistency, ar = consistency_loss(model, original, prefix, states, fixed)  # the negative control
    assert consistency.item() > 0.1 and abs(ar.item()) < 1e-5


@pytest.fixture(scope="module")
def tuned(tiny, tiny_ckpt):
    """The test checkpoint's target, consistency-tuned for a few steps."""
    model, _ = tiny
    tuned = copy.deepcopy(model)
    result = tune_consistency(tuned, token_ids(tiny_ckpt, "train"), token_ids(tiny_ckpt, "val"), steps=20,
                              n_prompts=32, batch_size=8, log=lambda line: None)
    assert result["before"]["iterations"] > 0 and result["after"]["val_loss"] > 0
    changed = any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), model.parameters()))
    assert changed, "tuning changed no weight"
    return tuned


@pytest.mark.parametrize("method", ["jacobi", "lookahead"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_tuned_target_greedy_identical(method, k, tuned, tiny_ckpt):
    drafter = minispec.make_drafter(method, tuned, k=k)
    accepted = 0
    for prompt in prompts(tiny_ckpt, n=10):
        res = generate(tuned, prompt, 48, drafter)
        assert res.tokens == generate(tuned, prompt, 48).tokens, f"{method} k={k} on the tuned target"
        accepted += res.stats.accepted
    assert accepted > 0


def test_tuned_target_sampling_keeps_its_distribution(tuned, tiny_ckpt):
    """Chi-square on the first two sampled tokens of the tuned target, Jacobi drafting."""
    prompt = prompts(tiny_ckpt, n=1)[0]
    prompt = prompt + generate(tuned, prompt, 8).tokens  # into the greedy text, where copies of x_t get accepted
    counts, accepted = sampled_first_two(tuned, prompt, minispec.make_drafter("jacobi", tuned, k=2), 2000)
    assert accepted > 0
    assert chi_square_p_value(counts, exact_first_two(tuned, prompt)) > 0.01


def test_lesson_06_shows_the_trajectory_before_and_after(tuned, tiny, tiny_ckpt, tmp_path):
    model, tok = tiny
    for f in tiny_ckpt.glob("tokens-*.npy"):
        shutil.copy(f, tmp_path)
    save_plain_target(tmp_path, model)
    checkpoint.save_target(tmp_path, tuned, tok, checkpoint.target_meta(tiny_ckpt))
    proc = run_script("lessons/06_jacobi_and_lookahead.py", "--ckpt", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("target before tuning", "consistency-tuned target"):
        assert re.search(rf"^  {name}: \d+ iterations to the fixed point of 16 tokens", proc.stdout, re.M)
