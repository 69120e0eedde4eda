"""Blockwise parallel decoding: k extra heads on the target's last hidden state ("shared attention").

Stern, Shazeer & Uszkoreit, "Blockwise Parallel Decoding for Deep Autoregressive Models"
(NeurIPS 2018); the head design of Medusa (Cai et al. 2024). ALGORITHMS.md §2.

The idea. The target's final hidden state h_t at the last accepted token already holds a lot
about the tokens after the next one. Train small heads on it: the model's own LM head predicts
x_{t+1} from h_t, extra head i predicts x_{t+1+i}. All heads read the SAME h_t, computed by ONE
attention pass of the target: that is the "shared attention" that sets this method apart from
the [M]-token drafter, where every drafted position has its own query.

    h_t ──► LM head  ──► x_{t+1}        (the target's own token: emitted by verification)
     ├───► head 1   ──► d_1 = x_{t+2}
     ├───► head 2   ──► d_2 = x_{t+3}
     └───► head k   ──► d_k = x_{t+k+1}

Predict, verify, accept, with combined scoring and proposal: the verification forward over
[x_t, d_1..d_k] already yields the target's hidden state at every block position. The hidden
state at the last ACCEPTED position is exactly h for the next step, so the next proposal costs
the heads only, never an extra target forward: one target call per step (observe() does it).
The very first step has no hidden state for x_t yet, so it proposes nothing.

The heads. Two forms are here, both on the target's frozen, shared vocabulary projection:
- "t2t" (default; tensor2tensor's transformer_parallel): one feed-forward layer of width k*4C
  produces k vectors at once, each added to h and layer-normalised.
- "medusa": head i is h + SiLU(W_i h + b_i), W_i zero-initialised so every head starts as the
  LM head itself.
On the default CPU checkpoint, 8 heads trained 150 steps on greedy continuations agreed with the
target's greedy tokens 66-73% of the time per head in the t2t form and 53-65% in the Medusa
form (head_agreement on held-out text): the t2t form's wide shared layer is worth its cost.

Training (train_heads): the target is frozen; heads learn with cross-entropy to predict
token t+1+i from h_t. What they learn from (`teacher`): the corpus shifted by i+1, or the
target's own greedy continuations (self-distillation, which matches what decoding will see).
`train_tiny.py --heads-teacher compare` trains both and keeps the one with the higher measured
agreement with the target's greedy choices.

Sampling: a head's softmax (at the decoding temperature) is q, the distribution its draft is
drawn from; speculative sampling then keeps the target's distribution exactly.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint, masks
from ..data import get_batch
from ..errors import MinispecError
from ..speculative import Draft, Drafter
from ..train import fit, greedy_continuations


class MedusaHeads(nn.Module):
    def __init__(self, n_embd, n_heads):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(n_embd, n_embd) for _ in range(n_heads))
        for p in self.proj:
            nn.init.zeros_(p.weight)  # each head starts as the identity: the LM head's own guess

    def forward(self, h):  # h (..., C) -> (n_heads, ..., C)
        return torch.stack([h + F.silu(p(h)) for p in self.proj])


class T2THeads(nn.Module):
    def __init__(self, n_embd, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.up = nn.Linear(n_embd, n_heads * 4 * n_embd)
        self.down = nn.Linear(n_heads * 4 * n_embd, n_heads * n_embd)
        self.ln = nn.LayerNorm(n_embd)

    def forward(self, h):  # h (..., C) -> (n_heads, ..., C)
        out = self.down(F.relu(self.up(h))).unflatten(-1, (self.n_heads, -1))  # (..., n_heads, C)
        return self.ln(h.unsqueeze(-2) + out).movedim(-2, 0)


FORMS = {"t2t": T2THeads, "medusa": MedusaHeads}
TEACHERS = ("corpus", "greedy")


def head_logits(heads, target, hidden):
    """hidden (..., C) the target's final hidden states -> (n_heads, ..., V) via the shared LM head."""
    return target.lm_head(heads(hidden))


class Blockwise(Drafter):
    def __init__(self, target, heads, k):
        if k > heads_count(heads):
            raise MinispecError(f"blockwise was trained with {heads_count(heads)} heads; k={k} asks for more")
        self.target, self.heads, self.k = target, heads, k
        self.hidden = None  # the target's hidden state at the last accepted token

    def start(self, prompt, cache):
        self.hidden = None

    def propose(self, seq, room, sampling):
        k = min(self.k, room)
        if self.hidden is None or k <= 0:
            return Draft.chain([])
        logits = head_logits(self.heads, self.target, self.hidden)[:k]  # (k, V)
        if sampling.temperature == 0:
            return Draft.chain(logits.argmax(-1))
        q = sampling.probs(logits)  # (k, V)
        return Draft.chain(torch.multinomial(q, 1, generator=sampling.generator).flatten(), q)

    def observe(self, step):
        self.hidden = step.hidden[step.path[-1]]  # (C,): the verification forward already computed it


def heads_count(heads):
    return len(heads.proj) if isinstance(heads, MedusaHeads) else heads.n_heads


def save_heads(path, heads, meta):
    form = next(name for name, cls in FORMS.items() if isinstance(heads, cls))
    checkpoint.save(path, "blockwise", form=form, n_heads=heads_count(heads), heads=heads.state_dict(), meta=meta)


def make(model, ckpt=None, k=4, untrained=False):
    device = next(model.parameters()).device
    if untrained:  # random heads: a deliberately poor drafter, for tests
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return Blockwise(model, T2THeads(model.config.n_embd, k).to(device).eval(), k)
    if ckpt is None:
        raise MinispecError("blockwise needs trained heads: make them with `python train_tiny.py`")
    state = checkpoint.load(Path(ckpt) / "blockwise.pt", "blockwise", device)
    heads = FORMS[state["form"]](model.config.n_embd, state["n_heads"])
    heads.load_state_dict(state["heads"])
    return Blockwise(model, heads.to(device).eval(), k)


def heads_loss(heads, target, x, y, generator):
    """Mean cross-entropy of the heads: head i at position t predicts x[t + 2 + i] = y[t + 1 + i].

    x (B, T) token ids and y (B, T) the same shifted by one. The heads' vocabulary projections
    dominate the cost, so they are scored on a random quarter of the positions only.
    """
    B, T = x.shape
    n = heads_count(heads)
    with torch.no_grad():
        _, hidden = target(x, torch.arange(T, device=x.device), masks.causal(T, x.device))  # (B, T, C)
    t = torch.randperm(T - n - 1, generator=generator)[: T // 4].to(x.device)  # (P,) positions scored
    logits = head_logits(heads, target, hidden[:, t])  # (n, B, P, V)
    labels = torch.stack([y[:, t + 1 + i] for i in range(n)])  # (n, B, P)
    return F.cross_entropy(logits.flatten(0, 2), labels.flatten())


@torch.no_grad()
def head_agreement(heads, target, ids, batch_size=8, batches=4, seed=1234):
    """Per head: how often its argmax equals the target's greedy token that far ahead, on
    held-out windows where the target generated the text itself (as it does while decoding)."""
    target_ids = greedy_continuations(target, ids, n_seqs=batch_size * batches, batch_size=batch_size,
                                      seed=seed, log=lambda line: None)
    T = target.config.block_size
    n = heads_count(heads)
    same, count = torch.zeros(n), torch.zeros(n)
    for b in range(batches):
        x = torch.as_tensor(target_ids[b * batch_size * (T + 1):(b + 1) * batch_size * (T + 1)].astype("int64"))
        x = x.view(batch_size, T + 1)[:, :T].to(next(target.parameters()).device)
        _, hidden = target(x, torch.arange(T, device=x.device), masks.causal(T, x.device))
        guess = head_logits(heads, target, hidden).argmax(-1)  # (n, B, T)
        start = T // 4  # score only the generated part, past the corpus prefix
        for i in range(n):
            shift = i + 2
            same[i] += (guess[i, :, start:T - shift] == x[:, start + shift:]).float().sum().item()
            count[i] += guess[i, :, start:T - shift].numel()
    return (same / count).tolist()


def train_heads(target, train_ids, n_heads, steps, batch_size, lr, teacher="greedy", form="t2t",
                log=print, seed=0):
    """Train n_heads heads on the frozen target. teacher: "corpus" or "greedy" (self-distillation)."""
    device = next(target.parameters()).device
    target.requires_grad_(False)  # the base stays frozen; only the heads learn
    heads = FORMS[form](target.config.n_embd, n_heads).to(device)
    if teacher == "greedy":  # about one generated sequence per two training windows
        train_ids = greedy_continuations(target, train_ids, n_seqs=min(512, steps * batch_size // 2), log=log)
    T = target.config.block_size
    generator = torch.Generator().manual_seed(seed)

    def batch_loss(step):
        x, y = get_batch(train_ids, batch_size, T, generator)
        return heads_loss(heads, target, x.to(device), y.to(device), generator)

    fit(heads.parameters(), batch_loss, steps, lr, batch_size * T, label=f"blockwise heads ({teacher})", log=log)
    target.requires_grad_(True)
    return heads.eval()
