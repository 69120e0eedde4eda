"""Sampling is exact for every method, rule by rule, at draft depth 2 and beyond.

The loop promises that speculative sampling emits tokens distributed exactly as plain sampling
from the target, whatever the drafter proposes. test_methods.py checks the first two sampled
tokens, where blockwise and lookahead draft nothing and every other method drafts one token, so
bugs in the deeper rules pass it. Here each method samples NEW = 4 tokens (blockwise 5: its first
step drafts nothing) with K = 3 drafts a step, from a prompt on which it drafts, accepts and
rejects at depth 2 and beyond (Lookahead with several candidate n-grams on its first step), and
the counts of whole sampled sequences are compared (chi-square) with P(x_1..x_n | prompt)
computed by full uncached forwards, at temperature 1 and at temperature 0.7 with top-3.

Each test prints what the acceptance rules did per draft depth (pytest -s shows the table) and
asserts that every rule the method relies on was exercised, or its pass would prove little.
Planted bugs, the negative controls, must each fail the same test at a tiny p-value: a
correction drawn from p instead of the residual after accepted drafts, blockwise heads verified
against another head's q, and several candidates tried without renormalising the residual.

A "chaos" drafter proposing random chains, trees and several-path drafts goes through the same
exact test, and must leave greedy decoding unchanged. So does the adaptive draft length
(k="auto"), its choices driven by a random clock so that they vary from step to step.

The target is a random GPT over 5 tokens whose layers outweigh its embeddings (so that skipping
layers changes the distribution and self-drafted tokens get rejected) and whose final norm is
sharp (so that a few sequences hold enough mass to test with a thousand runs). The model and
the prompt were picked so that the rules are exercised and the planted bugs stand out.
About 22,000 short generate calls (`pytest -q tests/test_sampling_exact.py` prints how long they take).
"""

import itertools
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

import minispec
from minispec import masks, speculative, verify
from minispec.adaptive import Adaptive
from minispec.speculative import Draft, Drafter, generate
from minispec.verify import sample, target_probs
from tests.helpers import chi_square_p_value, random_gpt

V = 5  # vocabulary: every sequence of NEW tokens is a bin of the chi-square test
K = 3  # drafts per step: depth 3 on the first step
NEW = 4  # tokens sampled per run: the first step has room for K drafts and the bonus
NEW_TOKENS = {"blockwise": NEW + 1}  # blockwise drafts from its second step on
# lookahead: three n-grams per first token, several candidates on the first step; layerskip: always
# K drafts (earlyexit, the same draft here, keeps the adaptive exit that cuts them short)
OPTIONS = {"lookahead": {"G": 3}, "layerskip": {"gamma": None}}
SAMPLES = 1000  # runs per method and setting (seeds 0..SAMPLES-1); with 250 a planted bug's p-value hung on the seeds
SETTINGS = {"T=1": (1.0, None), "T=0.7,top-3": (0.7, 3)}  # (temperature, top_k)
# after its last token 4, Lookahead's pool holds the n-grams 3 3 4, 4 3 3 and 3 2 4 (most recent
# first): two distinct first tokens, both likely
PROMPT = [2, 0, 4, 2, 2, 0, 4, 4, 3, 2, 4, 4, 3, 3, 4]
PASS, FAIL = 1e-3, 1e-6  # a correct loop passes above PASS; a planted bug must fall below FAIL
DEEP = range(2, NEW + 2)  # draft depth 2 and beyond
DRAFTERS = [m for m in minispec.METHODS if m != "ar"] + ["chaos"]


def layered_gpt(seed=1, layer_scale=40.0, gain=20.0):
    """A random GPT whose attention and MLP outputs outweigh the token embedding (layer_scale) and
    whose logits are sharpened by the final norm's gain."""
    model = random_gpt(vocab_size=V, block_size=32, seed=seed)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.mul_(layer_scale)
            block.mlp.c_proj.weight.mul_(layer_scale)
        model.transformer.ln_f.weight.mul_(gain)
    return model


@pytest.fixture(scope="module")
def target():
    return layered_gpt()


@torch.no_grad()
def exact_joint(model, prompt, n, temperature, top_k):
    """P(x_1..x_n | prompt) for all V**n sequences (lexicographic order), from one uncached forward
    over every prompt + x_1..x_{n-1}, each conditional cut and scaled as decoding does."""
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=n - 1)), dtype=torch.long).view(-1, n - 1)
    ids = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], 1)
    T = ids.size(1)
    logits = model(ids, torch.arange(T), masks.causal(T))[0][:, len(prompt) - 1:]  # (B, n, V)
    p = target_probs(logits.double(), temperature, top_k)  # p[b, i]: the distribution of x_{i+1}
    prefix_p = p[:, :-1].gather(2, prefixes[..., None]).prod(1)  # (B, 1) P(x_1..x_{n-1})
    return (prefix_p * p[:, -1]).flatten()


class Tally:
    """What the acceptance rules did, from every (draft, accepted path) of a run, per draft depth d:
    proposed  drafted tokens at depth d on a candidate path (distinct block tokens)
    accepted  a token at depth d accepted
    rejected  distinct candidate tokens at depth d tried and rejected
    correction  the step ended with a rejection at depth d: its token came from the residual
    bonus     the step accepted a whole path of d drafts: its token came from p after them
    switch    a candidate at depth d was rejected, then another one accepted
    Each is kept per rule: "chain" (speculative sampling of one chain, accept_sampled) or
    "candidates" (several deterministic paths tried in turn, accept_candidates)."""

    def __init__(self):
        self.counts = Counter()  # (rule, what, depth) -> count

    def record(self, draft, tokens, path):
        paths = draft.paths or [[0]]
        rule = "chain" if len(paths) == 1 and paths[0] == list(range(len(tokens))) else "candidates"
        for d in range(1, max(map(len, paths))):
            self.counts[rule, "proposed", d] += len({p[d] for p in paths if len(p) > d})
        # walk the accepted path the way the rules do: at each node, the distinct tokens of the
        # candidates through it, in order, until one is accepted
        for d in range(1, len(path) + 1):
            alive = [p for p in paths if p[:d] == path[:d] and len(p) > d]
            children = list(dict.fromkeys(int(tokens[p[d]]) for p in alive))
            if d < len(path):
                rejected = children.index(int(tokens[path[d]]))
                self.add(rule, "accepted", d, 1)
                self.add(rule, "switch", d, rejected > 0)
            else:
                rejected = len(children)
                self.add(rule, "correction", d, rejected > 0)
                self.add(rule, "bonus", d - 1, not children and d > 1)
            self.add(rule, "rejected", d, rejected)

    def add(self, rule, what, depth, n):
        if n:
            self.counts[rule, what, depth] += n

    def total(self, rule, what, depths):
        return sum(self.counts[rule, what, d] for d in depths)

    def table(self):
        whats = ("proposed", "accepted", "rejected", "correction", "bonus", "switch")
        rows = sorted({(rule, d) for rule, _, d in self.counts if d > 0})
        lines = [f"  {'rule':10} depth " + " ".join(f"{w:>10}" for w in whats)]
        for rule, d in rows:
            lines.append(f"  {rule:10} {d:5} " + " ".join(f"{self.counts[rule, w, d]:10}" for w in whats))
        return "\n".join(lines)


@contextmanager
def recording(record):
    """Patch the loop's `choose` so that record(draft, tokens, path) sees every verification. The
    rules it calls are looked up in minispec.speculative, so a planted bug patched there runs."""
    choose = speculative.choose

    def recording_choose(draft, tokens, logits, sampling, top_beta=None):
        path, token = choose(draft, tokens, logits, sampling, top_beta)
        record(draft, tokens, path)
        return path, token

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(speculative, "choose", recording_choose)
        yield


def sampled_counts(model, drafter, n, temperature, top_k, tally):
    """Counts (V**n,) of the sequences sampled with seeds 0..SAMPLES-1, every verification
    recorded in `tally`."""
    counts = torch.zeros(V ** n)
    with recording(tally.record):
        for seed in range(SAMPLES):
            out = generate(model, PROMPT, n, drafter, temperature=temperature, top_k=top_k, seed=seed)
            counts[sum(x * V ** (n - 1 - i) for i, x in enumerate(out.tokens))] += 1
    return counts


class Chaos(Drafter):
    """Random drafts of every shape the loop accepts, from its own generator: a chain sampled from
    a random q, a deterministic chain, a tree (deterministic tokens), or several chains with
    tokens on no path between them (as Lookahead's window), often deeper than the room left (the
    loop trims them). Verification must not care: greedy output and sampled distribution stay
    the target's."""
    k = 4

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def randint(self, low, high):
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def propose(self, seq, room, sampling):
        depth = self.randint(1, self.k + 1)
        shape = self.randint(0, 4)
        if shape == 0:
            q = torch.softmax(3 * torch.randn(depth, V, generator=self.generator), -1)
            return Draft.chain(torch.multinomial(q, 1, generator=self.generator).flatten(), q)
        if shape == 1:
            return Draft.chain(torch.randint(V, (depth,), generator=self.generator))
        return self.tree(depth) if shape == 2 else self.several_paths(depth)

    def tree(self, max_depth):
        """Breadth first: every node above max_depth gets 1 to V children (the root at least 2),
        at most 16 nodes; siblings hold distinct tokens."""
        parents, depth, tokens = [], [0], []  # depth[i]: block token i's depth; the root is 0
        for node in itertools.count():
            if node == len(depth) or len(parents) >= 16:
                return self.block(parents, depth[1:], tokens)
            if depth[node] < max_depth:
                children = self.randint(2 if node == 0 else 1, V + 1)
                tokens += torch.randperm(V, generator=self.generator)[:children].tolist()
                parents += [node] * children
                depth += [depth[node] + 1] * children

    def several_paths(self, max_depth):
        """1 to 3 chains of random tokens (several may start with the same token), interleaved
        with 0 to 3 tokens on no path."""
        lengths = [self.randint(1, max_depth + 1) for _ in range(self.randint(1, 4))]
        streams = [[(g, j) for j in range(n)] for g, n in enumerate(lengths)]
        streams += [[(None, self.randint(1, max_depth + 1))] for _ in range(self.randint(0, 4))]
        parents, depth, last = [], [], [0] * len(lengths)  # last[g]: the newest block token of chain g
        while streams:
            s = self.randint(0, len(streams))
            g, j = streams[s].pop(0)
            if not streams[s]:
                del streams[s]
            parents.append(None if g is None else last[g])
            depth.append(j if g is None else j + 1)
            if g is not None:
                last[g] = len(parents)
        return self.block(parents, depth, torch.randint(V, (len(parents),), generator=self.generator).tolist())

    def block(self, parents, depth, tokens):
        """The Draft of block tokens 1..n: token i hangs from parents[i-1] (0: the root x_t) and
        sees the root and its ancestors, or is on no path (parent None) and sees the root and any
        earlier tokens; its paths are every root-to-leaf chain, in random order."""
        n = len(parents)
        mask = torch.eye(n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for node, parent in enumerate(parents, start=1):
            if parent is None:
                mask[node, 1:node] = torch.rand(node - 1, generator=self.generator) < 0.5
            else:
                mask[node] |= mask[parent]
        leaves = [i for i in range(1, n + 1) if parents[i - 1] is not None and i not in parents]
        paths = []
        for leaf in leaves:
            path = [leaf]
            while path[0]:
                path.insert(0, parents[path[0] - 1])
            paths.append(path)
        order = torch.randperm(len(paths), generator=self.generator).tolist()
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(depth, dtype=torch.long), mask,
                     [paths[i] for i in order] or [[0]])


def make(method, model):
    if method == "chaos":
        return Chaos()
    return minispec.make_drafter(method, model, k=K, untrained=True, **OPTIONS.get(method, {}))


def check_exact(model, method, setting, drafter=None):
    """Sample the method's runs, print its tally; returns (p-value, tally)."""
    temperature, top_k = SETTINGS[setting]
    n = NEW_TOKENS.get(method, NEW)
    tally = Tally()
    counts = sampled_counts(model, drafter or make(method, model), n, temperature, top_k, tally)
    p = chi_square_p_value(counts, exact_joint(model, PROMPT, n, temperature, top_k))
    print(f"\n{method}, {setting}: {n} tokens, {SAMPLES} runs, chi-square p = {p:.3g}\n{tally.table()}")
    return p, tally



def expected_events(method):
    """(rule, what, depths) that must show up in the method's tally, or its test proves little:
    drafts accepted and rejected at depth 2 and beyond, a correction drawn there after accepted
    drafts, a bonus after a whole path of 2 or more; with several candidates, one accepted after
    another's rejection (at depth 2 and beyond too where the draft is a tree)."""
    rules = {"lookahead": ["candidates"], "chaos": ["chain", "candidates"]}.get(method, ["chain"])
    events = [(rule, what, DEEP) for rule in rules for what in ("accepted", "rejected", "correction", "bonus")]
    if "candidates" in rules:
        events.append(("candidates", "switch", [1]))
    if method == "chaos":
        events.append(("candidates", "switch", DEEP))
    return events


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", DRAFTERS)
def test_sampling_is_exact(target, method, setting):
    p, tally = check_exact(target, method, setting)
    assert p > PASS, f"{method} {setting}: the sampled sequences are not the target's (p = {p:.3g})"
    for rule, what, depths in expected_events(method):
        assert tally.total(rule, what, depths), f"{method} {setting}: no {rule} {what} at depth {list(depths)}"


# Planted bugs: each changes ONE thing in the library's rules, and the exact test must catch it.

def correction_from_p(draft, q, p, generator):
    """PLANTED BUG: verify.accept_sampled, but after a >= 1 accepted drafts the correction is
    drawn from p_{a+1} itself instead of the residual norm(max(0, p - q))."""
    k = len(draft)
    u = torch.rand(k, generator=generator, device=p.device)
    for i in range(k):
        d = int(draft[i])
        q_d = 1.0 if q is None else q[i, d]
        if u[i] * q_d < p[i, d]:
            continue
        if i >= 1:
            return i, int(sample(p[i], generator))  # the bug
        return i, int(sample(verify.residual(p[i], verify.point_mass(d, p[i]) if q is None else q[i]), generator))
    return k, int(sample(p[k], generator))


def residual_not_renormalised(p, q):
    """PLANTED BUG: verify.residual without its division by the sum. Sampling from it is
    unchanged (verify.sample scales its uniform number by the total), but accept_candidates then
    tests the next candidate against the unnormalised residual, so it is accepted too rarely."""
    return (p - q).clamp(min=0.0)


class RolledHeads(Drafter):
    """PLANTED BUG: the blockwise drafter, but each head's draft goes to verification with the
    next head's q (q's rows rolled by one)."""

    def __init__(self, heads):
        self.heads, self.k = heads, heads.k

    def start(self, prompt, cache):
        self.heads.start(prompt, cache)

    def propose(self, seq, room, sampling):
        draft = self.heads.propose(seq, room, sampling)
        return draft if draft.q is None else replace(draft, q=draft.q.roll(1, 0))

    def observe(self, step):
        self.heads.observe(step)

    def verify(self, model, idx, pos, mask, cache, slots):
        return self.heads.verify(model, idx, pos, mask, cache, slots)


def test_correction_from_p_fails(target, monkeypatch):
    """Jacobi's drafts (deterministic, often accepted at depth 1) make corrections at depth 2 and 3."""
    monkeypatch.setattr(speculative, "accept_sampled", correction_from_p)
    p, _ = check_exact(target, "jacobi", "T=1")
    assert p < FAIL, f"the exact test missed corrections drawn from p (p = {p:.3g})"


def test_blockwise_heads_with_rolled_q_fail(target):
    p, _ = check_exact(target, "blockwise", "T=0.7,top-3", RolledHeads(make("blockwise", target)))
    assert p < FAIL, f"the exact test missed heads verified against another head's q (p = {p:.3g})"


def test_candidates_without_renormalising_fail(target, monkeypatch):
    """Lookahead's first step tries a likely n-gram, then another likely one after its rejection."""
    monkeypatch.setattr(verify, "residual", residual_not_renormalised)
    p, _ = check_exact(target, "lookahead", "T=0.7,top-3")
    assert p < FAIL, f"the exact test missed an unnormalised residual between candidates (p = {p:.3g})"


def test_chaos_leaves_greedy_decoding_unchanged(target):
    """Random prompts up to the context's end (so drafts get trimmed by the room and by the cache):
    whatever the chaos drafter proposes, greedy output is plain greedy decoding's."""
    generator = torch.Generator().manual_seed(0)
    chaos, paths = Chaos(), []
    for _ in range(40):
        length = int(torch.randint(1, target.config.block_size, (1,), generator=generator))
        prompt = torch.randint(V, (length,), generator=generator).tolist()
        expected = generate(target, prompt, 12).tokens
        with recording(lambda draft, tokens, path: paths.append(path)):
            assert generate(target, prompt, 12, chaos).tokens == expected, f"prompt {prompt}"
    assert any(len(path) > 2 for path in paths), "no chaos draft accepted to depth 2: the test proves little"
    assert any(path != list(range(len(path))) for path in paths), "no accepted path needed compacting"


class RandomClock:
    """A timer that advances by a random amount at every reading: the adaptive drafter's cost
    fit, and so its choice of depth, jumps around (reproducibly), as on a busy machine."""

    def __init__(self, seed=0):
        self.now, self.generator = 0.0, torch.Generator().manual_seed(seed)

    def __call__(self):
        self.now += float(torch.rand(1, generator=self.generator))
        return self.now


@pytest.mark.parametrize("method", ["draft_model", "chaos"])
def test_sampling_is_exact_with_adaptive_k(target, method):
    """The depth is chosen from earlier steps only, so every choice leaves the distribution exact."""
    drafter = Adaptive(make(method, target), clock=RandomClock())
    p, tally = check_exact(target, method, "T=1", drafter)
    assert p > PASS, f"{method} with adaptive k: the sampled sequences are not the target's (p = {p:.3g})"
    assert drafter.chosen[0] and sum(drafter.chosen[2:]), f"the depths chosen did not vary: {drafter.chosen}"
    for what in ("accepted", "rejected", "correction"):
        assert tally.total("chain", what, DEEP), f"{method} with adaptive k: no chain {what} at depth 2 and beyond"
