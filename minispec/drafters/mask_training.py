"""Training the [M]-token Spec-Drafter (minispec/drafters/mask_drafter.py), and measuring it.

Xia, Ge, Wang, Chen, Wei & Sui, "Speculative Decoding: Exploiting Speculative Execution for
Accelerating Seq2seq Generation" (SpecDec, Findings of EMNLP 2023): the drafter is trained by
distillation from the target, here as follows.

Training (train_mask_drafter): cut a sequence at a random length r, append k [M]s, and take the
cross-entropy of [M]_i against what verification would accept there: the token the target
writes at r+i-1 after the prefix, greedily. One forward trains many cuts of the same sequence
(masks.mask_token_training): each group of k [M]s sees the prefix up to its own cut and its own
group. The prefix rows get a next-token loss against the target too (prefix_loss): they are
computed anyway, and [M]_1's row starts from the last one. Half of each batch (teacher "greedy")
is the target's own greedy continuations of corpus prefixes (sequence-level distillation:
online, the drafter reads exactly such text, loops included). The other half is corpus windows:
every prefix row learns the target's next-token distribution there, and every [M] of a cut at r
the target's greedy run after that prefix (train.greedy_runs). "glancing" adds GLAT's glancing
(SpecDec's glat_loss.py): in each group (#wrong * p) random [M]s are shown as their true tokens
and the loss is taken on the others; "corpus" trains on corpus windows alone. A second layer
would double the drafting cost, which every step pays.

The first draft, d_1, is the one every step needs, and a classic draft model gets it right more
often: it learns the target's whole next-token distribution at every position of the corpus.
Measured at every cut of the benchmark's text, the drafter's own last prefix row (a plain
next-token row) did no better than [M]_1, so the gap was what the labels taught, not the [M]
query. So [M]_1 also learns the target's whole distribution at its cut (first_soft), and the
drafter starts from the trained draft model (start_from): a one-layer GPT of the same shape
that already reads x_t the way d_1 needs, where the target's lowest layer only begins to.

The sampling set (teacher "sampled") learns from the target's continuations sampled at SAMPLE_T,
every row against the target's full distribution for the token it stands for (mask_drafter.py
says why decoding keeps two sets). mask_agreement and mask_overlap measure a trained set the
way decoding uses it: greedy acceptance replayed on held-out continuations, and 1 - TV(p, q_i)
on sampled ones.
"""

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import masks
from ..data import get_batch
from ..train import SAMPLE_T, continuations, fit, greedy_runs, warm_start
from ..verify import overlap
from .mask_drafter import SpecDrafter, target_outputs

TEACHERS = ("corpus", "greedy", "glancing", "sampled")  # glancing: greedy targets, glancing on; sampled: below


def random_cuts(T, k, n_cuts, generator):
    """n_cuts distinct cut points r in 1..T-k (a group at r predicts tokens r..r+k-1)."""
    return (torch.randperm(T - k, generator=generator)[:n_cuts] + 1).sort().values


def mask_token_batch(x, cuts, k, start=0):
    """x (B, T) -> what one training forward needs: positions (T + m,), offsets (m,), mask,
    labels (B, m), m = len(cuts) * k. Group j's [M]_i sits at position r_j+i-1 and predicts x there."""
    T = x.size(1)
    offsets = torch.arange(k).repeat(len(cuts))  # (m,)
    at = cuts.repeat_interleave(k) + offsets  # (m,) the positions the [M]s stand for
    pos = torch.cat([torch.arange(T), at]).to(x.device) + start
    return pos, offsets.to(x.device), masks.mask_token_training(T, cuts.tolist(), k, x.device), x[:, at.to(x.device)]


def target_sequences(target, ids, n_seqs, seed, log, temperature=0.0):
    """The target's greedy (or sampled) continuations of corpus prefixes, one per row: (n_seqs, block_size)."""
    T = target.config.block_size
    flat = continuations(target, ids, n_seqs=n_seqs, seed=seed, temperature=temperature, log=log)
    return torch.as_tensor(flat.astype("int64")).view(n_seqs, T + 1)[:, :T]  # drop the end-of-text


def target_labels(x, y, cuts, k):
    """What verification would accept from each [M]: x (B, W) text, y (B, W) the target's greedy
    next tokens. [M]_i at cut r stands for the token the target writes at r+i-1 after its own
    greedy text from r on: y at r+i-2, known only while x[r..r+i-2] IS its greedy text (always
    in a greedy continuation; in corpus text, where it predicted the corpus right). Others: -100.
    Returns (B, len(cuts) * k)."""
    at = cuts.repeat_interleave(k) + torch.arange(k).repeat(len(cuts))  # (m,) the positions stood for
    r = cuts.repeat_interleave(k)
    off = F.pad((x[:, 1:] != y[:, :-1]).int().cumsum(1), (1, 0))  # (B, W) tokens before j not greedy
    greedy_run = off[:, at - 1] == off[:, r - 1]  # x[r..at-1) all greedy
    return y[:, at - 1].masked_fill(~greedy_run, -100)


SOFT_TOP = 32  # the target's distributions are kept as their top 32 tokens, renormalised


@torch.no_grad()
def target_soft(target, x, batch=32):
    """What the target says on texts x (n, T), in batches: features (n, T, C) and its next-token
    distributions as the top SOFT_TOP probabilities (renormalised) and their token ids, (n, T, SOFT_TOP)."""
    out = []
    for xb in x.split(batch):
        f, logits = target_outputs(target, xb)
        p, top = torch.softmax(logits, -1).topk(SOFT_TOP, -1)
        out.append((f, p / p.sum(-1, keepdim=True), top))
    return tuple(torch.cat(z) for z in zip(*out))


def soft_windows(target, ids, n, generator):
    """n corpus windows (n, T) and what the target says on them (target_soft)."""
    x = get_batch(ids, n, target.config.block_size, generator)[0].to(next(target.parameters()).device)
    return (x, *target_soft(target, x))


def soft_cross_entropy(logits, p, top):
    """Cross-entropy of logits (..., V) against a distribution given by its top tokens: p, top (..., K)."""
    return -(p * F.log_softmax(logits, -1).gather(-1, top)).sum(-1)


def train_mask_drafter(target, train_ids, steps, batch_size, lr, teacher="greedy", k_max=12, n_layer=1,
                       n_cuts=16, n_seqs=384, glance=0.5, prefix_loss=1.0, features=False, soft_rows=0.5,
                       n_windows=512, first_soft=2.0, start_from=None, log=print, seed=0):
    """Train an [M]-token drafter for `target`; teacher is one of TEACHERS.

    Each step takes batch_size windows of half the context, at random offsets, with n_cuts groups
    of k_max [M]s each: about as many [M] rows as prefix rows, so most of a forward is supervised.
    features=False trains SpecDec's token-only drafter: the feature projection is zero and frozen,
    so the target's features never reach it (same checkpoint format, same decoding code).
    soft_rows: the share of each batch (with the greedy teachers) taken from n_windows corpus
    windows, computed once, with the target's next-token distribution (its top SOFT_TOP tokens)
    as the label of every prefix row and its greedy run after the cut as the labels of the [M]s.
    first_soft: the weight of a second loss on [M]_1, the cross-entropy to the target's whole
    next-token distribution at its cut, as the draft model learns (in both halves of a batch).
    start_from: a one-layer GPT of the drafter's shape to start from (train_tiny.py passes the
    trained draft model); None starts from the target's lowest layer (train.warm_start).
    """
    device = next(target.parameters()).device
    drafter = SpecDrafter(replace(target.config, n_layer=n_layer), k_max).to(device)
    if start_from is None:
        warm_start(drafter.gpt, target)
    else:
        drafter.gpt.load_state_dict(start_from.state_dict())
    if not features:
        nn.init.zeros_(drafter.fuse.weight)
        nn.init.zeros_(drafter.fuse.bias)
        drafter.fuse.requires_grad_(False)  # fit() leaves parameters without gradients alone
    T = target.config.block_size
    W = T // 2
    generator = torch.Generator().manual_seed(seed)
    if teacher == "sampled":  # continuations sampled from the target
        seqs = target_sequences(target, train_ids, n_seqs, seed, log, temperature=SAMPLE_T).to(device)
    elif teacher != "corpus":  # the target's greedy continuations and what it says on them, computed once
        seqs = target_sequences(target, train_ids, n_seqs, seed, log).to(device)
        seq_feats, seq_p, seq_top = target_soft(target, seqs)  # (N, T, C), (N, T, SOFT_TOP) twice
    n_soft = 0 if teacher in ("corpus", "sampled") else min(round(batch_size * soft_rows), batch_size - 1)
    n_windows = min(n_windows, steps * n_soft)  # never more windows than the steps will draw
    if n_soft:
        corpus = soft_windows(target, train_ids, n_windows, generator)
        log(f"mask drafter: the target's greedy runs after every prefix of {n_windows} corpus windows")
        corpus_runs = greedy_runs(target, corpus[0], k_max)  # (n_windows, T, k_max): every [M]'s label

    def sampled_loss():
        """Every row learns the target's distribution of the token it stands for, given the sampled
        text before that token: the prefix rows their next token's, [M]_i at cut r that of the
        token at r+i-1 (the distribution computed at the row before it). Averaged over the sampled
        text, and so over the tokens between the cut and that token, which [M]_i does not see,
        the cross-entropy is least at their marginal; the q accepted most often is another
        (verify.best_overlap), but 1 - overlap as the loss, which aims at it, did no better in
        decoding (README, "Training toward the best q"). The whole distribution, computed for each
        batch: sampled text is where the target is unsure, and its top SOFT_TOP tokens leave much
        of the mass out there."""
        x = seqs[torch.randint(len(seqs), (batch_size,), generator=generator).to(device)]  # (B, T)
        f, logits = target_outputs(target, x)  # (B, T, C), (B, T, V)
        start = int(torch.randint(T - W + 1, (1,), generator=generator))
        p = torch.softmax(logits[:, start:start + W], -1)  # (B, W, V)
        f = f[:, start:start + W]  # (B, W, C)
        x = x[:, start:start + W]
        pos, offsets, mask, _ = mask_token_batch(x, random_cuts(W, k_max, n_cuts, generator), k_max, start)
        before = pos[W:] - start - 1  # (m,) the row whose distribution each [M] learns
        logits = drafter(x, f, pos, offsets, mask, every_row=True)  # (B, W + m, V)
        return (F.cross_entropy(logits[:, W:].flatten(0, 1), p[:, before].flatten(0, 1))
                + prefix_loss * F.cross_entropy(logits[:, :W].flatten(0, 1), p.flatten(0, 1)))

    def batch_loss(step):
        if teacher == "sampled":
            return sampled_loss()
        if teacher == "corpus":
            x = get_batch(train_ids, batch_size, T, generator)[0].to(device)
            f, p, top = target_soft(target, x)  # (B, T, C) features, (B, T, SOFT_TOP) its distributions
        else:
            rows = torch.randint(len(seqs), (batch_size - n_soft,), generator=generator).to(device)
            x, f, p, top = seqs[rows], seq_feats[rows], seq_p[rows], seq_top[rows]
        start = int(torch.randint(T - W + 1, (1,), generator=generator))  # (B, W) at positions start..
        x, f, p, top = (z[:, start:start + W] for z in (x, f, p, top))
        y = top[..., 0]  # (B, W) the target's greedy next tokens
        cuts = random_cuts(W, k_max, n_cuts, generator)
        pos, offsets, mask, _ = mask_token_batch(x, cuts, k_max, start)
        first = cuts.to(device) - 1  # (n_cuts,) the row of each group's x_t, whose distribution [M]_1 learns

        def first_loss(logits, p, top, shown=None):
            """[M]_1 of every group (B, n_cuts) against the target's distribution at its cut; not where shown."""
            loss = soft_cross_entropy(logits[:, W:][:, offsets == 0], p[:, first], top[:, first])
            return first_soft * (loss.mean() if shown is None else loss[~shown].sum() / max(int((~shown).sum()), 1))

        labels = target_labels(x, y, cuts, k_max)
        reveal = None
        if teacher == "glancing":
            ratio = glance * (1 - 0.4 * step / steps)  # decays p -> 0.6 p (SpecDec: 0.5 -> 0.3)
            with torch.no_grad():
                guess = drafter(x, f, pos, offsets, mask).argmax(-1)  # (B, m)
                wrong = ((guess != labels) & (labels >= 0)).view(len(x), -1, k_max)  # (B, G, k_max)
            shown = (wrong.sum(-1, keepdim=True) * ratio).round()  # (B, G, 1) [M]s to reveal per group
            rank = torch.rand(wrong.shape, generator=generator).to(device).argsort(-1).argsort(-1)
            reveal = torch.where((rank < shown).flatten(1), labels, -1)  # (B, m)
            labels = labels.masked_fill(reveal >= 0, -100)  # the loss is on the hidden [M]s only
        logits = drafter(x, f, pos, offsets, mask, reveal=reveal, every_row=True)  # (B, W + m, V)
        loss = F.cross_entropy(logits[:, W:].flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss = loss + prefix_loss * F.cross_entropy(logits[:, :W].flatten(0, 1), y.flatten())
        loss = loss + first_loss(logits, p, top, None if reveal is None else reveal[:, offsets == 0] >= 0)
        if not n_soft:
            return loss
        rows = torch.randint(n_windows, (n_soft,), generator=generator).to(device)
        cx, cf, cp, ci = (z[rows, start:start + W] for z in corpus)
        last = start + cuts.repeat_interleave(k_max).to(device) - 1  # (m,) where each [M]'s group x_t sits
        run_labels = corpus_runs[rows[:, None], last, offsets]  # (n_soft, m) what the target writes from there on
        logits = drafter(cx, cf, pos, offsets, mask, every_row=True)
        soft = F.cross_entropy(logits[:, W:].flatten(0, 1), run_labels.flatten())
        soft = soft + prefix_loss * soft_cross_entropy(logits[:, :W], cp, ci).mean() + first_loss(logits, cp, ci)
        return (loss * len(x) + soft * n_soft) / batch_size

    drafter.train()
    fit(drafter.parameters(), batch_loss, steps, lr, batch_size * (W + n_cuts * k_max),
        label=f"mask drafter ({teacher})", log=log)
    return drafter.eval()


@torch.no_grad()
def right_at_cuts(drafter, target, x, first, k):
    """Whether each [M] is right at every cut of greedy text x (1, T) from `first` on: a drafting
    step with the prefix x[:r], checked against x itself -> (cuts, k) bool. In chunks of 64 cuts
    to bound the attention matrix."""
    f = target_outputs(target, x)[0]  # (1, T, C)
    right = []
    for cuts in torch.arange(first, x.size(1) - k + 1).split(64):
        pos, offsets, mask, labels = mask_token_batch(x, cuts, k)
        right.append((drafter(x, f, pos, offsets, mask).argmax(-1) == labels).view(-1, k).cpu())
    return torch.cat(right)


@torch.no_grad()
def mask_overlap(drafter, target, ids, temperature=SAMPLE_T, n_seqs=16, k=4, seed=1234):
    """(k,): the mean of 1 - TV(p, q_i) over every cut of held-out continuations sampled at
    `temperature`, q_i being [M]_i's distribution at that temperature and p the target's for the
    token it stands for, given the sampled tokens before it: how often a sampled d_i is accepted
    when the drafts before it were."""
    seqs = target_sequences(target, ids, n_seqs, seed, log=lambda line: None, temperature=temperature)
    T, first = seqs.size(1), min(32, seqs.size(1) // 4)
    total = torch.zeros(k)
    for x in seqs.to(next(drafter.parameters()).device).split(1):
        f, logits = target_outputs(target, x)  # (1, T, C), (1, T, V)
        p = torch.softmax(logits[0] / temperature, -1)
        for cuts in torch.arange(first, T - k + 1).split(64):
            pos, offsets, mask, _ = mask_token_batch(x, cuts, k)
            q = torch.softmax(drafter(x, f, pos, offsets, mask)[0] / temperature, -1)  # (m, V)
            total += overlap(p[pos[T:] - 1], q).view(-1, k).sum(0).cpu()  # p of the token at pos from the row before
    return (total / (n_seqs * (T - k + 1 - first))).tolist()


@torch.no_grad()
def mask_agreement(drafter, target, ids, k=None, n_seqs=16, seed=1234):
    """Greedy decoding replayed on held-out greedy continuations of the target (what verification
    accepts): from the first cut on, each step accepts the leading run of right drafts plus one
    token. Returns (acceptance per position i, P(d_i right | d_1..d_{i-1} right); tau)."""
    seqs = target_sequences(target, ids, n_seqs, seed, log=lambda line: None)
    T, k = seqs.size(1), k or drafter.k_max
    device = next(drafter.parameters()).device
    tried, accepted, tokens, steps = torch.zeros(k), torch.zeros(k), 0, 0
    for x in seqs.to(device).split(1):
        right = right_at_cuts(drafter, target, x, min(32, T // 4), k)  # (cuts, k)
        cut = 0
        while cut < len(right):
            run = int(right[cut].int().cumprod(0).sum())  # accepted drafts at this step
            tried[:min(run + 1, k)] += 1
            accepted[:run] += 1
            cut, tokens, steps = cut + run + 1, tokens + run + 1, steps + 1
    return (accepted / tried.clamp(min=1)).tolist(), tokens / steps
