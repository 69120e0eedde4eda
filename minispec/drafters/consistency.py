"""Consistency training of the target (CLLM): teach the model to jump to the end of a Jacobi trajectory.

Kou, Hu, He, Deng & Zhang, "CLLMs: Consistency Large Language Models" (ICML 2024), and its
repository hao-ai-lab/Consistency_LLM.

Jacobi iteration (drafters/jacobi.py) solves an n-token greedy block by refining a guess until
it stops changing, and on a model trained left to right it needs about one iteration per token:
a token rarely comes out right while a token before it is still wrong. CLLM changes the model,
not the drafter. It fine-tunes the target so that from ANY state of a Jacobi trajectory it
predicts the trajectory's fixed point, and then the `jacobi` drafter, unchanged, gets several
tokens right per forward. It stays lossless: the loop verifies every guess against the tuned
model, so decoding gives exactly the tuned model's greedy tokens (or its samples). It is a new
target, though: what it writes is whatever the tuning left of the original.

The trajectory (`jacobi_trajectories`). For a prompt x, guess an n-token block y(0) (tokens
drawn at random from the prompt, as CLLM does), then iterate y(j+1)_i = argmax p(. | x, y(j)_<i)
until the block stops changing: y(J) = y* is exactly the greedy continuation. Every state is
kept; y* joins the prefix and the next block starts. The prefix sits in a KV cache and each
iteration is one cached forward over the n block tokens of a whole batch of prompts. Along the
way a token joins the converged prefix of the block in one of three ways (`jacobi_counts`):
the first wrong token always does (everything before it was right: plain Jacobi's guarantee);
a token after it that was wrong and comes out right is "fast-forwarded"; one that was already
right and stays right is "stationary". Consistency training is meant to raise the last two.

The loss (`consistency_loss`), for a block of prefix x, fixed point y* and some states y:
    consistency = KL( p_orig(. | x, y*_<=i)  ||  p_model(. | x, y_<=i) )   over i with y_<=i != y*_<=i
    ar          = KL( p_orig(. | x, y*_<=i)  ||  p_model(. | x, y*_<=i) )  over every i
p_orig is a frozen copy of the target before tuning. The first term is CLLM's global consistency
loss with the fixed point's whole distribution as the label; the mask drops the positions whose
input is the converged part of the block (a Jacobi block is causal over prefix + block, so
there the state's input IS the fixed point's and there is nothing to learn). The second keeps
the model writing what it wrote: CLLM trains next-token prediction on the target's own greedy
text for that; distilling the frozen original on the same text keeps the whole distribution,
not only its argmax. (CLLM takes the label distributions from the model being tuned,
detached; with a frozen copy the target of both terms does not move during training.) One
forward serves the fixed point and several states of a block: they share the prefix under
masks.shared_prefix and never see each other. Greedy text alone is a narrow diet (this
target's repeats itself), so `distillation_loss` adds the same KL on corpus windows, which
keeps the validation loss where it was.

`tune_consistency` collects trajectories of the frozen original's greedy text from corpus
prompts and minimises consistency + ar_weight * ar with train.fit. `jacobi_report` measures what
it changed, on held-out prompts: iterations per block, fast-forwarded and stationary tokens,
and distinct tokens per block of the greedy text (a model that learned to repeat itself
converges fast too, and is no longer the same model).

What the defaults come from (the README has the measurements). This tiny target's greedy text
repeats itself a lot, and a repeated token is the easiest one to fast-forward: with the keeping
terms weighted 1 the tuned target converged in far fewer iterations, but its greedy text held
about half as many distinct tokens, and the gain sat in exactly those repetitive blocks. Weight
4, and dropping blocks whose fixed point has fewer than 3 distinct tokens (as CLLM drops
repetitive samples), keep the text as varied as the original's and the validation loss close
to it, and leave little of the gain: on varied text the tuned model rarely gets a token right
behind a wrong one.
"""

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint, masks
from ..data import get_batch
from ..errors import MinispecError
from ..kvcache import KVCache
from ..train import eval_lm, fit


@dataclass
class Trajectories:
    seq: torch.Tensor  # (B, L + blocks * n) each prompt, then its greedy continuation: the blocks' fixed points
    states: list  # per block: (J + 1, B, n) the Jacobi states, iteration by iteration (the last is y*)
    steps: torch.Tensor  # (blocks, B) the iterations each block took to reach its fixed point
    prompt_len: int  # L
    n: int  # tokens per block

    def prefix(self, block):
        """(B, L + block * n): what the block continues."""
        return self.seq[:, :self.prompt_len + block * self.n]

    def fixed_point(self, block):
        """(B, n)"""
        start = self.prompt_len + block * self.n
        return self.seq[:, start:start + self.n]


@torch.no_grad()
def jacobi_trajectories(model, prompts, n=16, blocks=1, seed=0):
    """Jacobi-iterate `blocks` consecutive n-token blocks after each prompt; prompts (B, L) of
    equal length. Returns the Trajectories, on the CPU."""
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    B, L = prompts.shape
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache.for_model(model, batch=B, max_len=L + blocks * n)
    pos = torch.arange(L, device=device)
    logits, _ = model(prompts, pos, masks.causal(L, device), cache, pos)  # (B, L, V)
    first = logits[:, -1].argmax(-1)  # (B,) a block's first token depends on the prefix alone
    rows = torch.arange(B, device=device)[:, None]
    seq, states, steps = [prompts], [], []
    for block in range(blocks):
        start = L + block * n
        slots = torch.arange(start, start + n, device=device)
        mask = masks.cached_block(start, masks.causal(n), start + n, device)  # (n, start + n)
        guess = prompts[rows, torch.randint(L, (B, n), generator=generator).to(device)]  # (B, n) y(0)
        trajectory = [guess]
        while True:  # every row gains at least one final token per iteration: at most n + 1 forwards
            logits, _ = model(guess, slots, mask, cache, slots)  # (B, n, V) the block's keys land in its slots
            update = torch.cat([first[:, None], logits[:, :-1].argmax(-1)], 1)  # (B, n) y(j+1)
            if torch.equal(update, guess):  # every row at its fixed point, and the cache holds y*
                break
            guess = update
            trajectory.append(guess)
        first = logits[:, -1].argmax(-1)  # the next block's first token
        trajectory = torch.stack(trajectory)  # (J + 1, B, n)
        steps.append((trajectory == guess).all(-1).int().argmax(0))  # (B,) the first state equal to y*
        states.append(trajectory.cpu())
        seq.append(guess)
    return Trajectories(torch.cat(seq, 1).cpu(), states, torch.stack(steps).cpu(), L, n)


GUARANTEED, FAST_FORWARDED, STATIONARY = 1, 2, 3  # how a token joined the converged prefix (0: there from the start)


def jacobi_counts(states):
    """states (J + 1, B, n), a trajectory per row ending at its fixed point -> (iterations (B,),
    how (B, n)). Iteration j + 1 maps state j to state j + 1; the tokens it adds to the block's
    converged prefix are its first wrong token (GUARANTEED: every input before it was right), then
    the FAST_FORWARDED ones (wrong in state j, right now) and the STATIONARY ones (right in state
    j and still right)."""
    right = states == states[-1]  # (J + 1, B, n)
    converged = right.int().cumprod(-1).sum(-1)  # (J + 1, B) length of the right prefix of each state
    iterations = (converged < states.size(-1)).sum(0)  # (B,)
    position = torch.arange(states.size(-1))
    joins = (position >= converged[:-1, :, None]) & (position < converged[1:, :, None])  # (J, B, n)
    first = position == converged[:-1, :, None]
    how = (GUARANTEED * (joins & first) + FAST_FORWARDED * (joins & ~first & ~right[:-1])
           + STATIONARY * (joins & ~first & right[:-1])).sum(0)  # (B, n) each token joins once at most
    return iterations, how


def distinct_tokens(blocks):
    """blocks (..., n) token ids -> (...) how many distinct ids each holds."""
    blocks = blocks.sort(-1).values
    return (blocks[..., 1:] != blocks[..., :-1]).sum(-1) + 1


def distinct_per_block(tokens, n=16):
    """Mean number of distinct ids in the consecutive n-token blocks of tokens (B, m), m a multiple of n."""
    return distinct_tokens(tokens.reshape(-1, n)).float().mean().item()


def kl(target_logp, logp):
    """KL(target || model) per position, from log-probabilities (..., V) -> (...)."""
    return (target_logp.exp() * (target_logp - logp)).sum(-1)


def consistency_loss(model, original, prefix, states, fixed):
    """prefix (B, T), states (B, G, n) Jacobi states of the block after it, fixed (B, n) their fixed
    point -> (consistency, ar), the two scalar losses described above. original: the frozen model
    whose distributions at the fixed point are the labels. Only the block positions go through
    the LM head: the prefix is context, its text's turn comes when it is a block itself."""
    B, T = prefix.shape
    G, n = states.shape[1:]
    device = prefix.device
    text = torch.cat([prefix, fixed], 1)  # (B, T + n)
    with torch.no_grad():
        hidden = original.run_layers(original.embed(text, torch.arange(T + n, device=device)),
                                     masks.causal(T + n, device))
        label = original.head(hidden[:, T:])[0].log_softmax(-1)  # (B, n, V) after each fixed-point token
    x = torch.cat([text, states.flatten(1)], 1)  # (B, T + (G + 1) n): the fixed point, then G states
    pos = torch.cat([torch.arange(T + n), torch.arange(T, T + n).repeat(G)]).to(device)
    hidden = model.run_layers(model.embed(x, pos), masks.shared_prefix(T, n, G + 1, device))
    logp = model.head(hidden[:, T:])[0].log_softmax(-1).unflatten(1, (G + 1, n))  # (B, G + 1, n, V)
    ar = kl(label, logp[:, 0]).mean()
    at_states = kl(label[:, None], logp[:, 1:])  # (B, G, n)
    read_a_wrong_token = (states != fixed[:, None]).cumsum(-1) > 0  # (B, G, n): input differs from y*'s
    consistency = (at_states * read_a_wrong_token).sum() / read_a_wrong_token.sum().clamp(min=1)
    return consistency, ar


def distillation_loss(model, original, x):
    """KL(original || model) of the next-token distributions over corpus windows x (B, T)."""
    T = x.size(1)
    pos, mask = torch.arange(T, device=x.device), masks.causal(T, x.device)
    with torch.no_grad():
        label = original(x, pos, mask)[0].log_softmax(-1)  # (B, T, V)
    return kl(label, model(x, pos, mask)[0].log_softmax(-1)).mean()


def collect(model, ids, n_prompts, prompt_len, n, blocks, batch_size=128, seed=0, log=print):
    """Trajectories after n_prompts corpus windows of prompt_len tokens, batch_size at a time:
    a list of Trajectories."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for b in range(0, n_prompts, batch_size):
        prompts, _ = get_batch(ids, min(batch_size, n_prompts - b), prompt_len, generator)
        out.append(jacobi_trajectories(model, prompts, n, blocks, seed=seed + b))
        if log:
            log(f"trajectories: {b + prompts.size(0)}/{n_prompts} prompts x {blocks} blocks of {n} tokens")
    return out


def jacobi_report(model, ids, n_prompts=64, prompt_len=32, n=16, blocks=4, seed=1234):
    """Jacobi on held-out prompts (corpus windows of ids): mean iterations, fast-forwarded and
    stationary tokens per n-token block, and distinct tokens per block of the greedy text."""
    model.eval()
    trajectories = collect(model, ids, n_prompts, prompt_len, n, blocks, seed=seed, log=None)
    counts = []  # per block: (iterations, fast-forwarded, stationary)
    for t in trajectories:
        for b in range(blocks):
            iterations, how = jacobi_counts(t.states[b])
            counts.append(torch.stack([iterations, (how == FAST_FORWARDED).sum(1), (how == STATIONARY).sum(1)]))
    iterations, fast_forwarded, stationary = torch.cat(counts, 1).float().mean(1).tolist()
    greedy = torch.cat([t.seq[:, prompt_len:] for t in trajectories])
    return {"iterations": iterations, "fast_forwarded": fast_forwarded, "stationary": stationary,
            "distinct": distinct_per_block(greedy, n), "blocks": n_prompts * blocks, "n": n}


def tune_consistency(model, train_ids, val_ids, steps, n_prompts=512, prompt_len=32, n=16, blocks=8,
                     batch_size=16, states_per_block=3, corpus_windows=4, lr=3e-4, ar_weight=4.0, min_distinct=3,
                     seed=0, log=print):
    """Fine-tune `model` in place (CLLM). Trajectories: n_prompts corpus windows of train_ids, each
    continued by `blocks` Jacobi blocks of n tokens with the model as it is now (the original).
    A step: batch_size blocks of one block index (none whose fixed point holds fewer than
    min_distinct distinct tokens), each with states_per_block states drawn uniformly from the
    iterations of its trajectory before the fixed point, and corpus_windows corpus windows;
    the loss is consistency + ar_weight * (ar + the corpus KL).
    Returns a dict: the time taken, fit's result, and jacobi_report before and after."""
    t0 = time.perf_counter()
    blocks = min(blocks, (model.config.block_size - prompt_len) // n)  # as many as the context holds
    original = copy.deepcopy(model).eval().requires_grad_(False)
    before = jacobi_report(original, val_ids, prompt_len=prompt_len, n=n)
    before["val_loss"] = eval_lm(original, val_ids, batch_size, model.config.block_size)
    t1 = time.perf_counter()
    trajectories = collect(original, train_ids, n_prompts, prompt_len, n, blocks, seed=seed, log=log)
    collect_s = time.perf_counter() - t1
    # CLLM drops repetitive samples: here blocks whose fixed point has fewer than min_distinct distinct tokens
    varied = [distinct_tokens(t.seq[:, prompt_len:].unflatten(1, (blocks, n))) >= min_distinct for t in trajectories]
    if not any(v.any() for v in varied):
        raise MinispecError(f"every trajectory block has fewer than {min_distinct} distinct tokens: nothing to learn")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)

    def batch_loss(step):
        rows = []
        while len(rows) == 0:  # a batch of trajectory blocks at the same block index, not repetitive ones
            chunk = int(torch.randint(len(trajectories), (1,), generator=generator))
            block = int(torch.randint(blocks, (1,), generator=generator))
            rows = varied[chunk][:, block].nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)[:batch_size]]  # (B,)
        iterations = trajectories[chunk].steps[block, rows]  # (B,) states 0..J-1 are not the fixed point yet
        j = (torch.rand(len(rows), states_per_block, generator=generator) * iterations[:, None]).long()  # (B, G)
        states = trajectories[chunk].states[block][j, rows[:, None]]  # (B, G, n)
        prefix, fixed = trajectories[chunk].prefix(block)[rows], trajectories[chunk].fixed_point(block)[rows]
        consistency, ar = consistency_loss(model, original, prefix.to(device), states.to(device), fixed.to(device))
        corpus, _ = get_batch(train_ids, corpus_windows, model.config.block_size, generator)
        return consistency + ar_weight * (ar + distillation_loss(model, original, corpus.to(device)))

    model.train()
    tokens_per_step = (batch_size * (prompt_len + (blocks + 1) / 2 * n + states_per_block * n)  # on average
                       + corpus_windows * model.config.block_size)
    result = fit(model.parameters(), batch_loss, steps, lr, tokens_per_step, label="consistency", log=log,
                 val_loss=lambda: eval_lm(model, val_ids, batch_size, model.config.block_size))
    model.eval()
    after = jacobi_report(model, val_ids, prompt_len=prompt_len, n=n)
    after["val_loss"] = result["val_loss"]
    result.update(collect_seconds=collect_s, seconds=time.perf_counter() - t0, before=before, after=after)
    log(f"consistency tuning: {time.perf_counter() - t0:.0f}s in all ({collect_s:.0f}s collecting trajectories); "
        f"on held-out prompts, before -> after: val loss {before['val_loss']:.3f} -> {after['val_loss']:.3f}, "
        + ", ".join(f"{name.replace('_', '-')} {before[name]:.2f} -> {after[name]:.2f}"
                    for name in ("iterations", "fast_forwarded", "stationary", "distinct"))
        + f" (per {n}-token block, {before['blocks']} blocks)")
    return result


def save_plain_target(folder, model):
    """Keep the target before tuning next to the tuned one, as folder/target_plain.pt (lesson 06
    shows a trajectory of each)."""
    checkpoint.save_gpt(Path(folder) / "target_plain.pt", "target_plain", model)


def load_plain_target(folder, device="cpu"):
    """The target before consistency tuning, or None when the folder holds no target_plain.pt."""
    path = Path(folder) / "target_plain.pt"
    if not path.is_file():
        return None
    return checkpoint.load_gpt(checkpoint.load(path, "target_plain", device, config=dict, model=dict), device, path)
