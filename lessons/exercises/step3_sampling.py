"""Exercise step 3: speculative sampling (lesson 03).

The drafter SAMPLED d_i from its distribution q_i; the target's distributions are p_1..p_{k+1}.
Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection emit a sample of
the residual norm(max(0, p_i - q_i)) and stop; if all k are accepted, emit a bonus sample of
p_{k+1}. Then the emitted tokens are distributed exactly as sampling the target itself.
`python -m pytest -q tests/test_exercises.py -k step3` checks it with a chi-square test.
Reference: minispec/verify.py (accept_sampled).
"""

import torch


def residual(p, q):
    """p (V,), q (V,) distributions -> the residual distribution norm(max(0, p - q)) (V,)."""
    raise NotImplementedError


def accept_sampled(draft, q, p, generator):
    """draft (k,) token ids, q (k, V) the drafter's distributions, or None when the drafter picked
    its tokens deterministically (then q_i is one-hot on d_i), p (k+1, V) the target's.

    Return (a, token), both ints: the number of accepted drafts and the token sampled after them.
    Draw every random number from `generator` (torch.rand(..., generator=generator),
    torch.multinomial(..., generator=generator)) so that runs are reproducible.
    """
    raise NotImplementedError
