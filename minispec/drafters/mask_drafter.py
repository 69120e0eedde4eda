"""The [M]-token Spec-Drafter: k placeholder tokens, each its own query, one forward for k drafts.

Xia, Ge, Wang, Chen, Wei & Sui, "Speculative Decoding: Exploiting Speculative Execution for
Accelerating Seq2seq Generation" (SpecDec, Findings of EMNLP 2023).

The idea. A separate, small drafter reads the accepted prefix followed by k [M] placeholders at
positions t+1..t+k; the output at [M]_i is its guess d_i for the token i places ahead. Every
[M] is its own query in every layer, with its own attention over the prefix and the other [M]s:
the "distinct attention" that sets this method apart from blockwise heads, where all k guesses
read the same hidden state. The k drafts come out of ONE drafter forward, not k of them.

SpecDec's drafter is an encoder-decoder that re-reads the whole prefix every step. This one is a
decoder that keeps a KV cache, which the mask makes possible (masks.mask_token_block):

         p1 p2 p3 M1 M2 M3       prefix rows are causal and never see an [M]: their keys and
     p1   1  .  .  .  .  .       values are what a plain prefill gives, so they stay cached;
     p2   1  1  .  .  .  .       every [M] row sees the whole prefix and all the [M]s.
     p3   1  1  1  .  .  .
     M1   1  1  1  1  1  1
     M2   1  1  1  1  1  1
     M3   1  1  1  1  1  1

Proposing: each step feeds the tokens accepted since the last step (x_t at least) AND the k [M]s
in one forward at slots fed..t+k. The [M]s' entries land in slots t+1..t+k; they are never kept:
no later row sees them (a prefix row only sees slots before its own) and next step's accepted
tokens overwrite them. So after every step the cache holds the accepted prefix exactly as a
fresh prefill would (tests/test_mask_drafter.py checks this).

Optionally (features=True), the target's features, EAGLE-style (Li et al., ICML 2024): prefix
row j also reads fuse(h_{j-1}), the target's final hidden state that predicted x_j. They cost
nothing while decoding: verification returns h at x_t and every accepted draft (Step.hidden);
only the prompt's take one extra target forward (start). The default trains without them
(fuse stays zero, and decoding then neither computes nor reads them), as SpecDec's drafter
reads tokens only: measured, it generalises better.

[M] embeddings: one learned vector per offset i (k_max of them), added to the position
embedding AND to the input of the last prefix row (wte(x_t) + fuse(h_{t-1})): every [M] query
starts from what the drafter knows about x_t, as every Medusa head starts from h_t. Without
that anchor one layer cannot bring x_t into the [M] rows and d_1 stays near a quarter.
Training always uses k_max = 12 [M]s; decoding may use any k <= k_max.

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

Online equals replay: the drafts decoding makes with its cache are the drafts a from-scratch
forward over the same prefix gives (tests/test_mask_drafter.py checks it step by step), so where
the drafter does worse on the benchmark's prompts than on held-out continuations, it generalises
badly; there is no decoding bug. What it misses (lesson 05 counts it at every cut, per prompt)
are long-period loops the target falls into ("CUT_CUT"): one layer drafting x_{t+2} without
seeing x_{t+1} cannot chain next-token guesses as a draft model does; it must have seen the
two-step pattern as a label, which the greedy runs after every corpus prefix provide.

Sampling: q_i is the softmax of [M]_i's logits at the decoding temperature and d_i is drawn from
it, so speculative sampling keeps the target's distribution exactly. A sampled d_i is accepted
with probability 1 - TV(p, q_i) on average, so q_i must be close to the target's whole
distribution, not just share its top token: the greedy set's q_i are spikes. So a checkpoint
holds two sets of weights, as blockwise heads do: the greedy set above, and a sampling set
(teacher "sampled") trained on the target's continuations sampled at SAMPLE_T, every row against
the target's full distribution for the token it stands for. It starts from the draft model too,
whose q is already close to p: it needs far fewer steps than from the target's lowest layer.
[M]_i with i > 1 drafts without knowing d_1..d_{i-1}, so the best it can match is that token's
distribution averaged over them (lesson 04 measures how low that ceiling is). Decoding picks the
set by the temperature.
SpecDec's relaxed top-beta verification (`decode.py --beta 5 --margin 3`) is LOSSY: it changes
the output.
"""

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint, cudagraph, masks
from ..data import get_batch
from ..errors import MinispecError
from ..model import GPT
from ..speculative import Draft, Drafter
from ..train import SAMPLE_T, continuations, fit, greedy_runs, warm_start
from ..verify import overlap

TEACHERS = ("corpus", "greedy", "glancing", "sampled")  # glancing: greedy targets, glancing on; sampled: below


class SpecDrafter(nn.Module):
    """A shallow GPT plus k_max learned [M] embeddings, [M]_i standing for "the token i ahead",
    and a projection of the target's features into the prefix rows."""

    def __init__(self, config, k_max):
        super().__init__()
        self.gpt = GPT(config)
        self.k_max = k_max
        self.mask_emb = nn.Parameter(0.02 * torch.randn(k_max, config.n_embd))  # (K, C)
        self.fuse = nn.Linear(config.n_embd, config.n_embd)  # the target's h_{j-1} -> prefix row j

    def forward(self, idx, feats, pos, offsets, mask, cache=None, slots=None, reveal=None, every_row=False):
        """idx (B, n) prefix tokens and feats (B, n, C) the target's final hidden state at the token
        before each (target_outputs; None: no features, for a set trained without them), then one
        [M] per entry of offsets (m,) (i-1 for [M]_i); pos (n + m,) the positions of all of them;
        mask (n + m, S). reveal (B, m): a true token to show instead of the [M] (glancing), -1 for
        none. Returns the [M]s' logits (B, m, V), or with every_row the logits of all n + m rows
        (training's next-token loss on the prefix)."""
        B, n = idx.shape
        wte, wpe = self.gpt.transformer.wte, self.gpt.transformer.wpe
        m = self.mask_emb[offsets].expand(B, -1, -1)  # (B, m, C)
        if reveal is not None:
            m = torch.where((reveal >= 0)[..., None], wte(reveal.clamp(min=0)), m)
        inputs = wte(idx) if feats is None else wte(idx) + self.fuse(feats)  # (B, n, C) each token with its feature
        last = pos[n:] - offsets - 1 - pos[0]  # (m,) [M]_i at t+i follows the prefix token at t
        x = torch.cat([inputs + wpe(pos[:n]), m + inputs[:, last] + wpe(pos[n:])], dim=1)  # (B, n + m, C)
        x = self.gpt.run_layers(x, mask, cache, slots)
        return self.gpt.head(x if every_row else x[:, n:])[0]  # usually the LM head on the [M] rows only


@torch.no_grad()
def target_outputs(target, x):
    """The target's causal forward over x (B, T) -> the features of the tokens (B, T, C): at j, its
    final hidden state at token j-1 (the one that predicted x_j), zeros at j = 0 where there is
    none; and its logits (B, T, V)."""
    T = x.size(1)
    logits, hidden = target(x, torch.arange(T, device=x.device), masks.causal(T, x.device))  # (B, T, V), (B, T, C)
    return F.pad(hidden[:, :-1], (0, 0, 1, 0)), logits


class MaskDrafter(Drafter):
    """drafter for greedy decoding, sampling_drafter (default: the same) when sampling."""

    def __init__(self, target, drafter, k, sampling_drafter=None):
        self.sampling_drafter = drafter if sampling_drafter is None else sampling_drafter
        k_max = min(drafter.k_max, self.sampling_drafter.k_max)
        if k > k_max:
            raise MinispecError(f"mask was trained for k up to {k_max}; k={k} asks for more")
        self.target, self.drafter, self.k = target, drafter, k
        config = drafter.gpt.config
        self.feats = torch.zeros(config.block_size, config.n_embd, device=drafter.mask_emb.device)  # (S, C)
        # sets trained without features have a zero projection: then none are computed or read (same drafts)
        self.features = any(bool(net.fuse.weight.any() or net.fuse.bias.any())
                            for net in (drafter, self.sampling_drafter))

    def start(self, prompt, cache):
        """The prompt's features, for sets that read them: one extra target forward over the prompt
        (generate's prefill keeps only keys and values); every later feature comes free with
        verification (observe).
        Then the prompt, x_t aside, goes into each set's own cache: a prefill with no [M]. Only
        one set drafts in a call (the temperature decides which), and only its cache is kept up."""
        if self.features:
            ids = torch.tensor([prompt], device=self.feats.device)
            self.feats[:len(prompt)] = target_outputs(self.target, ids)[0][0]
        n = len(prompt) - 1
        pos = torch.arange(n, device=self.feats.device)
        self.caches = {}
        for net in (self.drafter, self.sampling_drafter):
            if net not in self.caches:
                self.caches[net] = cudagraph.cache_like(cache, net.gpt)
                if n:
                    net(torch.tensor([prompt[:-1]], device=pos.device), self.feats[None, :n] if self.features else None,
                        pos, pos[:0], masks.causal(n, pos.device), self.caches[net], pos)
        self.fed = n  # the drafting set's cache holds seq[:fed]

    def observe(self, step):
        """The verification forward's hidden states at x_t and the accepted drafts are the
        features of the tokens after them: the accepted drafts and the bonus token."""
        if self.features:
            self.feats[step.start + 1:step.start + 1 + len(step.path)] = step.hidden[step.path]

    def block_forward(self, idx, pos, mask, slots, offsets, feats=None):
        """The accepted tokens idx (1, n) with their features (1, n, C) if any, then len(offsets)
        [M]s, in one forward over the drafter's cache -> the [M]s' logits (1, m, V)."""
        return (self.net(idx, feats, pos, offsets, mask, self.cache, slots),)

    def propose(self, seq, room, sampling):
        k = min(self.k, room)
        self.drafting = None  # (block mask, tokens) of this step's drafter forward, for reports to draw
        if k <= 0:
            return Draft.chain([])
        self.net = self.sampling_drafter if sampling.temperature else self.drafter
        self.cache = self.caches[self.net]
        device = self.cache.kv.device
        new = seq[self.fed:]  # accepted tokens the cache lacks: x_t and those accepted last step
        n = len(new)
        pos = torch.arange(self.fed, self.fed + n + k, device=device)  # [M]_i at t+i; slots == positions
        block = masks.mask_token_block(n, k, device)  # (n + k, n + k)
        self.drafting = block.cpu(), new
        mask = masks.cached_block(self.fed, block, self.fed + n + k, device)
        offsets = torch.arange(k, device=device)  # [M]_i has offset i-1
        feats = (self.feats[None, self.fed:len(seq)],) if self.features else ()  # (1, n, C)
        logits = cudagraph.run(self.cache, ("mask", id(self.net), k), self.block_forward,
                               torch.tensor([new], device=device), pos, mask, pos, offsets, *feats)[0][0]  # (k, V)
        self.fed = len(seq)  # the [M] entries at slots t+1..t+k are dead: next step overwrites them
        return Draft.chain(*sampling.draw(logits))  # q (k, V): each [M] has its own distribution


def make(model, ckpt=None, k=4, untrained=False):
    device = next(model.parameters()).device
    if untrained:
        return MaskDrafter(model, SpecDrafter(replace(model.config, n_layer=1), k).to(device).eval(), k)
    if ckpt is None:
        raise MinispecError("mask needs a trained [M]-token drafter: make one with `python train_tiny.py`")
    path = Path(ckpt) / "mask.pt"
    state = checkpoint.load(path, "mask", device, config=dict, k_max=int, model=dict, sampling_model=dict)
    config = checkpoint.gpt_config(state["config"], path)
    checkpoint.check_drafter(config, model.config, path)
    greedy, sampling = (checkpoint.load_weights(SpecDrafter(config, max(state["k_max"], 1)), state[name], path)
                        .to(device).eval() for name in ("model", "sampling_model"))
    return MaskDrafter(model, greedy, k, sampling)


def save_drafter(path, drafter, sampling_drafter, meta):
    """Both sets in one file: `model` drafts when decoding greedily, `sampling_model` when sampling."""
    checkpoint.save(path, "mask", config=asdict(drafter.gpt.config), k_max=drafter.k_max,
                    model=drafter.state_dict(), sampling_model=sampling_drafter.state_dict(), meta=meta)


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
        text, that is the marginal a draft made without the drafts before it can best match. The
        whole distribution, computed for each batch: sampled text is where the target is unsure,
        and its top SOFT_TOP tokens leave much of the mass out there."""
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
