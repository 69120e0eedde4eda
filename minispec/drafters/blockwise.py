"""Blockwise parallel decoding: k extra heads on the target's last hidden state ("shared attention").

Stern, Shazeer & Uszkoreit, "Blockwise Parallel Decoding for Deep Autoregressive Models"
(NeurIPS 2018); the head form and the candidate tree of Medusa (Cai et al. 2024).

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
[x_t, drafts] already yields the target's hidden state at every block position. The hidden
state at the last ACCEPTED position is exactly h for the next step, so the next proposal costs
the heads only, never an extra target forward: one target call per step (observe() does it).
The very first step has no hidden state for x_t yet, so it proposes nothing.

The heads. Head i maps (h, e) to h + W_i [h; e] + b_i and then through the target's own (tied,
frozen) vocabulary projection, where e holds the embeddings of the newest N_TOKENS tokens:
x_{t+1} (the target's own choice after h_t, known when the heads run) and the 4 before it. W_i
starts at zero, so every head starts as the LM head. All k heads are ONE batched matmul, a
fraction of a one-token target forward (greedy decoding runs only the heads its tree reads). Why
this form, measured by tau while building it: the target's greedy text falls into loops
("tititi", "_CUT_CUT"), and a LINEAR head that sees the newest tokens can copy a token it sees,
which generalises to tokens it rarely trained on; Medusa's h + SiLU(W h) block (the SiLU zeroes
half its inputs), a head that reads h alone and a two-layer head all accepted fewer drafts, and
the tensor2tensor form (one shared feed-forward layer of width k*4C, three times the target's
size) cost more per proposal than the forward it saves. More distinct greedy continuations to
learn from raised tau more than more steps on the same ones.

The tree (greedy decoding). A head's second or third choice is often right when its first is
not, so instead of one chain the drafter proposes a small tree of the heads' top choices and
the ONE verification forward scores all of it (each node sees the prefix, the root and its
ancestors; its position is t + depth). A node is a tuple of ranks (r_1..r_d): head j's r_j-th
choice at depth j. As Medusa does, the tree keeps the `tree_size` nodes with the highest
estimated chance of being accepted, prod_j acc[j, r_j], where acc[i, r] is how often head i's
r-th choice was the target's greedy token on held-out text (measured after training, saved with
the heads). On a CPU a block is NOT free: a fixed cost per forward plus a cost per block token,
so the default tree is small (8 nodes): larger trees raise tau but not the speed.

Training (train_heads): the target is frozen; heads learn to predict token t+1+i from h_t.
What they learn from (`teacher`): the corpus or the target's own greedy continuations
(self-distillation: what greedy verification accepts, and the better teacher), with
cross-entropy to the window's next token; or the target's whole next-token distribution there
as the label, on its greedy continuations ("soft") or on continuations sampled from it
("sampled"). The target's hidden states are computed once for the whole training set, so a step
costs the heads and the vocabulary projection only. `train_tiny.py --heads-teacher compare`
trains every teacher and keeps the best for greedy decoding.

Sampling: a sampled draft d ~ q is accepted with probability min(1, p(d) / q(d)), on average
sum_x min(p(x), q(x)) = 1 - TV(p, q). Heads trained on hard greedy labels put q's mass on the
greedy token where the target spreads it, and are rarely accepted. So a checkpoint holds TWO
sets of heads: the greedy set, and a sampling set trained on sampled continuations against the
target's distributions ("sampled"), whose q is close to p (head_overlap measures 1 - TV on
held-out sampled text). With sampling the drafter uses the sampling set and proposes one chain
(the tree is for greedy decoding), each head's softmax at the decoding temperature being q, the
distribution its draft is drawn from; speculative sampling then keeps the target's distribution
exactly.
"""

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint, masks
from ..errors import MinispecError
from ..speculative import Draft, Drafter
from ..train import SAMPLE_T, continuations, fit
from ..verify import overlap

TEACHERS = ("corpus", "greedy", "soft", "sampled")
RANKS = 4  # the tree draws on each head's top RANKS tokens
N_TOKENS = 5  # the heads see the embeddings of the newest 5 tokens besides h_t


class Heads(nn.Module):
    """n_heads heads, head i: (h, e) -> h + W_i [h; e] + b_i, all computed in one batched matmul.

    h is the target's final hidden state at x_t; e the embeddings of the last n_tokens tokens,
    newest first: x_{t+1} (the target's own choice after h), x_t, ... W_i starts at zero, so every
    head starts as the LM head itself."""

    def __init__(self, n_embd, n_heads, n_tokens=N_TOKENS):
        super().__init__()
        self.n_tokens = n_tokens
        self.weight = nn.Parameter(torch.zeros(n_heads, (1 + n_tokens) * n_embd, n_embd))
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, n_embd))

    def forward(self, h, e, n=None):  # h (..., C), e (..., n_tokens, C) -> (n, ..., C): the first n heads
        C, n = h.size(-1), len(self.weight) if n is None else n
        x = torch.cat([h, e.flatten(-2)], -1).reshape(1, -1, self.weight.size(1))  # (1, N, (1+n_tokens)C)
        out = h.reshape(1, -1, C) + torch.baddbmm(self.bias[:n], x.expand(n, -1, -1), self.weight[:n])
        return out.view(n, *h.shape)


def head_logits(heads, target, hidden, tokens, n=None):
    """hidden (..., C) the target's final hidden states, tokens (..., n_tokens) the target's next token
    there, then the ones before it -> (n, ..., V) for the first n heads (default all) through the
    target's own vocabulary projection."""
    return target.lm_head(heads(hidden, target.transformer.wte(tokens), n))


def tree_nodes(acc, k, size):
    """The `size` most promising rank tuples of depth <= k, parents before children (by depth).

    acc (n_heads, RANKS): acc[i, r] how often head i's r-th choice is right. A node's score is
    the product of acc along it; a parent never scores below its child, so the set is a tree."""
    nodes, frontier = [], [((), 1.0)]
    while frontier and len(nodes) < size:  # best-first search over rank tuples
        node, score = max(frontier, key=lambda f: f[1])
        frontier.remove((node, score))
        if node:
            nodes.append(node)
        if len(node) < k:
            frontier += [(node + (r,), score * float(acc[len(node), r])) for r in range(acc.size(1))]
    return sorted(nodes, key=len)


def tree_draft(nodes):
    """nodes from tree_nodes -> (Draft with placeholder tokens, (n,) head index, (n,) rank) of each
    node: the tree's shape, fixed for a drafter; each step only fills in the tokens."""
    index = {node: i + 1 for i, node in enumerate(nodes)}  # block index; the root x_t is 0
    index[()] = 0
    mask = masks.tree([index[node[:-1]] for node in nodes])  # each node sees the root and its ancestors
    leaves = [node for node in nodes if not any(other[:-1] == node for other in nodes)]
    paths = [[0] + [index[leaf[:d]] for d in range(1, len(leaf) + 1)] for leaf in leaves]
    depth = torch.tensor([len(node) for node in nodes], dtype=torch.long)  # (n,)
    rank = torch.tensor([node[-1] for node in nodes], dtype=torch.long)  # (n,)
    return Draft(torch.zeros_like(depth), depth, mask, paths or [[0]]), depth - 1, rank


class Blockwise(Drafter):
    """heads for greedy decoding, sampling_heads (default: the same) when sampling."""

    def __init__(self, target, heads, acc, tree_size, sampling_heads=None):
        self.target, self.heads, self.k = target, heads, len(heads.weight)
        self.sampling_heads = sampling_heads or heads
        # the best tree of each depth up to k: a step with less room (or a shorter chosen draft) gets
        # the best shallower tree, not the deep one cut short
        self.trees = [None] + [tree_draft(tree_nodes(acc, depth, tree_size)) for depth in range(1, self.k + 1)]
        # how many heads each tree reads: tree_size nodes reach at most tree_size deep, so a tree
        # allowed deeper is no deeper, and the heads past its depth need not run
        self.heads_read = [0] + [max(tree.depth.tolist(), default=0) for tree, _, _ in self.trees[1:]]
        self.hidden = None  # the target's hidden state at the last accepted token

    def start(self, prompt, cache):
        self.hidden = None

    def propose(self, seq, room, sampling):
        if self.hidden is None or room <= 0:
            return Draft.chain([])
        recent = seq[:-self.heads.n_tokens - 1:-1]  # x_{t+1}, x_t, ... newest first
        recent += recent[-1:] * (self.heads.n_tokens - len(recent))  # a short prompt: repeat its first token
        tokens = torch.tensor(recent, device=self.hidden.device)  # (n_tokens,)
        k = min(self.k, room)
        if sampling.temperature == 0:  # the best tree of depth k
            tree, node_head, node_rank = self.trees[k]
            logits = head_logits(self.heads, self.target, self.hidden, tokens, self.heads_read[k])  # (n, V)
            top = logits.topk(RANKS, -1).indices.cpu()  # (n, RANKS) n <= k
            return replace(tree, tokens=top[node_head, node_rank])
        logits = head_logits(self.sampling_heads, self.target, self.hidden, tokens, k)  # (k, V)
        return Draft.chain(*sampling.draw(logits))  # q (k, V): each head's own

    def observe(self, step):
        self.hidden = step.hidden[step.path[-1]]  # (C,): the verification forward already computed it


def save_heads(path, heads, acc, sampling_heads, meta):
    checkpoint.save(path, "blockwise", n_heads=len(heads.weight), n_tokens=heads.n_tokens,
                    heads=heads.state_dict(), acc=acc, sampling_heads=sampling_heads.state_dict(), meta=meta)


def make(model, ckpt=None, k=4, untrained=False, tree_size=8):
    """k: heads used (the tree's depth). tree_size: drafted tokens per step with greedy decoding."""
    device = next(model.parameters()).device
    if untrained:  # random heads: a deliberately poor drafter, for tests
        heads = Heads(model.config.n_embd, k)
        nn.init.normal_(heads.weight, std=0.5)
        acc = 0.5 ** torch.arange(1, RANKS + 1).repeat(k, 1)  # (k, RANKS) a made-up accuracy
        return Blockwise(model, heads.to(device).eval(), acc, tree_size)
    if ckpt is None:
        raise MinispecError("blockwise needs trained heads: make them with `python train_tiny.py`")
    path = Path(ckpt) / "blockwise.pt"
    state = checkpoint.load(path, "blockwise", device, n_heads=int, n_tokens=int, heads=dict, acc=torch.Tensor,
                            sampling_heads=dict)
    if k > state["n_heads"]:
        raise MinispecError(f"blockwise was trained with {state['n_heads']} heads; k={k} asks for more")
    if state["n_tokens"] < 1 or tuple(state["acc"].shape) != (state["n_heads"], RANKS):
        raise MinispecError(f"{path}: its head accuracies do not match its {state['n_heads']} heads")
    sets = []
    for name in ("heads", "sampling_heads"):
        heads = Heads(model.config.n_embd, k, state["n_tokens"])  # the first k heads; the target's width
        sets.append(checkpoint.load_weights(heads, {n: w[:k] for n, w in state[name].items()}, path).to(device).eval())
    return Blockwise(model, sets[0], state["acc"][:k].cpu(), tree_size, sets[1])


def recent_positions(t, n):
    """t (P,) positions -> (P, n) the positions of the tokens the heads see there: t+1, t, ..., t+2-n."""
    return (t[:, None] + 1 - torch.arange(n, device=t.device)).clamp(min=0)


@torch.no_grad()
def hidden_states(target, seqs, batch_size=32):
    """seqs (N, T) token ids -> (N, T, C) the frozen target's final hidden states."""
    T = seqs.size(1)
    pos, mask = torch.arange(T, device=seqs.device), masks.causal(T, seqs.device)
    return torch.cat([target(x, pos, mask)[1] for x in seqs.split(batch_size)])


def training_windows(target, ids, n_seqs, teacher, seed):
    """(N, T) windows to learn from, and the first position whose labels are all worth learning:
    the corpus, or the target's own continuations of corpus prefixes (labels past the prefix),
    greedy or, for "sampled", sampled at SAMPLE_T."""
    T = target.config.block_size
    device = next(target.parameters()).device
    if teacher != "corpus":
        prefix = min(32, T // 4)  # continuations' default prefix
        seqs = continuations(target, ids, n_seqs=n_seqs, seed=seed, temperature=SAMPLE_T * (teacher == "sampled"),
                             log=lambda line: None)
        return torch.as_tensor(seqs.astype("int64")).view(n_seqs, T + 1)[:, :T].to(device), prefix - 1
    starts = torch.randint(len(ids) - T, (n_seqs,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([torch.as_tensor(ids[s:s + T].astype("int64")) for s in starts.tolist()]).to(device), 0


@torch.no_grad()
def head_accuracy(heads, target, ids, n_seqs=64, new_tokens=128, seed=1234):
    """(n_heads, RANKS): how often head i's r-th choice is the target's greedy token i+2 ahead, over
    the first new_tokens generated tokens of held-out greedy continuations (as while decoding)."""
    seqs, first = training_windows(target, ids, n_seqs, "greedy", seed)
    n = len(heads.weight)
    t = torch.arange(first, min(first + new_tokens, seqs.size(1) - n - 1), device=seqs.device)  # (P,)
    tokens = seqs[:, recent_positions(t, heads.n_tokens)]  # (N, P, n_tokens)
    logits = head_logits(heads, target, hidden_states(target, seqs)[:, t], tokens)  # (n, N, P, V)
    top = logits.topk(RANKS, -1).indices  # (n, N, P, RANKS)
    labels = torch.stack([seqs[:, t + 2 + i] for i in range(n)])  # (n, N, P)
    return (top == labels[..., None]).float().mean((1, 2)).cpu()


@torch.no_grad()
def head_overlap(heads, target, ids, temperature=SAMPLE_T, n_seqs=16, new_tokens=128, seed=1234):
    """(n_heads,): the mean of sum_x min(p(x), q(x)) = 1 - TV(p, q) over held-out continuations
    sampled at `temperature`, q being head i's distribution at the decoding temperature and p the
    target's for the same token given the sampled tokens before it: what a sampled draft from
    head i is accepted with when the drafts before it were."""
    seqs, first = training_windows(target, ids, n_seqs, "sampled", seed)
    n = len(heads.weight)
    t = torch.arange(first, min(first + new_tokens, seqs.size(1) - n - 1), device=seqs.device)  # (P,)
    hidden = hidden_states(target, seqs)  # (N, T, C)
    q = torch.softmax(head_logits(heads, target, hidden[:, t], seqs[:, recent_positions(t, heads.n_tokens)])
                      / temperature, -1)  # (n, N, P, V)
    p = [torch.softmax(target.lm_head(hidden[:, t + 1 + i]) / temperature, -1) for i in range(n)]  # (N, P, V) each
    return torch.stack([overlap(p[i], q[i]) for i in range(n)]).mean((1, 2)).cpu()


def train_heads(target, train_ids, n_heads, steps, batch_size, lr, teacher="greedy", n_seqs=512,
                log=print, seed=0):
    """Train n_heads heads on the frozen target from n_seqs windows; batch_size positions a step.
    teacher: one of TEACHERS. "corpus" and "greedy" learn the window's next tokens (cross-entropy
    to one token); "soft" (greedy windows) and "sampled" learn the target's whole next-token
    distribution there (cross-entropy to it), which is what sampled drafts must match."""
    target.requires_grad_(False)  # the base stays frozen; only the heads learn
    log(f"blockwise heads ({teacher}): preparing {n_seqs} training windows")
    seqs, first = training_windows(target, train_ids, n_seqs, teacher, seed)  # (N, T)
    hidden = hidden_states(target, seqs)  # (N, T, C), once: the heads never change it
    heads = Heads(target.config.n_embd, n_heads).to(seqs.device)
    T = seqs.size(1)
    generator = torch.Generator().manual_seed(seed)
    ahead = torch.arange(n_heads, device=seqs.device)  # head i predicts token t + 2 + i

    def batch_loss(step):
        s = torch.randint(len(seqs), (batch_size,), generator=generator).to(seqs.device)  # (B,)
        t = torch.randint(first, T - n_heads - 1, (batch_size,), generator=generator).to(seqs.device)  # (B,)
        tokens = seqs[s[:, None], recent_positions(t, heads.n_tokens)]  # (B, n_tokens)
        logits = head_logits(heads, target, hidden[s, t], tokens)  # (n_heads, B, V)
        if teacher in ("soft", "sampled"):  # the target's distribution of token t+2+i, from its hidden state before it
            with torch.no_grad():
                before = hidden[s[None, :], t[None, :] + 1 + ahead[:, None]]  # (n_heads, B, C)
                p = torch.softmax(target.lm_head(before), -1)  # (n_heads, B, V)
            return -(p * F.log_softmax(logits, -1)).sum(-1).mean()
        labels = seqs[s[None, :], t[None, :] + 2 + ahead[:, None]]  # (n_heads, B)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    fit(heads.parameters(), batch_loss, steps, lr, batch_size, label=f"blockwise heads ({teacher})", log=log)
    target.requires_grad_(True)
    return heads.eval()
