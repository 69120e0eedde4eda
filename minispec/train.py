"""Training loops: one generic optimiser loop with a progress line, and the language-model loss.

`fit` trains any parameters on any loss: the target, the draft model and every trained drafter
go through it, each bringing its own `batch_loss`. It uses AdamW with a linear warm-up and a
cosine decay (as nanoGPT does) and prints one progress line every `log_every` steps:
step, train loss, validation loss, tokens/s and the time left.
"""

import math
import time

import torch
import torch.nn.functional as F

from . import masks
from .data import get_batch
from .kvcache import KVCache

SAMPLE_T = 0.8  # the temperature of the continuations that the drafters' sampling sets learn from


def lm_loss(model, x, y):
    """Next-token cross-entropy of a GPT on x (B, T) against y (B, T), causal mask."""
    T = x.size(1)
    logits, _ = model(x, torch.arange(T, device=x.device), masks.causal(T, x.device))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # decays to lr / 10


def fit(params, batch_loss, steps, lr, tokens_per_step, val_loss=None, log_every=50, label="train",
        log=print):
    """Minimise batch_loss(step) -> scalar over `steps` steps; return a dict of what happened.

    val_loss() -> float is called at every progress line and at the end, when given.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # weight decay on matrices, not on biases/norms
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = max(1, min(100, steps // 10))
    t0 = time.perf_counter()
    train_loss, result = float("nan"), {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_loss = loss.item() if step == 0 else 0.9 * train_loss + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - t0
            result = {"steps": step + 1, "train_loss": train_loss, "seconds": elapsed,
                      "tokens_per_s": tokens_per_step * (step + 1) / elapsed}
            line = f"{label} step {step + 1}/{steps} | train loss {train_loss:.3f}"
            if val_loss is not None:
                result["val_loss"] = val_loss()
                line += f" | val loss {result['val_loss']:.3f}"
            left = elapsed / (step + 1) * (steps - step - 1)
            log(line + f" | {result['tokens_per_s'] / 1000:.1f}k tok/s | {left:.0f}s left")
    return result


@torch.no_grad()
def eval_lm(model, ids, batch_size, block_size, batches=4, seed=1234):
    """Mean validation loss over a fixed set of batches (the same ones every call)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(batches):
        x, y = get_batch(ids, batch_size, block_size, generator)
        total += lm_loss(model, x.to(device), y.to(device)).item()
    model.train()
    return total / batches


def train_lm(model, train_ids, val_ids, steps, batch_size, lr, seed=0, log=print, label="target"):
    """Train a GPT as a language model on token ids (numpy arrays), in context-sized windows."""
    block = model.config.block_size
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    model.train()

    def batch_loss(step):
        x, y = get_batch(train_ids, batch_size, block, generator)
        return lm_loss(model, x.to(device), y.to(device))

    result = fit(model.parameters(), batch_loss, steps, lr, batch_size * block,
                 val_loss=lambda: eval_lm(model, val_ids, batch_size, block), label=label, log=log)
    model.eval()
    return result


@torch.no_grad()
def warm_start(model, target):
    """Start a shallower GPT of the target's width from the target itself: its embeddings, its
    final norm and its lowest blocks (a drafter then begins where the target's own reading of
    the text begins, and only has to learn the shortcut)."""
    model.transformer.wte.weight.copy_(target.transformer.wte.weight)
    model.transformer.wpe.weight.copy_(target.transformer.wpe.weight)
    model.transformer.ln_f.load_state_dict(target.transformer.ln_f.state_dict())
    for mine, theirs in zip(model.transformer.h, target.transformer.h):
        mine.load_state_dict(theirs.state_dict())
    return model


@torch.no_grad()
def continuations(model, ids, n_seqs=512, prefix_len=32, batch_size=64, seed=0, temperature=0.0, log=print):
    """Sequence-level distillation data: the model's own continuations of corpus prefixes.

    Draws n_seqs random prefixes from ids, continues each to the full context through a batched
    KV cache, greedily (temperature 0) or sampling at `temperature`, and returns the sequences
    (prefix + continuation) concatenated, each followed by the end-of-text id (the last
    vocabulary id), as a numpy array like the corpus.
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    eot = model.config.vocab_size - 1
    prefix_len = min(prefix_len, model.config.block_size // 4)
    new_tokens = model.config.block_size - prefix_len
    out = []
    for b in range(0, n_seqs, batch_size):
        x, _ = get_batch(ids, min(batch_size, n_seqs - b), prefix_len, generator)
        x = x.to(device)
        cache = KVCache.for_model(model, batch=x.size(0), max_len=prefix_len + new_tokens)
        seqs = [x]
        pos = torch.arange(prefix_len, device=device)
        logits, _ = model(x, pos, masks.causal(prefix_len, device), cache, pos)
        for i in range(new_tokens):
            if temperature == 0:
                nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            else:
                probs = torch.softmax(logits[:, -1] / temperature, -1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)  # (B, 1)
            seqs.append(nxt)
            if i + 1 < new_tokens:
                p = prefix_len + i
                slot = torch.tensor([p], device=device)
                logits, _ = model(nxt, slot, masks.cached_block(p, masks.causal(1), p + 1, device), cache, slot)
        full = torch.cat(seqs + [torch.full((x.size(0), 1), eot, device=device)], dim=1)
        out.append(full.flatten().cpu())
        kind = "greedy" if temperature == 0 else f"sampled (T={temperature})"
        log(f"distillation data: {min(b + batch_size, n_seqs)}/{n_seqs} {kind} continuations")
    return torch.cat(out).numpy().astype(ids.dtype)


@torch.no_grad()
def greedy_runs(model, x, length, batch_size=16):
    """What the model writes greedily after EVERY prefix of the windows x (B, T): (B, T, length),
    row c holding the `length` tokens that follow x[:, :c+1] in greedy decoding.

    The T runs of a window grow together, one token each per forward, through one KV cache: the
    window's entries in slots 0..T-1, then the j-th token of every run in slots jT..jT+T-1. Run c
    sees the window up to c and its own earlier tokens, as if it were decoded alone: forward j's
    mask (T, (j+1)T) is [causal(T) | I | ... | I], one identity block per earlier token. A run's
    positions past the context are clamped: those tokens are wrong, and callers never read them
    (only runs that fit are labels)."""
    device = x.device
    T = x.size(1)
    pos = torch.arange(T, device=device)
    out = []
    for xb in x.split(batch_size):
        cache = KVCache.for_model(model, batch=len(xb), max_len=T * length)
        logits, _ = model(xb, pos, masks.causal(T, device), cache, pos)
        runs = [logits.argmax(-1)]  # (b, T): the first token after each prefix
        for j in range(1, length):
            own = torch.eye(T, dtype=torch.bool, device=device).repeat(1, j)  # (T, j T): run c's earlier tokens
            mask = torch.cat([masks.causal(T, device), own], 1)
            pos_j = (pos + j).clamp(max=model.config.block_size - 1)
            logits, _ = model(runs[-1], pos_j, mask, cache, pos + j * T)
            runs.append(logits.argmax(-1))
        out.append(torch.stack(runs, -1))
    return torch.cat(out)


@torch.no_grad()
def greedy_agreement(target, draft, ids, batch_size=16, batches=4, seed=1234):
    """How often a draft GPT's next-token argmax equals the target's, on fixed held-out windows:
    the acceptance rate of a first greedy draft."""
    device = next(target.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    T = target.config.block_size
    pos, mask = torch.arange(T, device=device), masks.causal(T, device)
    same = 0.0
    for _ in range(batches):
        x, _ = get_batch(ids, batch_size, T, generator)
        x = x.to(device)
        same += (target(x, pos, mask)[0].argmax(-1) == draft(x, pos, mask)[0].argmax(-1)).float().mean().item()
    return same / batches
