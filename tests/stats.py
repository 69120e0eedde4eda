"""A chi-square goodness-of-fit test, with torch's regularised gamma for the p-value (no scipy)."""

import torch


def chi_square_p_value(counts, probs, min_expected=5.0):
    """p-value of observing `counts` (n,) when each draw falls in bin i with probability probs[i].

    Bins expected to hold fewer than min_expected draws are pooled into one, as the test needs.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    expected = probs / probs.sum() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a draw fell in a bin of probability zero"
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))
