"""What the tests share: tiny random models, prompts, hand-drawn masks, exact distributions,
a chi-square test (with torch's regularised gamma for the p-value: no scipy), and running the
top-level scripts as a user would. Test modules import from here, never from each other."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from minispec import masks
from minispec.model import GPT, GPTConfig
from minispec.speculative import generate

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args):
    """Run one of the top-level scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def random_gpt(vocab_size=11, n_layer=3, n_head=2, n_embd=16, block_size=32, seed=0, scale=1.0):
    """A random float32 GPT; scale > 1 sharpens its distributions (random init is near uniform)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size, vocab_size, n_layer, n_head, n_embd))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(scale)
    return model.eval()


def prompts(ckpt, n=20, seed=0):
    """n held-out windows of varied length from the checkpoint's validation tokens."""
    ids = np.load(next(ckpt.glob("tokens-val*.npy"))).astype(np.int64)
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(g.integers(2, 40))
        start = int(g.integers(0, len(ids) - length))
        out.append(ids[start:start + length].tolist())
    return out


def sampled_first_two(model, prompt, drafter, n, new_tokens=2):
    """Counts (V, V) of the first two tokens sampled (temperature 1, new_tokens in all) after prompt
    with seeds 0..n-1, and how many drafts were accepted on the way (a test whose drafts are never
    accepted proves little)."""
    V = model.config.vocab_size
    counts, accepted = torch.zeros(V, V), 0
    for seed in range(n):
        res = generate(model, prompt, new_tokens, drafter, temperature=1.0, seed=seed)
        counts[res.tokens[0], res.tokens[1]] += 1
        accepted += res.stats.accepted
    return counts, accepted


def exact_first_two(model, prompt):
    """P(x1, x2 | prompt) for every pair, from full forwards: a (V, V) table."""
    V = model.config.vocab_size
    with torch.no_grad():
        T = len(prompt)
        p1 = torch.softmax(model(torch.tensor([prompt]), torch.arange(T), masks.causal(T))[0][0, -1].double(), -1)
        ids = torch.tensor([prompt + [x] for x in range(V)])
        p2 = torch.softmax(model(ids, torch.arange(T + 1), masks.causal(T + 1))[0][:, -1].double(), -1)
    return p1[:, None] * p2


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


def drawn(picture):
    """A hand-drawn mask: rows of '1' (may attend) and '.' (may not)."""
    return torch.tensor([[c == "1" for c in row.split()] for row in picture.strip().splitlines()])


# The LookaheadDecoding README figure. Block: x_t (level 0, column 0), level 0 columns 1..4,
# level 1 columns 0..4, level 2 columns 0..4, then two 3-token n-grams.
# positions:   0 1 2 3 4   1 2 3 4 5   2 3 4 5 6   1 2 3   1 2 3
LOOKAHEAD_W5_N4_G2 = drawn("""
        1 . . . . . . . . . . . . . . . . . . . .
        1 1 . . . . . . . . . . . . . . . . . . .
        1 1 1 . . . . . . . . . . . . . . . . . .
        1 1 1 1 . . . . . . . . . . . . . . . . .
        1 1 1 1 1 . . . . . . . . . . . . . . . .
        1 . . . . 1 . . . . . . . . . . . . . . .
        1 1 . . . . 1 . . . . . . . . . . . . . .
        1 1 1 . . . . 1 . . . . . . . . . . . . .
        1 1 1 1 . . . . 1 . . . . . . . . . . . .
        1 1 1 1 1 . . . . 1 . . . . . . . . . . .
        1 . . . . 1 . . . . 1 . . . . . . . . . .
        1 1 . . . . 1 . . . . 1 . . . . . . . . .
        1 1 1 . . . . 1 . . . . 1 . . . . . . . .
        1 1 1 1 . . . . 1 . . . . 1 . . . . . . .
        1 1 1 1 1 . . . . 1 . . . . 1 . . . . . .
        1 . . . . . . . . . . . . . . 1 . . . . .
        1 . . . . . . . . . . . . . . 1 1 . . . .
        1 . . . . . . . . . . . . . . 1 1 1 . . .
        1 . . . . . . . . . . . . . . . . . 1 . .
        1 . . . . . . . . . . . . . . . . . 1 1 .
        1 . . . . . . . . . . . . . . . . . 1 1 1
    """)


# 3 prefix tokens, then 3 [M]s: prefix rows causal and blind to the [M]s; [M] rows see everything
M_BLOCK_3_3 = drawn("""
        1 . . . . .
        1 1 . . . .
        1 1 1 . . .
        1 1 1 1 1 1
        1 1 1 1 1 1
        1 1 1 1 1 1
    """)
