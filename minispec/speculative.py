"""The one speculative decoding loop: draft -> verify -> accept -> roll back, and its statistics.

Every method runs through `generate`, one `step` at a time. The loop knows nothing about any
particular drafter; a drafter is an object with three methods:

    start(prompt, cache)              forget the last call, prepare for this prompt
    propose(seq, room, sampling)      -> Draft: tokens to verify after seq[-1], at most `room` deep
    observe(step)                     see what the target said and accepted (a Step)

plus one method with a default that a drafter may override:

    verify(model, idx, pos, mask, cache, slots) -> (logits, hidden)   the verification forward

`cache` is the target's own KV cache: self-drafting methods (layer skipping, early exit) draft
through it, and early exit verifies by running only the upper layers (its `verify`). A drafter
with a model of its own makes its cache with cudagraph.cache_like(cache, its_model) and runs
its cached forwards through cudagraph.run, so that with `static` (CUDA graphs, or their eager
stand-in on CPU) every forward of a step has a fixed shape.

Plain autoregressive decoding is the same loop with no drafter: every block is the one token
seq[-1], and tau is exactly 1.

A Draft is a small graph of tokens after x_t = seq[-1]: each drafted token has a depth (its
position is t + depth) and the draft's own mask says which block tokens see which. Its paths are
the candidate continuations, lists of block indices starting at the root 0 (x_t). A chain of k
tokens is the single path [0, 1, ..., k] under a causal mask; a tree or Lookahead's n-grams have
several paths; tokens on no path (Lookahead's window) are computed only for the drafter to read.

Cache bookkeeping: the block is written at cache slots t..t+T-1. Rejected entries need no undo
(the next mask hides them and the next block overwrites them); when the accepted path is not
slots t+1, t+2, ... its entries are moved there, so slot == position for the accepted prefix.
"""

import time
from dataclasses import dataclass, field

import torch

from . import cudagraph, masks
from .errors import MinispecError
from .kvcache import KVCache
from .verify import (accept_candidates, accept_greedy, accept_greedy_paths, accept_paths, accept_sampled,
                     accept_top_beta, sample, target_probs)


@dataclass
class Sampling:
    """How tokens are picked: temperature 0 is greedy; top_k keeps the k most likely tokens."""
    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def probs(self, logits):
        return target_probs(logits, self.temperature, self.top_k)

    def draw(self, logits):
        """What every drafter does with its logits (..., V): q = the distribution decoding would
        sample from, and a draft per row: q's argmax when greedy, else a sample of q.
        Returns (tokens (...,), q (..., V))."""
        q = self.probs(logits)
        return (q.argmax(-1) if self.temperature == 0 else sample(q, self.generator)), q


@dataclass
class Draft:
    tokens: torch.Tensor  # (n,) drafted token ids, block indices 1..n
    depth: torch.Tensor  # (n,) each one's distance from x_t: its position is t + depth
    mask: torch.Tensor  # (n+1, n+1) bool: which block tokens see which (the root is index 0)
    paths: list  # candidate continuations: lists of block indices, each starting with 0
    q: torch.Tensor | None = None  # (n, V) the distributions a single chain was sampled from

    @classmethod
    def chain(cls, tokens, q=None):
        """k tokens in a row: the usual draft."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        k = len(tokens)
        return cls(tokens, torch.arange(1, k + 1), masks.causal(k + 1), [list(range(k + 1))], q)

    def trimmed(self, room, slots):
        """The draft without tokens deeper than `room` (the context or the token budget ends), and
        without the block tokens past the `slots` free cache slots. Block tokens only see earlier
        ones, so dropping the last ones leaves a valid block whose paths are cut short."""
        keep = ((self.depth <= room) & (torch.arange(len(self.tokens)) < slots - 1)).nonzero().flatten()
        if len(keep) == len(self.tokens):
            return self
        block_keep = torch.cat([torch.zeros(1, dtype=torch.long), keep + 1])
        new_index = {int(old): new for new, old in enumerate(block_keep)}
        paths = [[new_index[i] for i in path if i in new_index] for path in self.paths]
        q = None if self.q is None else self.q[: len(keep)]  # q belongs to a chain, kept in depth order
        return Draft(self.tokens[keep], self.depth[keep], self.mask[block_keep][:, block_keep], paths, q)


class Drafter:
    """The interface. Subclasses override propose, and start/observe when they keep state."""
    k = 0

    def start(self, prompt, cache):
        pass

    def propose(self, seq, room, sampling):
        return Draft.chain([])

    def observe(self, step):
        pass

    def verify(self, model, idx, pos, mask, cache, slots):
        return cudagraph.forward(model, idx, pos, mask, cache, slots)


@dataclass
class Step:
    """What one verification did, for the drafter to learn from (heads and Jacobi reuse it)."""
    start: int  # x_t's position and cache slot
    tokens: torch.Tensor  # (T,) the block: x_t then the drafted tokens
    path: list  # the accepted block indices, root first; compacted to slots start, start+1, ...
    logits: torch.Tensor  # (T, V) the target's logits after each block token
    hidden: torch.Tensor  # (T, C) the target's final hidden state at each block token
    emitted: list  # the new tokens this step added to the sequence


@dataclass
class Stats:
    new_tokens: int = 0
    target_forwards: int = 0  # verification forwards; the prompt's prefill is not counted
    proposed: int = 0  # drafted tokens along the longest candidate path, summed over steps
    accepted: int = 0
    tried_at: list = field(default_factory=list)  # tried_at[i]: steps whose draft reached depth i+1 ...
    accepted_at: list = field(default_factory=list)  # ... and the drafts before it were accepted
    accepted_lengths: dict = field(default_factory=dict)  # histogram: accepted drafts -> steps
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0

    @property
    def tau(self):
        """Mean new tokens per target forward, the bonus token included (1.0 for autoregressive)."""
        return self.new_tokens / max(self.target_forwards, 1)

    @property
    def alpha(self):
        return self.accepted / max(self.proposed, 1)

    @property
    def accept_at(self):
        """P(draft i accepted | drafts before it accepted), per depth i = 1, 2, ..."""
        return [a / max(t, 1) for a, t in zip(self.accepted_at, self.tried_at)]

    @property
    def tokens_per_s(self):
        return self.new_tokens / max(self.total_s, 1e-9)

    def add(self, other):
        """Add another run's statistics to these (totals over several prompts)."""
        for name in ("new_tokens", "target_forwards", "proposed", "accepted", "draft_s", "verify_s", "total_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for depth, (tried, accepted) in enumerate(zip(other.tried_at, other.accepted_at)):
            if depth == len(self.tried_at):
                self.tried_at.append(0)
                self.accepted_at.append(0)
            self.tried_at[depth] += tried
            self.accepted_at[depth] += accepted
        for length, n in other.accepted_lengths.items():
            self.accepted_lengths[length] = self.accepted_lengths.get(length, 0) + n

    def record(self, depth, accepted, emitted):
        self.target_forwards += 1
        self.new_tokens += emitted
        self.proposed += depth
        self.accepted += accepted
        self.accepted_lengths[accepted] = self.accepted_lengths.get(accepted, 0) + 1
        while len(self.tried_at) < depth:
            self.tried_at.append(0)
            self.accepted_at.append(0)
        for i in range(min(accepted + 1, depth)):
            self.tried_at[i] += 1
            self.accepted_at[i] += int(i < accepted)


@dataclass
class Result:
    tokens: list  # the new token ids
    stats: Stats
    steps: list  # per step: (emitted tokens, accepted drafts, draft depth), to show what each step did


def choose(draft, tokens, logits, sampling, top_beta=None):
    """Pick the accepted path and the next token with the rule that fits the draft."""
    paths = draft.paths or [[0]]  # no candidate at all: just the target's own token
    if top_beta is not None:  # SpecDec's relaxed rule, LOSSY: applied to each candidate path
        beta, margin = top_beta
        return accept_paths(lambda d, lg: accept_top_beta(d, lg, beta, margin), tokens, paths, logits)
    single_chain = len(paths) == 1 and paths[0] == list(range(len(tokens)))
    if sampling.temperature == 0:
        if single_chain:
            a, token = accept_greedy(draft.tokens, logits)
            return list(range(a + 1)), token
        return accept_greedy_paths(tokens, paths, logits)
    p = sampling.probs(logits)
    if single_chain:
        a, token = accept_sampled(draft.tokens, draft.q, p, sampling.generator)
        return list(range(a + 1)), token
    assert draft.q is None, "sampled drafts must be a single chain; several candidates must be deterministic"
    return accept_candidates(tokens, paths, p, sampling.generator)


def prefill(model, cache, ids, start=0):
    """Feed token ids (list) at positions and slots start..start+n-1, behind whatever the cache
    holds before start, in one plain forward (never a recorded one: its length varies); return
    the forward's (logits, hidden)."""
    n, device = len(ids), cache.kv.device
    pos = torch.arange(start, start + n, device=device)
    mask = masks.cached_block(start, masks.causal(n, device), start + n, device)  # (n, start + n)
    return model(torch.tensor([ids], device=device), pos, mask, cache, pos)


def step(model, drafter, seq, cache, sampling, room, stats, eot=None, top_beta=None):
    """One speculative step after the accepted tokens `seq`, whose newest, x_t = seq[-1], is not
    in the cache yet: draft at most `room` tokens deep, verify the block in ONE target forward,
    accept a path and one more token, compact the cache, and let the drafter observe.

    The step is recorded in `stats`. Returns (draft, Step): Step.emitted are the new tokens,
    cut after `eot` when it is among them.
    """
    device = cache.kv.device
    t = len(seq) - 1  # x_t = seq[t] is the one accepted token not yet in the cache
    t1 = time.perf_counter()
    draft = drafter.propose(seq, room, sampling).trimmed(room, cache.max_len - t)
    t2 = time.perf_counter()

    # verify: ONE target forward over the block [x_t, drafts] at slots t..t+T-1
    tokens = torch.cat([torch.tensor([seq[-1]]), draft.tokens.cpu()])  # (T,)
    T = len(tokens)
    pos = torch.cat([torch.zeros(1, dtype=torch.long), draft.depth.cpu()]) + t
    slots = torch.arange(t, t + T)
    mask = masks.cached_block(t, draft.mask, t + T)  # (T, t + T)
    logits, hidden = drafter.verify(model, tokens[None].to(device), pos.to(device), mask.to(device),
                                    cache, slots.to(device))
    logits, hidden = logits[0], hidden[0]  # (T, V), (T, C)
    path, token = choose(draft, tokens.to(device), logits, sampling, top_beta)
    if path != list(range(len(path))):  # a non-contiguous path: compact its entries
        src = torch.tensor(path[1:], device=device) + t
        cache.move(src, torch.arange(t + 1, t + len(path), device=device))
    t3 = time.perf_counter()

    emitted = [int(tokens[i]) for i in path[1:]] + [token]
    if eot is not None and eot in emitted:
        emitted = emitted[: emitted.index(eot) + 1]
    depth = max((len(p) - 1 for p in draft.paths), default=0)
    stats.record(depth, min(len(path) - 1, len(emitted)), len(emitted))  # accepted drafts that were emitted
    stats.draft_s += t2 - t1
    stats.verify_s += t3 - t2
    verified = Step(t, tokens, path, logits, hidden, emitted)
    drafter.observe(verified)
    return draft, verified


@torch.no_grad()
def generate(model, prompt, max_new_tokens, drafter=None, *, temperature=0.0, top_k=None, seed=0,
             eot=None, top_beta=None, static=None):
    """Continue `prompt` (a list of token ids) by up to max_new_tokens tokens.

    Stops early at the token `eot` (which is kept) or when the sequence fills the context.
    top_beta=(beta, margin) switches to SpecDec's relaxed verification, which is LOSSY.
    static: a cudagraph.StaticForwards to run every forward after the prefill at a fixed shape
    (CUDA graphs, or eagerly over the same static buffers); None runs them plainly.
    """
    t0 = time.perf_counter()
    context = model.config.block_size
    if not 0 < len(prompt) <= context:
        raise MinispecError(f"the prompt has {len(prompt)} tokens; it must have 1 to {context}")
    device = next(model.parameters()).device
    sampling = Sampling(temperature, top_k, torch.Generator(device=device).manual_seed(seed))
    drafter = drafter or Drafter()
    cache = KVCache.for_model(model) if static is None else static.cache_for(model)
    seq = list(prompt)
    if len(seq) > 1:
        prefill(model, cache, seq[:-1])
    drafter.start(list(prompt), cache)
    stats, steps = Stats(), []
    while stats.new_tokens < max_new_tokens and len(seq) < context:
        # the deepest draft that leaves room for the step's own token, in the budget and the context
        room = min(max_new_tokens - stats.new_tokens, context - len(seq)) - 1
        draft, verified = step(model, drafter, seq, cache, sampling, room, stats, eot, top_beta)
        seq += verified.emitted
        depth = max((len(p) - 1 for p in draft.paths), default=0)
        steps.append((verified.emitted, min(len(verified.path) - 1, len(verified.emitted)), depth))
        if eot is not None and verified.emitted[-1] == eot:
            break
    stats.total_s = time.perf_counter() - t0
    return Result(seq[len(prompt):], stats, steps)
