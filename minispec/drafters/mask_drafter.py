"""The [M]-token Spec-Drafter: k placeholder tokens, each its own query, one forward for k drafts.

Xia, Ge, Wang, Chen, Wei & Sui, "Speculative Decoding: Exploiting Speculative Execution for
Accelerating Seq2seq Generation" (SpecDec, Findings of EMNLP 2023). ALGORITHMS.md §3.

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

[M] embeddings: one learned vector per offset i (k_max of them), added to the position
embedding. An offset embedding tells [M]_i directly "you are i ahead", which a shallow drafter
cannot easily work out from absolute positions alone. Training always uses k_max = 12 [M]s;
decoding may use any k <= k_max (measured: with 4 or 8 [M]s instead of 12, the acceptance at
positions 1..k is unchanged, so seeing fewer [M]s costs nothing).

Training (train_mask_drafter): cut a sequence at a random length r, append k [M]s, and take the
cross-entropy of [M]_i against the token at r+i-1. One forward trains many cuts of the same
sequence (masks.mask_token_training): each group of k [M]s sees the prefix up to its own cut and
its own group. `teacher` is what the targets are: "corpus" (the training text) or "greedy" (the
target's own greedy continuations: sequence-level distillation, what verification will accept).
Glancing (GLAT, as in SpecDec's glat_loss.py), `glance=p`: a no-grad pass first; in each group
(#wrong * p) random [M]s are shown as their true tokens and the loss is taken on the others.
The drafter (2 layers, the target's width) starts from the target's embeddings, final norm and
lowest layers. `train_tiny.py --mask-teacher compare` trains all three and keeps the one with
the higher tau when greedy decoding is replayed on held-out text (mask_agreement). On the
default CPU checkpoint (two seeds, k=12): corpus 1.11 / 1.17, greedy 1.63 / 1.79, glancing
1.85 / 1.74. Distillation matters (a corpus-trained drafter almost never guesses past d_1: the
target's greedy text is not the corpus); glancing is within noise of plain distillation and
costs a third more time, so the default is "greedy".

What limits it here (measured): the tiny target falls into repetition loops
within a few tokens. An autoregressive drafter continues a loop by chaining its own guesses; an
[M] drafter must copy "the token i places after the loop's previous turn" for every i at once,
and two layers learn that only for loops they have seen often (a loop of docstring-quote
lines is drafted perfectly, a '**kwargs, ' loop is not). So d_1 and d_2 are accepted about a third of the time.

Sampling: q_i is the softmax of [M]_i's logits at the decoding temperature and d_i is drawn from
it, so speculative sampling keeps the target's distribution exactly. SpecDec's relaxed top-beta
verification (`decode.py --beta 5 --tau 3`) is LOSSY: it changes the output.
"""

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint, cudagraph, masks
from ..data import get_batch
from ..errors import MinispecError
from ..model import GPT, GPTConfig
from ..speculative import Draft, Drafter, prefill
from ..train import fit, greedy_continuations

TEACHERS = ("corpus", "greedy", "glancing")  # glancing: greedy targets, glancing on


class SpecDrafter(nn.Module):
    """A shallow GPT plus k_max learned [M] embeddings, [M]_i standing for "the token i ahead"."""

    def __init__(self, config, k_max):
        super().__init__()
        self.gpt = GPT(config)
        self.k_max = k_max
        self.mask_emb = nn.Parameter(0.02 * torch.randn(k_max, config.n_embd))  # (K, C)

    def forward(self, idx, pos, offsets, mask, cache=None, slots=None, reveal=None):
        """idx (B, n) prefix tokens, then one [M] per entry of offsets (m,) (i-1 for [M]_i);
        pos (n + m,) the positions of all of them; mask (n + m, S). reveal (B, m): a true token
        to show instead of the [M] (glancing), -1 for none. Returns the [M]s' logits (B, m, V)."""
        B, n = idx.shape
        wte, wpe = self.gpt.transformer.wte, self.gpt.transformer.wpe
        m = self.mask_emb[offsets].expand(B, -1, -1)  # (B, m, C)
        if reveal is not None:
            m = torch.where((reveal >= 0)[..., None], wte(reveal.clamp(min=0)), m)
        x = torch.cat([self.gpt.embed(idx, pos[:n]), m + wpe(pos[n:])], dim=1)  # (B, n + m, C)
        x = self.gpt.run_layers(x, mask, cache, slots)
        return self.gpt.head(x[:, n:])[0]  # the LM head on the [M] rows only


class MaskDrafter(Drafter):
    def __init__(self, drafter, k):
        if k > drafter.k_max:
            raise MinispecError(f"mask was trained for k up to {drafter.k_max}; k={k} asks for more")
        self.drafter, self.k = drafter, k

    def start(self, prompt, cache):
        self.cache = cudagraph.cache_like(cache, self.drafter.gpt)
        if len(prompt) > 1:  # prefix rows never see an [M]: the prompt is a plain prefill
            prefill(self.drafter.gpt, self.cache, prompt[:-1])
        self.fed = len(prompt) - 1  # the drafter's cache holds seq[:fed]

    def block_forward(self, idx, pos, mask, slots, offsets):
        """The accepted tokens idx (1, n) then len(offsets) [M]s, in one forward over the cache."""
        return (self.drafter(idx, pos, offsets, mask, self.cache, slots),)

    def propose(self, seq, room, sampling):
        k = min(self.k, room)
        if k <= 0:
            return Draft.chain([])
        device = self.cache.kv.device
        new = seq[self.fed:]  # accepted tokens the cache lacks: x_t and those accepted last step
        n = len(new)
        pos = torch.arange(self.fed, self.fed + n + k, device=device)  # [M]_i at t+i; slots == positions
        mask = masks.cached_block(self.fed, masks.mask_token_block(n, k, device), self.fed + n + k, device)
        offsets = torch.arange(k, device=device)  # [M]_i has offset i-1
        logits = cudagraph.run(self.cache, ("mask", id(self.drafter), k), self.block_forward,
                               torch.tensor([new], device=device), pos, mask, pos, offsets)[0][0]  # (k, V)
        self.fed = len(seq)  # the [M] entries at slots t+1..t+k are dead: next step overwrites them
        if sampling.temperature == 0:
            return Draft.chain(logits.argmax(-1))
        q = sampling.probs(logits)  # (k, V): each [M] has its own distribution
        return Draft.chain(torch.multinomial(q, 1, generator=sampling.generator).flatten(), q)


def drafter_config(target_config, n_layer):
    c = target_config
    return GPTConfig(c.block_size, c.vocab_size, n_layer, c.n_head, c.n_embd)


def make(model, ckpt=None, k=4, untrained=False):
    device = next(model.parameters()).device
    if untrained:
        torch.manual_seed(0)
        return MaskDrafter(SpecDrafter(drafter_config(model.config, 1), k).to(device).eval(), k)
    if ckpt is None:
        raise MinispecError("mask needs a trained [M]-token drafter: make one with `python train_tiny.py`")
    state = checkpoint.load(Path(ckpt) / "mask.pt", "mask", device)
    drafter = SpecDrafter(GPTConfig(**state["config"]), state["k_max"])
    drafter.load_state_dict(state["model"])
    return MaskDrafter(drafter.to(device).eval(), k)


def save_drafter(path, drafter, meta):
    checkpoint.save(path, "mask", config=asdict(drafter.gpt.config), k_max=drafter.k_max,
                    model=drafter.state_dict(), meta=meta)


def random_cuts(T, k, n_cuts, first, generator):
    """n_cuts distinct cut points r in first..T-k (a group at r predicts tokens r..r+k-1)."""
    return (torch.randperm(T - k + 1 - first, generator=generator)[:n_cuts] + first).sort().values


def mask_token_batch(x, cuts, k, start=0):
    """x (B, T) -> what one training forward needs: positions (T + m,), offsets (m,), mask,
    labels (B, m), m = len(cuts) * k. Group j's [M]_i sits at position r_j+i-1 and predicts x there."""
    T = x.size(1)
    offsets = torch.arange(k).repeat(len(cuts))  # (m,)
    at = cuts.repeat_interleave(k) + offsets  # (m,) the positions the [M]s stand for
    pos = torch.cat([torch.arange(T), at]).to(x.device) + start
    return pos, offsets.to(x.device), masks.mask_token_training(T, cuts.tolist(), k, x.device), x[:, at.to(x.device)]


def greedy_sequences(target, ids, n_seqs, seed, log):
    """The target's greedy continuations of corpus prefixes, one per row: (n_seqs, block_size)."""
    T = target.config.block_size
    flat = greedy_continuations(target, ids, n_seqs=n_seqs, seed=seed, log=log)
    return torch.as_tensor(flat.astype("int64")).view(n_seqs, T + 1)[:, :T]  # drop the end-of-text


def train_mask_drafter(target, train_ids, steps, batch_size, lr, teacher="greedy", k_max=12, n_layer=2,
                       n_cuts=8, n_seqs=128, glance=0.5, log=print, seed=0):
    """Train an [M]-token drafter for `target`; teacher is one of TEACHERS.

    Each step takes batch_size windows of half the context, at random offsets, with n_cuts groups
    of k_max [M]s each: about as many [M] rows as prefix rows, so most of a forward is supervised.
    """
    device = next(target.parameters()).device
    drafter = SpecDrafter(drafter_config(target.config, n_layer), k_max).to(device)
    with torch.no_grad():  # start from the target: embeddings, final norm, lowest layers
        drafter.gpt.transformer.wte.weight.copy_(target.transformer.wte.weight)
        drafter.gpt.transformer.wpe.weight.copy_(target.transformer.wpe.weight)
        drafter.gpt.transformer.ln_f.load_state_dict(target.transformer.ln_f.state_dict())
        for mine, theirs in zip(drafter.gpt.transformer.h, target.transformer.h):
            mine.load_state_dict(theirs.state_dict())
    T = target.config.block_size
    W = T // 2
    first = min(32, T // 4)  # cut after the corpus prefix greedy_continuations starts from
    generator = torch.Generator().manual_seed(seed)
    seqs = greedy_sequences(target, train_ids, n_seqs, seed, log) if teacher != "corpus" else None

    def batch_loss(step):
        if seqs is None:
            x, _ = get_batch(train_ids, batch_size, T, generator)
        else:
            x = seqs[torch.randint(len(seqs), (batch_size,), generator=generator)]
        start = int(torch.randint(T - W + 1, (1,), generator=generator))  # (B, W) at positions start..
        x = x[:, start:start + W].to(device)
        cuts = random_cuts(W, k_max, n_cuts, max(first - start, 1), generator)
        pos, offsets, mask, labels = mask_token_batch(x, cuts, k_max, start)
        reveal = None
        if teacher == "glancing":
            ratio = glance * (1 - 0.4 * step / steps)  # decays p -> 0.6 p (SpecDec: 0.5 -> 0.3)
            with torch.no_grad():
                wrong = (drafter(x, pos, offsets, mask).argmax(-1) != labels).view(batch_size, -1, k_max)
            shown = (wrong.sum(-1, keepdim=True) * ratio).round()  # (B, G, 1) [M]s to reveal per group
            rank = torch.rand(wrong.shape, generator=generator).to(device).argsort(-1).argsort(-1)
            reveal = torch.where((rank < shown).flatten(1), labels, -1)  # (B, m)
            labels = labels.masked_fill(reveal >= 0, -100)  # the loss is on the hidden [M]s only
        logits = drafter(x, pos, offsets, mask, reveal=reveal)  # (B, m, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    drafter.train()
    fit(drafter.parameters(), batch_loss, steps, lr, batch_size * (W + n_cuts * k_max),
        label=f"mask drafter ({teacher})", log=log)
    return drafter.eval()


@torch.no_grad()
def mask_agreement(drafter, target, ids, k=None, n_seqs=16, seed=1234):
    """Greedy decoding replayed on held-out greedy continuations of the target (what verification
    accepts): from the first cut on, each step accepts the leading run of right drafts plus one
    token. Returns (acceptance per position i, P(d_i right | d_1..d_{i-1} right); tau)."""
    seqs = greedy_sequences(target, ids, n_seqs, seed, log=lambda line: None)
    T, k = seqs.size(1), k or drafter.k_max
    device = next(drafter.parameters()).device
    tried, accepted, tokens, steps = torch.zeros(k), torch.zeros(k), 0, 0
    for x in seqs.to(device).split(1):
        right = []  # a drafting step at every cut, in chunks to bound the attention matrix
        for cuts in torch.arange(min(32, T // 4), T - k + 1).split(64):
            pos, offsets, mask, labels = mask_token_batch(x, cuts, k)
            right.append((drafter(x, pos, offsets, mask).argmax(-1) == labels).view(-1, k).cpu())
        right = torch.cat(right)  # (cuts, k)
        cut = 0
        while cut < len(right):
            run = int(right[cut].int().cumprod(0).sum())  # accepted drafts at this step
            tried[:min(run + 1, k)] += 1
            accepted[:run] += 1
            cut, tokens, steps = cut + run + 1, tokens + run + 1, steps + 1
    return (accepted / tried.clamp(min=1)).tolist(), tokens / steps
