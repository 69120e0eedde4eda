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
fresh prefill would (tests/test_mask_drafter.py checks this). Under --k auto a step may draft
nothing; the tokens accepted meanwhile then go in first, as a plain prefill.

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

How it is trained (minispec/drafters/mask_training.py): on the target's own greedy continuations
and on corpus windows labelled with the target's greedy runs, starting from the trained draft
model.

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
[M]_i with i > 1 drafts without knowing d_1..d_{i-1}: one q_i must serve whichever tokens they
turn out to be, so its acceptance is capped by that of the best single q for all of them
(verify.best_overlap), a cap that a draft knowing them does not have (lesson 04 measures it).
Decoding picks the set by the temperature.
SpecDec's relaxed top-beta verification (`decode.py --beta 5 --margin 3`) is LOSSY: it changes
the output.
"""

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint, cudagraph, masks
from ..errors import MinispecError
from ..model import GPT
from ..speculative import Draft, Drafter, prefill

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
        self.caches = {}
        for net in (self.drafter, self.sampling_drafter):
            if net not in self.caches:
                self.caches[net] = cudagraph.cache_like(cache, net.gpt)
                self.prefill_cache(net, prompt[:-1], 0)
        self.fed = len(prompt) - 1  # the drafting set's cache holds seq[:fed]

    def prefill_cache(self, net, ids, start):
        """Tokens ids at positions start.. into net's cache, with their features and no [M]: the
        loop's plain prefill (speculative.prefill), through the drafter's own forward."""
        if ids:
            feats = self.feats[None, start:start + len(ids)] if self.features else None
            prefill(lambda idx, pos, mask, cache, slots: net(idx, feats, pos, pos[:0], mask, cache, slots),
                    self.caches[net], ids, start)

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
        if len(seq) - self.fed > self.k + 1:  # a backlog from steps that drafted nothing (--k auto):
            self.prefill_cache(self.net, seq[self.fed:-1], self.fed)  # all but x_t go in as a prefill,
            self.fed = len(seq) - 1  # so the recorded forward below meets no block size a fixed k does not
        new = seq[self.fed:]  # accepted tokens the cache lacks: those accepted last step, x_t among them
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
