"""Exercise step 2: greedy acceptance (lesson 03).

The target ran ONE forward over [x_t, d_1..d_k] and returned logits (k+1, V): row i is its
prediction after block token i, so row 0 judges d_1, row 1 judges d_2, ... and row k comes after
d_k. `python -m pytest -q tests/test_exercises.py -k step2` checks it. Reference: minispec/verify.py.
"""


def accept_greedy(draft, logits):
    """draft (k,) token ids, logits (k+1, V). Return (a, token), both ints:

    a: how many drafts were accepted: the longest PREFIX d_1..d_a in which each d_i is the argmax
       of row i-1 (a draft after the first mismatch never counts, even if it happens to match);
    token: the target's own token after them, the argmax of row a: the correction at the first
       mismatch, or the bonus token when all k were accepted.
    """
    raise NotImplementedError
