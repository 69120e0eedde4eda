"""Acceptance rules: which drafted tokens to keep, and the one token the target adds after them.

Pure functions over tensors, each tested on its own (tests/test_verify.py). Notation: drafts
d_1..d_k, the drafter's distributions q_1..q_k (None for a drafter that picks tokens
deterministically), the target's distributions p_1..p_{k+1} from ONE forward over [x_t, d_1..d_k].
Every rule returns (a, token): the number of accepted drafts and the correction (at the first
rejection) or bonus (after full acceptance) token from p_{a+1}.

- accept_greedy: lossless for greedy decoding.
- accept_sampled: speculative sampling (Leviathan et al. 2023; Chen et al. 2023), lossless for
  any temperature: the emitted tokens are distributed exactly as sampling from the target.
- accept_candidates: several candidate continuations of the same prefix (a draft tree, or
  Lookahead's n-grams), tried in turn (SpecInfer's multi-candidate rule); lossless.
- accept_top_beta: SpecDec's relaxed verification. LOSSY: it changes the output.
- accept_paths: a deterministic rule over several candidate paths (the longest accepted wins).
"""

import torch


def target_probs(logits, temperature, top_k=None):
    """Logits (..., V) -> the distribution decoding samples from: softmax(logits / T) over the
    top_k tokens. temperature 0 means greedy: a one-hot distribution on the argmax."""
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs, generator):
    """One token id per row of probs (..., V) -> (...,), drawn by inverting the cumulative sum: the
    first token whose cumulative probability passes u, a uniform number in [0, total). It needs one
    random number per row, where torch.multinomial draws one per vocabulary entry, which costs a
    CPU far more, and a sampled step draws up to k + 1 times. probs need not sum to 1, but every
    row must hold some probability. The sums run in float64, and u stays below the total; with
    right=True the search never stops at a token of probability 0, whose cumulative sum equals
    the one before it (summed in order, as on a CPU; a GPU's parallel sum may differ by a
    rounding)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (..., V)
    total = cdf[..., -1:]  # (..., 1)
    if not bool((total > 0).all()):  # also False for NaN
        raise ValueError("sample: a row with no probability to draw from")
    u = torch.rand(total.shape, generator=generator, dtype=cdf.dtype, device=cdf.device) * total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def accept_greedy(draft, logits):
    """draft (k,), target logits (k+1, V). Keep drafts while each equals the target's argmax."""
    best = logits.argmax(-1)  # (k+1,)
    a = int(torch.cumprod((draft == best[:-1]).int(), 0).sum()) if len(draft) else 0
    return a, int(best[a])


def accept_sampled(draft, q, p, generator):
    """Speculative sampling. draft (k,), q (k, V) the drafter's distributions (None: one-hot on
    each draft), p (k+1, V) the target's. Accept d_i with probability min(1, p_i(d_i) / q_i(d_i));
    at the first rejection emit a sample of norm(max(0, p_i - q_i)); after k acceptances a sample
    of p_{k+1}."""
    k = len(draft)
    u = torch.rand(k, generator=generator, device=p.device)
    for i in range(k):
        d = int(draft[i])
        q_d = 1.0 if q is None else q[i, d]
        if u[i] * q_d < p[i, d]:  # u < p/q without dividing by a zero q
            continue
        return i, int(sample(residual(p[i], point_mass(d, p[i]) if q is None else q[i]), generator))
    return k, int(sample(p[k], generator))


def point_mass(d, like):
    """The q of a draft chosen deterministically: one-hot on token d, shaped like `like` (V,)."""
    q = torch.zeros_like(like)
    q[d] = 1.0
    return q


def overlap(p, q):
    """sum_x min(p(x), q(x)) = 1 - TV(p, q) over the last dim: how often a draft sampled from q
    is accepted by accept_sampled against p, on average."""
    return torch.minimum(p, q).sum(-1)


def best_overlap(w, p):
    """The q a draft should be sampled from when it cannot know which of n situations it is in,
    and how often a draft from it is then accepted: situation j comes with probability w_j (n,)
    and the target's distribution p_j (rows of p, (n, V), each summing to 1; w >= 0). Returns
    (q (V,), sum_j w_j overlap(p_j, q)), the largest that sum can be over every q.

    A parallel drafter's later drafts are in this position: [M]_2 or head 2 drafts token t+2
    without knowing which token t+1 verification will accept. Cross-entropy training leads to
    the marginal sum_j w_j p_j, but the marginal is not the best q for acceptance: with w = (0.6,
    0.4) and two situations each sure of another token, the marginal is accepted 0.6 * 0.6 + 0.4
    * 0.4 = 0.52 of the time, and q on the likelier token 0.6.

    How: mass that q puts on token x, at a height where it is still under p_j(x) for some
    situations, gains the weight of those situations; above the highest p_j(x) it gains nothing.
    So at each x the n values p_j(x) cut q(x)'s height into pieces, each with a gain per unit of
    mass, falling from the bottom piece up. Choosing where q's mass of 1 goes is then a
    fractional knapsack: filling the pieces of every x in order of their gain, highest first, is
    optimal, and it fills each x from the bottom up, as it must. The pieces reach a height of
    sum_x max_j p_j(x) >= 1, so the mass always fits."""
    levels, order = p.sort(0, descending=True)  # (n, V): at each x, the p_j(x) from the highest down
    gain = w[order].cumsum(0)  # (n, V): the weight of the situations whose p_j(x) >= levels[i]
    height = levels - torch.cat([levels[1:], torch.zeros_like(levels[:1])])  # (n, V): piece i, up to levels[i]
    gain, height = gain.flatten(), height.flatten()
    token = torch.arange(p.size(1), device=p.device).repeat(p.size(0))  # (n V,) the x of each piece
    first = gain.argsort(descending=True)
    below = height[first].cumsum(0) - height[first]  # mass filled before each piece
    filled = (1 - below).clamp(min=0).minimum(height[first])  # (n V,) mass put in each piece
    q = torch.zeros(p.size(1), dtype=p.dtype, device=p.device).index_add_(0, token[first], filled)
    return q, (gain[first] * filled).sum()


def residual(p, q):
    """norm(max(0, p - q)) over the vocabulary (V,): what is sampled at a rejection. Where q is
    one-hot on the rejected draft, it is p with that token removed."""
    r = (p - q).clamp(min=0.0)
    return r / r.sum()


def accept_candidates(tokens, paths, p, generator):
    """Several deterministic candidates sharing the block's root, tried in turn (SpecInfer).

    tokens (T,) the block's tokens; paths: lists of block indices, each starting at the root 0;
    p (T, V) the target's distribution after each block token. Paths that agree token for token
    so far stand for the same text, so they are one node of a token tree (SpecInfer's merged
    tree): at the current node each distinct next token d is accepted with probability r(d), r
    starting as p there; a rejected d is zeroed out of r and r renormalised before the next one.
    Returns (path, token): the accepted block indices (root first, all from one path) and the
    token sampled after them.
    """
    prefix, alive = [0], list(paths)
    while True:
        depth, r, tried = len(prefix) - 1, p[prefix[-1]], set()
        for path in alive:
            if len(path) <= depth + 1 or int(tokens[path[depth + 1]]) in tried:
                continue
            d = int(tokens[path[depth + 1]])
            if torch.rand(1, generator=generator, device=p.device) < r[d]:
                break
            tried.add(d)
            r = residual(r, point_mass(d, r))  # d removed, the rest renormalised
        else:  # every next token rejected (or none left): emit from the residual
            return prefix, int(sample(r, generator))
        prefix = path[:depth + 2]  # the accepted path's own block entries (the same text as the others')
        alive = [other for other in alive if len(other) > depth + 1 and int(tokens[other[depth + 1]]) == d]


def accept_paths(rule, tokens, paths, logits):
    """A deterministic rule (accept_greedy, or top-beta) over several candidate paths: the longest
    accepted prefix wins, the first on ties. tokens (T,) the block, paths as in accept_candidates,
    logits (T, V). Returns (path, token) like accept_candidates."""
    chosen, token = None, None
    for path in paths:
        a, after = rule(tokens[path[1:]], logits[path])
        if chosen is None or a + 1 > len(chosen):
            chosen, token = path[:a + 1], after
    return chosen, token


def accept_greedy_paths(tokens, paths, logits):
    """Greedy over several candidate paths: the longest accepted prefix wins (the first on ties)."""
    return accept_paths(accept_greedy, tokens, paths, logits)


def accept_top_beta(draft, logits, beta, margin):
    """SpecDec's Spec-Verification (Xia et al. 2023). LOSSY unless beta == 1: accept d_i while it
    is among the target's top-beta tokens and log p(top-1) - log p(d_i) <= margin (SpecDec calls
    the margin tau; here tau is the tokens-per-forward metric); then emit the argmax. It trades
    exactness for longer accepted blocks."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (k+1, V)
    top = logp.topk(beta, dim=-1)
    a = 0
    while a < len(draft):
        d = int(draft[a])
        if d not in top.indices[a].tolist() or float(top.values[a, 0] - logp[a, d]) > margin:
            break
        a += 1
    return a, int(top.indices[a, 0])
