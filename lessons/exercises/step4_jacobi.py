"""Exercise step 4: Jacobi iteration (lesson 06).

The m greedy tokens after a prompt x solve y_i = argmax p(. | x, y_<i). Jacobi iteration: run ONE
causal forward over [x, guess], replace every guess by the model's argmax at the position before
it, and repeat until the guess stops changing. `python -m pytest -q tests/test_exercises.py -k
step4` checks it. Reference: minispec/drafters/jacobi.py (jacobi_solve).

The model: logits, hidden = model(idx (1, T), pos (T,), mask (T, T)), with pos = torch.arange(T)
and mask = minispec.masks.causal(T) (or your own from step 1).
"""

import torch

from minispec import masks


@torch.no_grad()
def jacobi_decode(model, prompt, m, init):
    """prompt: list of token ids; init: m starting guesses. Return (tokens, updates):

    tokens: the fixed point (a list of m ints), which is the greedy continuation;
    updates: how many updates CHANGED the guess (0 when init already is the fixed point).
    """
    raise NotImplementedError
