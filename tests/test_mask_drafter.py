"""The [M]-token drafter: its masks, its one-forward training, and its cache (no [M] ever leaks)."""

from dataclasses import replace

import pytest
import torch

import minispec
from minispec import masks, speculative, train
from minispec.drafters import mask_drafter, mask_training
from minispec.cudagraph import StaticForwards
from minispec.kvcache import KVCache
from tests.helpers import M_BLOCK_3_3, drawn, prompts, random_gpt


def test_mask_token_block_is_the_drawn_matrix():
    assert torch.equal(masks.mask_token_block(3, 3), M_BLOCK_3_3)


def test_mask_token_block_behind_a_cached_prefix():
    # 2 tokens already cached, 2 newly accepted tokens and 2 [M]s in slots 2..5, stale slots 6..7
    assert torch.equal(masks.cached_block(2, masks.mask_token_block(2, 2), 8), drawn("""
        1 1 1 . . . . .
        1 1 1 1 . . . .
        1 1 1 1 1 1 . .
        1 1 1 1 1 1 . .
    """))


def test_mask_token_training_is_the_drawn_matrix():
    # 4 tokens; a group of 2 [M]s cut after token 1, another cut after token 3
    assert torch.equal(masks.mask_token_training(4, [1, 3], 2), drawn("""
        1 . . . . . . .
        1 1 . . . . . .
        1 1 1 . . . . .
        1 1 1 1 . . . .
        1 . . . 1 1 . .
        1 . . . 1 1 . .
        1 1 1 . . . 1 1
        1 1 1 . . . 1 1
    """))


def test_one_training_forward_equals_one_drafting_step_per_cut():
    """Each [M] group of a training forward gets the logits a decoding step at its cut would."""
    torch.manual_seed(0)
    drafter = mask_drafter.SpecDrafter(minispec.GPTConfig(32, 11, 2, 2, 16), k_max=3).eval()
    x, feats = torch.randint(11, (2, 20)), torch.randn(2, 20, 16)
    cuts, k = torch.tensor([4, 9, 17]), 3
    pos, offsets, mask, labels = mask_training.mask_token_batch(x, cuts, k)
    together = drafter(x, feats, pos, offsets, mask)  # (2, 9, V)
    for j, r in enumerate(cuts.tolist()):
        alone = drafter(x[:, :r], feats[:, :r], torch.arange(r + k), torch.arange(k), masks.mask_token_block(r, k))
        assert torch.allclose(together[:, j * k:(j + 1) * k], alone, atol=1e-5)
        assert torch.equal(labels[:, j * k:(j + 1) * k], x[:, r:r + k])


def fresh_prefill(drafter, target, ids):
    """The drafter's cache after feeding ids at once, with the features of one target forward."""
    cache = KVCache.for_model(drafter.gpt)
    x, pos = torch.tensor([ids]), torch.arange(len(ids))
    feats = mask_drafter.target_outputs(target, x)[0]
    drafter(x, feats, pos, pos[:0], masks.causal(len(ids)), cache, pos)  # no [M]: just the prefix
    return cache


@pytest.mark.parametrize("k", [1, 4, 8])
def test_cache_is_the_accepted_prefix_after_every_step(k, tiny, tiny_ckpt):
    """After each step the drafter's cache equals a fresh prefill of the accepted tokens, and the
    slots behind them (where [M]s were written) never matter: filling them with garbage before
    every step changes nothing. (The features, for a drafter that reads them: the online-equals-
    replay tests below.)"""
    model, _ = tiny
    drafter = minispec.make_drafter("mask", model, ckpt=tiny_ckpt, k=k)
    prompt = [10, 11, 12, 13, 14]
    clean = speculative.generate(model, prompt, 60, drafter)
    seq, checked = list(prompt), []
    observe = drafter.observe

    def check_then_poison(step):
        if len(step.tokens) == 1:  # a last step with no room to draft: no drafter forward, nothing fed
            seq.extend(step.emitted)
            checked.append(None)
            return observe(step)
        fed = drafter.fed
        assert fed == len(seq)  # every accepted token up to x_t is in the cache ...
        fresh = fresh_prefill(drafter.drafter, model, seq[:fed])
        assert torch.allclose(drafter.cache.kv[..., :fed, :], fresh.kv[..., :fed, :], atol=1e-4)  # ... as a prefill
        drafter.cache.kv[..., fed:, :] = 1e3 * torch.randn_like(drafter.cache.kv[..., fed:, :])
        seq.extend(step.emitted)
        checked.append(fed)
        observe(step)

    drafter.observe = check_then_poison
    poisoned = speculative.generate(model, prompt, 60, drafter)
    assert poisoned.tokens == clean.tokens and poisoned.steps == clean.steps  # same drafts, same acceptances
    assert len(checked) == clean.stats.target_forwards and clean.stats.accepted > 0


def test_one_drafter_forward_per_step(tiny, tiny_ckpt):
    model, _ = tiny
    drafter = minispec.make_drafter("mask", model, ckpt=tiny_ckpt, k=8)
    calls = []
    hook = drafter.drafter.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        res = speculative.generate(model, [10, 11, 12, 13], 40, drafter)
    finally:
        hook.remove()
    assert calls[0][1] == 0  # the prompt's prefill at the first step, no [M]
    assert len(calls) - 1 == res.stats.target_forwards  # then all k drafts of a step from one forward
    assert max(shape[1] for shape in calls) == 8  # (1, k, V): the logits of k [M]s


def test_k_beyond_the_trained_k_is_a_clear_error(tiny, tiny_ckpt):
    model, _ = tiny
    with pytest.raises(minispec.MinispecError, match="k=99"):
        minispec.make_drafter("mask", model, ckpt=tiny_ckpt, k=99)


def test_no_checkpoint_says_how_to_make_one():
    with pytest.raises(minispec.MinispecError, match="python train_tiny.py"):
        minispec.make_drafter("mask", random_gpt(), k=2)


def replayed(drafter, target, seq, k):
    """The [M]s' logits (k, V) for the prefix seq from scratch, the way training and mask_agreement
    compute them: one full target forward for the features, one uncached drafter forward over
    seq + k [M]s."""
    x, n = torch.tensor([seq]), len(seq)
    feats = mask_drafter.target_outputs(target, x)[0]
    return drafter(x, feats, torch.arange(n + k), torch.arange(k), masks.mask_token_block(n, k))[0]


def online_vs_replayed(target, drafter, prompt, n_new, net=None, **kwargs):
    """Decode with a MaskDrafter online, recording every step: returns [(seq, drafts, the [M]s'
    logits (k, V) of that step's drafter forward)] and the result. net: the set whose forwards
    are recorded (default the greedy set, drafter.drafter)."""
    steps, logits, propose = [], [], drafter.propose

    def recording(seq, room, sampling):
        draft = propose(seq, room, sampling)
        steps.append((list(seq), draft.tokens, logits[-1][0] if len(draft.tokens) else None))
        return draft

    drafter.propose = recording
    hook = (net or drafter.drafter).register_forward_hook(lambda module, args, out: logits.append(out.clone()))
    try:
        res = speculative.generate(target, prompt, n_new, drafter, **kwargs)
    finally:
        drafter.propose = propose
        hook.remove()
    return steps, res


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_set_trained_without_features_drafts_the_same_without_them(temperature, tiny, tiny_ckpt):
    """The default sets have a zero feature projection, so decoding skips the features: forcing
    their computation back on must give the very same drafts, distributions and tokens."""
    model, _ = tiny
    runs = []
    for features in (False, True):
        drafter = minispec.make_drafter("mask", model, ckpt=tiny_ckpt, k=3)
        assert not drafter.features
        drafter.features = features
        drafts = []
        propose = drafter.propose
        drafter.propose = lambda seq, room, sampling: drafts.append(propose(seq, room, sampling)) or drafts[-1]
        res = speculative.generate(model, [10, 11, 12, 13, 14], 40, drafter, temperature=temperature)
        runs.append((res.tokens, [d.tokens.tolist() for d in drafts], [d.q for d in drafts]))
    (tokens, drafted, qs), (tokens_f, drafted_f, qs_f) = runs
    assert tokens == tokens_f and drafted == drafted_f and any(drafted)
    assert all((q is None and q_f is None) or torch.equal(q, q_f) for q, q_f in zip(qs, qs_f))


def sharp_untrained(target, k, seed=0):
    """A random drafter whose logits are far from flat, so that its greedy drafts are well defined,
    and that listens to the features and to the other rows (a stale row or a misplaced feature
    changes its drafts)."""
    torch.manual_seed(seed)
    net = mask_drafter.SpecDrafter(replace(target.config, n_layer=1), k)
    with torch.no_grad():
        net.gpt.transformer.wte.weight.mul_(10)
        net.fuse.weight.mul_(50)
        net.mask_emb.mul_(50)
        for p in net.gpt.transformer.h.parameters():
            p.mul_(10)
    return mask_drafter.MaskDrafter(target, net.eval(), k)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("k", [1, 3])
def test_online_drafts_equal_replayed_drafts_untrained(k, temperature, static):
    """Every step's drafts (and their distributions) online, with the cache and the features that
    verification hands over, equal a from-scratch forward over the same prefix."""
    target = random_gpt(vocab_size=11, n_layer=2, block_size=48, scale=4.0)
    drafter = sharp_untrained(target, k)
    forwards = StaticForwards(graphs=False) if static else None
    steps, res = online_vs_replayed(target, drafter, [1, 2, 3, 4, 5], 30, temperature=temperature, seed=3,
                                    static=forwards)
    assert len(steps) == res.stats.target_forwards and sum(len(tokens) > 0 for _, tokens, _ in steps) > 5
    for seq, tokens, online in steps:
        if len(tokens) == 0:  # the last step, with no room to draft
            continue
        again = replayed(drafter.drafter, target, seq, len(tokens))
        assert torch.allclose(online, again, rtol=1e-4, atol=1e-4), f"step at {len(seq)}"
        if temperature == 0:
            assert torch.equal(tokens, again.argmax(-1)), f"step at {len(seq)}"


@pytest.mark.parametrize("k", [2, 4, 8])
def test_online_drafts_equal_replayed_drafts_trained(k, tiny, tiny_ckpt):
    """The trained drafter, greedy, on held-out prompts: online drafts == replayed drafts at every
    step, and the training label of [M]_i at each step (target_labels on the decoded text) is the
    token verification accepted or wrote at that place."""
    model, _ = tiny
    drafter = minispec.make_drafter("mask", model, ckpt=tiny_ckpt, k=k)
    for prompt in prompts(tiny_ckpt, n=3, seed=1):
        steps, res = online_vs_replayed(model, drafter, prompt, 48)
        text = torch.tensor([prompt + res.tokens])
        y = mask_drafter.target_outputs(model, text)[1].argmax(-1)
        for seq, tokens, online in steps:
            if len(tokens) == 0:
                continue
            again = replayed(drafter.drafter, model, seq, len(tokens))
            assert torch.allclose(online, again, rtol=1e-4, atol=1e-4), f"step at {len(seq)}"
            assert torch.equal(tokens, again.argmax(-1)), f"step at {len(seq)}"
            room = text.size(1) - len(seq)
            if room >= k:  # [M]_i's label: the token the target wrote at t+i
                labels = mask_training.target_labels(text, y, torch.tensor([len(seq)]), k)[0]
                assert torch.equal(labels, text[0, len(seq):len(seq) + k])


def test_the_sampling_set_drafts_when_sampling(tiny, tiny_ckpt):
    """Sampling drafts with the sampling set, replayed from scratch step by step, after a greedy
    call with the same drafter object (the cache is refilled for the set that drafts); then greedy
    decoding drafts with the greedy set again and is still identical to plain greedy decoding."""
    model, _ = tiny
    drafter = minispec.make_drafter("mask", model, ckpt=tiny_ckpt, k=3)
    prompt = prompts(tiny_ckpt, n=1, seed=2)[0]
    plain = speculative.generate(model, prompt, 32).tokens
    assert speculative.generate(model, prompt, 32, drafter).tokens == plain
    steps, _ = online_vs_replayed(model, drafter, prompt, 32, net=drafter.sampling_drafter, temperature=0.8, seed=1)
    assert sum(len(tokens) > 0 for _, tokens, _ in steps) > 3
    for seq, tokens, online in steps:
        if len(tokens) == 0:
            continue
        again = replayed(drafter.sampling_drafter, model, seq, len(tokens))
        assert torch.allclose(online, again, rtol=1e-4, atol=1e-4), f"step at {len(seq)}"
        assert not torch.allclose(online, replayed(drafter.drafter, model, seq, len(tokens)), atol=1e-3)
    assert speculative.generate(model, prompt, 32, drafter).tokens == plain


def test_greedy_runs_are_what_greedy_decoding_writes_after_every_prefix(tiny, tiny_ckpt):
    # the [M] rows' labels on corpus windows: the target's greedy run after each prefix, all at once
    model, _ = tiny
    x = torch.tensor([p[:24] for p in prompts(tiny_ckpt, n=8) if len(p) >= 24][:2])  # (2, 24)
    length = 5
    runs = train.greedy_runs(model, x, length, batch_size=1)  # (2, 24, 5)
    for b in range(len(x)):
        for c in range(x.size(1)):
            expected = speculative.generate(model, x[b, :c + 1].tolist(), length).tokens
            assert runs[b, c].tolist() == expected, (b, c)
