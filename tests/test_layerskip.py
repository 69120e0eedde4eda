"""Self-drafting by layer skipping and early exit: the cache and the verification are exact.

The registry tests (test_methods.py) already check that both methods decode exactly like greedy
and sample the target's distribution; these check the two claims the methods rest on.
"""

import shutil

import pytest
import torch

import minispec
from minispec import checkpoint, masks, speculative
from minispec.errors import MinispecError
from minispec.kvcache import KVCache
from minispec.speculative import Sampling, Stats, generate
from minispec.drafters.layerskip import (SEARCH_FILE, EarlyExit, LayerSkip, dropout_rates, layerskip_loss,
                                         predicted_seconds, saved_search)
from minispec.train import lm_loss
from tests.helpers import random_gpt, run_script


class Spy(LayerSkip):
    """A layer-skip drafter that keeps a copy of the cache right after each draft."""

    def start(self, prompt, cache):
        super().start(prompt, cache)
        self.after_draft = []  # (t, kv) per step

    def propose(self, seq, room, sampling):
        draft = super().propose(seq, room, sampling)
        self.after_draft.append((len(seq) - 1, self.cache.kv.clone()))
        return draft


def test_nothing_a_skipped_layer_draft_wrote_survives(tiny, monkeypatch):
    model, _ = tiny
    L = model.config.n_layer
    skip = [(layer, "mlp") for layer in range(L)]  # every attention layer above the first sees a wrong stream
    caches, for_model = [], KVCache.for_model
    monkeypatch.setattr(KVCache, "for_model",
                        staticmethod(lambda m, **kw: caches.append(for_model(m, **kw)) or caches[-1]))
    wrote_wrong = 0
    for prompt, new_tokens in [([10, 11, 12], 1), ([10, 11, 12], 2), ([5, 6, 7, 8], 9), ([3], 30)]:
        caches.clear()
        drafter = Spy(model, skip, k=4, gamma=None)
        res = generate(model, prompt, new_tokens, drafter)
        seq = prompt + res.tokens
        n = len(seq) - 1  # the cache holds seq[:-1] after the last step
        fresh = for_model(model)
        speculative.prefill(model, fresh, seq[:-1])
        assert torch.allclose(caches[0].kv[..., :n, :], fresh.kv[..., :n, :], atol=1e-5)
        for t, kv in drafter.after_draft:  # the sparse pass did write wrong entries at slot t (x_t) ...
            wrote_wrong += int(not torch.allclose(kv[..., t, :], fresh.kv[..., t, :], atol=1e-3))
    assert wrote_wrong > 0  # ... so the check above is not vacuous


@torch.no_grad()
def draft_and_verify(model, drafter, prompt, room):
    """One step of the loop (speculative.step): returns the verification's logits, the block and the cache."""
    cache = KVCache.for_model(model)
    speculative.prefill(model, cache, prompt[:-1])
    drafter.start(prompt, cache)
    _, verified = speculative.step(model, drafter, prompt, cache, Sampling(), room, Stats())
    return verified.logits, verified.tokens, cache


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("room", [0, 1, 4])
@pytest.mark.parametrize("gamma", [None, 0.99])
def test_early_exit_verification_equals_a_full_forward(exit_layer, room, gamma, tiny):
    model, _ = tiny
    prompt = [10, 11, 12, 13, 14]
    drafter = EarlyExit(model, exit_layer, k=4, gamma=gamma)
    logits, tokens, cache = draft_and_verify(model, drafter, prompt, room)
    seq = prompt[:-1] + tokens.tolist()
    n = len(seq)
    full, _ = model(torch.tensor([seq]), torch.arange(n), masks.causal(n))
    t = len(prompt) - 1
    assert torch.allclose(logits, full[0, t:], atol=1e-5)
    fresh = KVCache.for_model(model)  # and every layer's cache entries are the full model's
    speculative.prefill(model, fresh, seq)
    assert torch.allclose(cache.kv[..., :n, :], fresh.kv[..., :n, :], atol=1e-5)


@torch.no_grad()
def test_adaptive_exit_drafts_fewer_and_steers_gamma():
    model = random_gpt(vocab_size=11, n_layer=3)  # near-uniform: the draft is never sure
    drafter = LayerSkip(model, [(2, "mlp")], k=4, gamma=0.5, target_accept=0.8, gamma_step=0.1)
    cache = KVCache.for_model(model)
    drafter.start([1, 2], cache)
    assert len(drafter.propose([1, 2], 4, Sampling()).tokens) == 1  # stops after its first unsure draft
    drafter.observe(speculative.Step(1, torch.tensor([2, 3]), [0], None, None, [4]))  # it was rejected
    assert drafter.gamma == pytest.approx(0.6)


@torch.no_grad()
def test_gamma_falls_only_where_the_exit_cut_the_draft_short():
    """All accepted, fewer drafts than k: where the exit stopped drafting, gamma falls (go further);
    where the room (the end of the text, or `--k auto`'s depth) asked for fewer, it stays."""
    model = random_gpt(vocab_size=11, n_layer=3)  # near-uniform: the draft is never sure
    for gamma0, room, gamma_after in ((0.5, 4, 0.4), (0.05, 2, 0.05), (0.5, 1, 0.5)):
        drafter = LayerSkip(model, [(2, "mlp")], k=4, gamma=gamma0, target_accept=0.8, gamma_step=0.1)
        drafter.start([1, 2], KVCache.for_model(model))
        draft = drafter.propose([1, 2], room, Sampling())
        n = len(draft.tokens)
        assert n == (1 if gamma0 == 0.5 else room)  # a top-1 above 1/11 is never below 0.05: it drafts all
        drafter.observe(speculative.Step(1, torch.cat([torch.tensor([2]), draft.tokens]), list(range(n + 1)),
                                         None, None, [4] * (n + 1)))  # every draft accepted
        assert drafter.gamma == pytest.approx(gamma_after)


def test_dropout_rates_and_loss_reduce_to_plain_training():
    rates = dropout_rates(6, 0.2)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    model = random_gpt()
    x, y = torch.randint(0, 11, (2, 12)), torch.randint(0, 11, (2, 12))
    plain = lm_loss(model, x, y)
    assert torch.allclose(layerskip_loss(model, x, y, 0, torch.Generator(), p_max=0.0, e_scale=0.0), plain)
    assert not torch.allclose(layerskip_loss(model, x, y, 0, torch.Generator(), p_max=0.0, e_scale=1.0), plain)


def test_predicted_seconds_adds_up_the_forwards():
    cost = {"ends": [1.0, 2.0, 3.0], "attn": [10.0, 20.0, 30.0], "mlp": [100.0, 200.0, 300.0], "step": 1000.0}
    assert predicted_seconds(cost, [([7], 0, 0)] * 5, 2, []) == 5 * (1 + 2 * 110 + 1000)  # autoregressive
    # two drafts through one MLP, then 3 tokens through layer 1 and d_2 through layer 0
    assert predicted_seconds(cost, [([7, 8], 1, 2)], 2, ["mlp"], exit_layer=1) == 2 * 101 + 333 + 111 + 1000


def test_train_tiny_trains_the_target_with_layerskip_and_searches_by_default(tiny_ckpt, tiny):
    model, _ = tiny
    assert checkpoint.target_meta(tiny_ckpt)["train"]["recipe"] == "layerskip"
    found = saved_search(model, tiny_ckpt)  # the conftest training passes no --layerskip flag
    assert found is not None, "no layerskip.pt: the default training did not search"
    assert found["n_layer"] == model.config.n_layer and 1 <= found["exit_layer"] < model.config.n_layer
    drafter = minispec.make_drafter("layerskip", model, ckpt=tiny_ckpt)
    assert drafter.skip == {(layer, part) for layer, part in found["skip"]}  # the saved set, not the default


def test_no_layerskip_trains_the_plain_target_and_drops_an_old_search(tiny_ckpt, tmp_path):
    out = tmp_path / "plain"
    shutil.copytree(tiny_ckpt, out)  # holds the LayerSkip target's search, which must not outlive it
    proc = run_script("train_tiny.py", "--preset", "test", "--no-layerskip", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recipe" not in checkpoint.target_meta(out)["train"]
    assert not (out / SEARCH_FILE).exists()


def test_the_saved_search_is_used(tiny, tmp_path):
    model, _ = tiny
    L = model.config.n_layer
    checkpoint.save(tmp_path / SEARCH_FILE, "layerskip", n_layer=L, skip=[(1, "mlp")], gamma=None, exit_layer=2,
                    exit_gamma=0.5)
    drafter = minispec.make_drafter("layerskip", model, ckpt=tmp_path)
    assert drafter.skip == {(1, "mlp")} and drafter.gamma0 is None
    drafter = minispec.make_drafter("earlyexit", model, ckpt=tmp_path)
    assert drafter.exit_layer == 2 and drafter.gamma0 == 0.5
    assert minispec.make_drafter("earlyexit", model).exit_layer >= 1  # no checkpoint: defaults
    checkpoint.save(tmp_path / SEARCH_FILE, "layerskip", n_layer=L + 1, skip=[], exit_layer=2)
    with pytest.raises(MinispecError):
        minispec.make_drafter("layerskip", model, ckpt=tmp_path)
