"""Self-speculative decoding: the target drafts for itself by skipping some of its own layers.

No second model, no training needed: a cheaper version of the target proposes, the full target
verifies, and the output is exactly the full target's.

`layerskip`: Draft & Verify (Zhang et al., "Draft & Verify: Lossless Large Language Model
Acceleration via Self-Speculative Decoding", ACL 2024). The drafter is the target with a set of
sub-layers, (layer, "attn") or (layer, "mlp"), replaced by the identity on the residual stream.
It drafts autoregressively through the target's OWN KV cache: the accepted prefix is already
there, and each draft token's keys and values (in the attention layers it runs) are written at
slots t, t+1, ... Those entries come from a different residual stream than the full model's,
so they are wrong for the full model: verification runs the full model over [x_t, d_1..d_k] at
the same slots and overwrites every one of them (slots past the accepted prefix are then hidden
by the next mask, as for any rejected draft). Adaptive draft exit: drafting stops after a draft
whose top-1 probability is below a threshold gamma, and gamma is steered after every step
toward a target acceptance rate (up when too many drafts are rejected, down when a draft cut
short was accepted). The draft length varies; verification does not change, so it stays lossless.

`earlyexit`: LayerSkip's self-speculation (Elhoushi et al., "LayerSkip: Enabling Early Exit
Inference and Self-Speculative Decoding", ACL 2024). The drafter is the first E layers followed
by the target's own final norm and LM head. The early layers' cache entries written while
drafting are exactly what the full model writes (same layers, same inputs), so verification
runs only layers E..L-1 over the block, starting from the layer-E states kept while drafting;
only the last draft d_k, never fed while drafting, goes through layers 0..E-1 in `verify`. Early
layers run once per token. A plainly trained target exits poorly at shallow layers; LayerSkip
trains it with layer dropout (deeper layers dropped more often) and an early-exit loss (the
shared head's cross-entropy on every layer's output): `train_layerskip`, which train_tiny.py uses
for the target by default.

Which sub-layers to skip and where to exit are searched (`search`), saved next to the target as
layerskip.pt and used by the factories; without it they fall back to fixed defaults.

What to expect from a tiny GPT on a CPU: a draft forward is not nearly free (the embedding and
LM head cost half a layer, and every forward pays a fixed per-call overhead) and neither is
verification of a block, so only a shallow exit whose drafts are accepted often pays. A plainly
trained target's shallow exits agree with it too rarely for that; LayerSkip's training is what
makes them agree (the README's per-exit table, from lesson 07, shows both).
"""

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint, cudagraph, masks
from ..cudagraph import seconds_per_call
from ..data import get_batch
from ..errors import MinispecError
from ..kvcache import KVCache
from ..speculative import Draft, Drafter, generate
from ..train import eval_lm, fit

PARTS = ("attn", "mlp")  # the two sub-layers of a block
GAMMAS = (0.5, None)  # the search tries adaptive draft exit from gamma 0.5, and always k drafts
SEARCH_FILE = "layerskip.pt"


class LayerSkip(Drafter):
    """Draft & Verify: draft through the target with the sub-layers in `skip` replaced by the identity.

    gamma: the initial exit threshold on the draft's top-1 probability (None: always draft k);
    target_accept: the acceptance rate gamma is steered toward, gamma_step at a time.
    """
    exit_layer = 0  # verification runs every layer

    def __init__(self, model, skip=(), k=4, gamma=0.5, target_accept=0.8, gamma_step=0.02):
        self.model, self.k = model, k
        self.skip = frozenset((int(layer), str(part)) for layer, part in skip)
        self.draft_layers = range(model.config.n_layer)
        self.gamma0, self.target_accept, self.gamma_step = gamma, target_accept, gamma_step

    def drafted_parts(self):
        """The sub-layers one draft forward runs, by name (what a draft costs)."""
        return [part for layer in self.draft_layers for part in PARTS if (layer, part) not in self.skip]

    def start(self, prompt, cache):
        self.cache, self.gamma, self.drafted = cache, self.gamma0, 0

    def draft_forward(self, token, pos, mask):
        """token (1, 1) at position == slot pos (1,), mask (1, pos+1) -> logits (V,). The residual
        stream after the draft layers is kept in self.states (early exit resumes from it)."""
        key = ("draft", id(self.model), tuple(self.draft_layers), self.skip)
        logits, x = cudagraph.run(self.cache, key, self.draft_step, token, pos, mask, pos)
        self.states.append(x)
        return logits[0, -1]

    def draft_step(self, token, pos, mask, slots):
        """One token through the draft layers -> (logits (1, 1, V), the residual stream after them (1, 1, C))."""
        x = self.model.embed(token, pos)  # (1, 1, C)
        x = self.model.run_layers(x, mask, self.cache, slots, layers=self.draft_layers, skip=self.skip)
        return self.model.head(x)[0], x

    def propose(self, seq, room, sampling):
        k = self.asked = min(self.k, room)
        self.states, self.drafted = [], 0
        if k <= 0:
            return Draft.chain([])
        t, device = len(seq) - 1, self.cache.kv.device
        mask = masks.cached_block(t, masks.causal(k), t + k, device)  # row i: the token at slot t+i
        pos = torch.arange(t, t + k, device=device)
        token = torch.tensor([[seq[-1]]], device=device)
        drafts, qs = [], []
        for i in range(k):  # feed x_t, d_1, ..., d_{k-1}; each forward gives the next draft
            logits = self.draft_forward(token, pos[i:i + 1], mask[i:i + 1, :t + i + 1])
            d, q = sampling.draw(logits)  # (), (V,) what the draft is drawn from
            token = d.view(1, 1)
            drafts.append(int(d))
            qs.append(q)
            if self.gamma is not None and float(torch.softmax(logits, -1).max()) < self.gamma:
                break  # unsure: the drafts after this one would likely be wasted
        self.drafted = len(drafts)
        return Draft.chain(drafts, torch.stack(qs))

    def observe(self, step):
        if self.gamma is None or self.drafted == 0:
            return
        if (len(step.path) - 1) / self.drafted < self.target_accept:
            self.gamma = min(self.gamma + self.gamma_step, 1.0)  # too bold: stop drafting sooner
        elif self.drafted < self.asked:  # not where the room or `--k auto` asked for less
            self.gamma = max(self.gamma - self.gamma_step, 0.0)  # cut short, yet all good: go further


class EarlyExit(LayerSkip):
    """LayerSkip: draft with layers 0..E-1 and the shared head; verify with layers E..L-1 only."""

    def __init__(self, model, exit_layer, k=4, **adaptive):
        super().__init__(model, k=k, **adaptive)
        self.exit_layer = exit_layer
        self.draft_layers = range(exit_layer)  # their cache entries are exactly the full model's

    def verify(self, model, idx, pos, mask, cache, slots):
        n = len(self.states)  # block tokens 0..n-1 went through layers 0..E-1 while drafting
        assert n < idx.size(1), "verify must follow this drafter's own propose"
        assert model is self.model and cache is self.cache, "early exit verifies its own target, over its cache"
        states = torch.cat(self.states, dim=1) if n else cache.kv.new_zeros(1, 0, model.config.n_embd)
        self.states = []
        return cudagraph.run(cache, ("upper", id(model), self.exit_layer, n), self.upper_forward,
                             idx, pos, mask, slots, states)

    def upper_forward(self, idx, pos, mask, slots, states):
        """Finish the block: the tokens not drafted (the last one, at least) through layers 0..E-1,
        then the whole block through layers E..L-1 -> (logits (1, T, V), hidden (1, T, C)).
        states (1, n, C): the first n block tokens after layer E-1, computed while drafting."""
        n, model = states.size(1), self.model
        rest = model.run_layers(model.embed(idx[:, n:], pos[n:]), mask[n:], self.cache, slots[n:],
                                layers=self.draft_layers)
        x = torch.cat([states, rest], dim=1)  # (1, T, C) the block after layer E-1
        x = model.run_layers(x, mask, self.cache, slots, layers=range(self.exit_layer, model.config.n_layer))
        return model.head(x)


# The registry's factories: the search result saved with the checkpoint, or defaults.

def saved_search(model, ckpt):
    """What `search` saved in the checkpoint folder, or None."""
    path = None if ckpt is None else Path(ckpt) / SEARCH_FILE
    if path is None or not path.is_file():
        return None
    found = checkpoint.load(path, "layerskip", n_layer=int, skip=list, gamma=(float, type(None)), exit_layer=int,
                            exit_gamma=(float, type(None)))
    if found["n_layer"] != model.config.n_layer:
        raise MinispecError(f"{path} was searched for another model: delete it (the defaults are used then), "
                            f"or retrain the folder with `python train_tiny.py --out {ckpt}`")
    return found


def make_layerskip(model, ckpt=None, k=4, untrained=False, skip=None, **adaptive):
    """Options: skip (a list of (layer, "attn" | "mlp")), gamma, target_accept, gamma_step."""
    found = saved_search(model, ckpt)
    if found:
        adaptive.setdefault("gamma", found["gamma"])
    L = model.config.n_layer
    if skip is None:  # without a search: the top two thirds of the layers (an early exit's draft)
        skip = found["skip"] if found else [(layer, part) for layer in range(max(L // 3, 1), L) for part in PARTS]
    return LayerSkip(model, skip, k, **adaptive)


def make_earlyexit(model, ckpt=None, k=4, untrained=False, exit_layer=None, **adaptive):
    """Options: exit_layer E (1..L-1), gamma (None: always k drafts), target_accept, gamma_step."""
    found = saved_search(model, ckpt)
    L = model.config.n_layer
    if found:
        adaptive.setdefault("gamma", found["exit_gamma"])
    if exit_layer is None:  # without a search: after the first third of the layers
        exit_layer = found["exit_layer"] if found else max(L // 3, 1)
    if not 1 <= exit_layer < L:
        raise MinispecError(f"exit_layer must be between 1 and {L - 1}, got {exit_layer}")
    return EarlyExit(model, exit_layer, k, **adaptive)


# The search: which sub-layers to skip and where to exit, for the most tokens/s.
#
# Timing every candidate's decoding does not work on a shared 2-core CPU: two timings of the
# SAME drafter a few seconds apart differ by 20% or more, more than neighbouring skip sets do.
# So the search times each piece of a forward, and the loop's own work per step, once and
# carefully (the fastest of several rounds), counts on calibration prompts how many drafts each
# step made and how many tokens it gave (deterministic in greedy decoding), and scores a
# candidate by the tokens/s those costs add up to (Leviathan et al.'s wall-clock model).


@torch.no_grad()
def forward_costs(model, width, prefix=64):
    """Seconds of the pieces of a forward over T = 1..width tokens behind a prefix: cost[piece][T-1]
    for "ends" (embedding, final norm and head), "attn" and "mlp" (one sub-layer each); and
    cost["step"], the loop's own work per step (autoregressive decoding minus its forwards)."""
    cache = KVCache.for_model(model)
    device = cache.kv.device
    cost = {"ends": [], "attn": [], "mlp": []}
    for T in range(1, width + 1):
        idx, pos = torch.zeros(1, T, dtype=torch.long, device=device), torch.arange(prefix, prefix + T, device=device)
        mask = masks.cached_block(prefix, masks.causal(T), prefix + T, device)
        x = model.embed(idx, pos)
        cost["ends"].append(seconds_per_call(lambda: model.head(model.embed(idx, pos))))
        for part, other in (("attn", "mlp"), ("mlp", "attn")):
            sublayer = lambda: model.run_layers(x, mask, cache, pos, layers=[0], skip={(0, other)})  # noqa: E731
            cost[part].append(seconds_per_call(sublayer))
    # the loop's work per step, as a fraction of a one-token forward timed right after it
    per_token = seconds_per_call(lambda: generate(model, [0], 32), reps=1, rounds=10) / 32
    one_token = lambda: model(idx[:, :1], pos[:1], mask[:1, :prefix + 1], cache, pos[:1])  # noqa: E731
    one = seconds_per_call(one_token, reps=32, rounds=10)
    forward = cost["ends"][0] + model.config.n_layer * (cost["attn"][0] + cost["mlp"][0])
    cost["step"] = max(per_token / one - 1, 0.0) * forward
    return cost


def predicted_seconds(cost, steps, n_layer, drafted, exit_layer=0):
    """Seconds of a decoding's forwards. Per step (Result.steps): `depth` drafts through the
    sub-layers `drafted` (names), the block of depth + 1 tokens through layers exit_layer..L-1,
    with early exit one token (d_k) through layers 0..E-1, and the loop's own work."""
    def forward(parts, T):
        return cost["ends"][T - 1] + sum(cost[part][T - 1] for part in parts)
    early = forward(list(PARTS) * exit_layer, 1) if exit_layer else 0.0
    return sum(depth * forward(drafted, 1) + forward(list(PARTS) * (n_layer - exit_layer), depth + 1) + early
               + cost["step"] for _, _, depth in steps)


@torch.no_grad()
def search(model, prompts, k=4, new_tokens=48, log=print):
    """Greedy forward selection of the skip set, then the exit layer; returns what to save.

    Round by round, add the sub-layer whose skipping makes decoding the calibration prompts
    fastest; stop when no addition helps. (Exhaustive search would decode 2^(2L) skip sets,
    4096 for 6 layers; Draft & Verify uses Bayesian optimisation for LLaMA's 160 switches.)
    Then, for the skip set and for every exit layer, whether adaptive draft exit pays.
    """
    t0, L = time.perf_counter(), model.config.n_layer
    cost = forward_costs(model, k + 1)

    def speed(drafter):  # predicted tokens/s on the calibration prompts
        results = [generate(model, prompt, new_tokens, drafter) for prompt in prompts]
        drafted, exit_layer = (drafter.drafted_parts(), drafter.exit_layer) if drafter else ([], 0)
        seconds = sum(predicted_seconds(cost, r.steps, L, drafted, exit_layer) for r in results)
        return sum(len(r.tokens) for r in results) / seconds

    ar = speed(None)
    skip, best = frozenset(), 0.0
    while len(skip) < 2 * L:
        trials = {skip | {(layer, part)}: speed(LayerSkip(model, skip | {(layer, part)}, k))
                  for layer in range(L) for part in PARTS if (layer, part) not in skip}
        chosen = max(trials, key=trials.get)
        if trials[chosen] <= best:
            break
        skip, best = chosen, trials[chosen]
        log(f"layerskip search: skip {sorted(skip)}: {best / ar:.2f}x autoregressive (predicted)")
    gammas = {gamma: speed(LayerSkip(model, skip, k, gamma=gamma)) / ar for gamma in GAMMAS}
    gamma = max(gammas, key=gammas.get)
    exits = {(E, g): speed(EarlyExit(model, E, k, gamma=g)) / ar for E in range(1, L) for g in GAMMAS}
    exit_layer, exit_gamma = max(exits, key=exits.get)
    log(f"layerskip: gamma {gamma}, {gammas[gamma]:.2f}x; earlyexit by (exit layer, gamma): "
        f"{ {key: round(s, 2) for key, s in exits.items()} } (predicted); took {time.perf_counter() - t0:.0f}s")
    return {"n_layer": L, "skip": sorted(skip), "gamma": gamma, "exit_layer": exit_layer, "exit_gamma": exit_gamma,
            "speedup": gammas[gamma], "exit_speedup": exits[exit_layer, exit_gamma]}


def save_search(model, train_ids, folder, k=4, log=print):
    """Search on 8 windows of the training tokens; save the result as folder/layerskip.pt."""
    prompts, _ = get_batch(train_ids, 8, 32, torch.Generator().manual_seed(0))
    checkpoint.save(Path(folder) / SEARCH_FILE, "layerskip", **search(model, prompts.tolist(), k, log=log))
    log(f"saved {Path(folder) / SEARCH_FILE}")


# LayerSkip's training recipe: layer dropout and an early-exit loss through the shared head.

def dropout_rates(n_layer, p_max):
    """p_l = p_max * (2^(l/(L-1)) - 1): the first layer is never dropped, the last with p_max."""
    return [p_max * (2 ** (layer / max(n_layer - 1, 1)) - 1) for layer in range(n_layer)]


def layerskip_loss(model, x, y, step, generator, p_max=0.2, e_scale=1.0, rotation=2):
    """LayerSkip's loss on token ids x and targets y (B, T). A dropped layer is dropped for the
    whole batch (then it costs nothing). The loss after layer l is weighted by 1 + 2 + ... + (l+1),
    times e_scale unless l is the last layer. Early exits take turns (the rotational curriculum):
    at step s the exit after layer l is trained when (l - s) % rotation == 0; the last one always."""
    L, T = model.config.n_layer, x.size(1)
    pos, mask = torch.arange(T, device=x.device), masks.causal(T, x.device)
    dropped = torch.rand(L, generator=generator) < torch.tensor(dropout_rates(L, p_max))
    h = model.embed(x, pos)  # (B, T, C)
    loss, weights = 0.0, 0.0
    for layer in range(L):
        if not dropped[layer]:
            h = model.run_layers(h, mask, layers=[layer])
        if layer == L - 1 or (layer - step) % rotation == 0:
            w = (layer + 1) * (layer + 2) / 2 * (1.0 if layer == L - 1 else e_scale)
            loss = loss + w * F.cross_entropy(model.head(h)[0].flatten(0, 1), y.flatten())
            weights += w
    return loss / weights


def train_layerskip(model, train_ids, val_ids, steps, batch_size, lr, seed=0, log=print, label="target (layerskip)"):
    """train.train_lm with LayerSkip's loss: a target whose early layers can draft for it."""
    block = model.config.block_size
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # the same batches as train_lm's
    dropout_generator = torch.Generator().manual_seed(seed + 1)
    model.train()

    def batch_loss(step):
        x, y = get_batch(train_ids, batch_size, block, generator)
        return layerskip_loss(model, x.to(device), y.to(device), step, dropout_generator)

    result = fit(model.parameters(), batch_loss, steps, lr, batch_size * block,
                 val_loss=lambda: eval_lm(model, val_ids, batch_size, block), label=label, log=log)
    model.eval()
    return {**result, "recipe": "layerskip"}  # recorded with the target by train_tiny.py
