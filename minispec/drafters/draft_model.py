"""The classic draft model: a separate small GPT proposes k tokens, the target verifies them.

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding" (2023);
Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling" (2023).
This is the reference baseline every other drafter is measured against.

Proposing: the draft model keeps its own static KV cache of the accepted sequence, filled with
the prompt by a prefill at the start. Each step it first feeds the accepted tokens it has not
seen yet (x_t, and the tokens accepted last step), then runs k-1 more one-token steps, each
feeding the draft it just made. For sampling, each draft is drawn from the draft model's
distribution q_i, which the loop needs for the acceptance test.

The cache hole: after a step in which all k drafts were accepted, the draft model never fed d_k
(it only needed d_1..d_{k-1} to produce d_k). `fed` counts how many tokens of the sequence its
cache holds correctly, so the next step feeds d_k along with the bonus token (gpt-fast does
the same).

Training (train_draft_model): on the corpus (plain language modelling), on the target's own
greedy continuations (sequence-level distillation), or on the target's full next-token
distributions over the corpus (token-level distillation). `train_tiny.py --draft-teacher compare`
trains all three and keeps the one whose greedy choice agrees most often with the target's.
Against the default CPU target the soft teacher's drafts agreed with the target most often on
held-out text, the greedy one least: the greedy continuations of a tiny target repeat
themselves, so a draft trained on them sees too little variety. "soft" is the default. The draft
starts from the target's embeddings, final norm and lowest layer (train.warm_start).
"""

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, cudagraph, masks
from ..errors import MinispecError
from ..model import GPT
from ..speculative import Draft, Drafter, prefill
from ..data import get_batch
from ..train import continuations, eval_lm, fit, train_lm, warm_start


class DraftModel(Drafter):
    def __init__(self, draft, k=4):
        self.draft = draft
        self.k = k
        self.drafted = 0  # drafts proposed in the step being verified

    def start(self, prompt, cache):
        self.cache = cudagraph.cache_like(cache, self.draft)
        if len(prompt) > 1:
            prefill(self.draft, self.cache, prompt[:-1])
        self.fed = len(prompt) - 1  # the draft cache holds seq[:fed]
        self.drafted = 0

    def _feed(self, ids, start):
        """Feed token ids at positions start.. (a draft, or the tokens accepted since the last drafting
        step: 1 or 2 when it drafts every step, more after steps that drafted nothing); return the
        draft's logits after the last one (V,). A longer backlog goes in as a prefill first, so
        that the forwards run through cudagraph (one recording per length) have 1 or 2 tokens."""
        if len(ids) > 2:
            prefill(self.draft, self.cache, ids[:-1], start)
            ids, start = ids[-1:], start + len(ids) - 1
        device = self.cache.kv.device
        n = len(ids)
        pos = torch.arange(start, start + n, device=device)
        mask = masks.cached_block(start, masks.causal(n), start + n, device)
        idx = torch.tensor([ids], device=device)
        logits, _ = cudagraph.forward(self.draft, idx, pos, mask, self.cache, pos)
        return logits[0, -1]

    def propose(self, seq, room, sampling):
        k = min(self.k, room)
        if k <= 0:
            return Draft.chain([])
        logits = self._feed(seq[self.fed:], self.fed)  # catch up, x_t included
        drafts, qs = [], []
        for i in range(k):
            d, q = sampling.draw(logits)  # (), (V,)
            drafts.append(int(d))
            qs.append(q)
            if i + 1 < k:
                logits = self._feed([drafts[-1]], len(seq) + i)
        self.fed = len(seq)  # x_t is in; the drafts fed are checked in observe
        self.drafted = k
        return Draft.chain(drafts, torch.stack(qs))

    def observe(self, step):
        # entries for d_1..d_{k-1} were fed; those on the accepted path are valid
        accepted = len(step.path) - 1
        self.fed += max(min(accepted, self.drafted - 1), 0)
        self.drafted = 0


def make(model, ckpt=None, k=4, untrained=False):
    device = next(model.parameters()).device
    if untrained:  # random weights: a deliberately poor drafter, for tests
        return DraftModel(GPT(replace(model.config, n_layer=1)).to(device).eval(), k)
    if ckpt is None:
        raise MinispecError("draft_model needs a trained checkpoint folder: make one with `python train_tiny.py`")
    path = Path(ckpt) / "draft_model.pt"
    draft = checkpoint.load_gpt(checkpoint.load(path, "draft_model", device, config=dict, model=dict), device, path)
    checkpoint.check_drafter(draft.config, model.config, path)
    return DraftModel(draft, k)


TEACHERS = ("corpus", "greedy", "soft")


def train_draft_model(target, train_ids, val_ids, steps, batch_size, lr, teacher="corpus", log=print, seed=0):
    """Train a draft model to imitate the target. teacher says what it learns from:
    "corpus": the next token of the training text (plain language modelling);
    "greedy": the target's own greedy continuations of corpus prefixes (sequence-level distillation);
    "soft": the target's whole next-token distribution on the corpus (token-level distillation)."""
    device = next(target.parameters()).device
    draft = warm_start(GPT(replace(target.config, n_layer=1)).to(device), target)  # as wide, one layer
    if teacher == "greedy":
        train_ids = continuations(target, train_ids, n_seqs=min(512, steps * batch_size // 2), log=log)
    if teacher in ("corpus", "greedy"):
        train_lm(draft, train_ids, val_ids, steps, batch_size, lr, seed, log, label=f"draft_model ({teacher})")
        return draft
    T = target.config.block_size
    pos, mask = torch.arange(T, device=device), masks.causal(T, device)
    generator = torch.Generator().manual_seed(seed)

    def batch_loss(step):
        x, _ = get_batch(train_ids, batch_size, T, generator)
        x = x.to(device)
        with torch.no_grad():
            p = torch.softmax(target(x, pos, mask)[0], -1)  # (B, T, V) the target's distributions
        return F.cross_entropy(draft(x, pos, mask)[0].flatten(0, 1), p.flatten(0, 1))  # = KL(p || q) + H(p)

    draft.train()
    fit(draft.parameters(), batch_loss, steps, lr, batch_size * T,
        val_loss=lambda: eval_lm(draft, val_ids, batch_size, T), label="draft_model (soft)", log=log)
    return draft.eval()
