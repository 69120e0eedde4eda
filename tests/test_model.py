"""The model and its KV cache: cached == uncached, explicit-mask attention == a naive reference."""

import math

import pytest
import torch

from minispec import masks
from minispec.kvcache import KVCache
from tests.helpers import random_gpt

TOL = dict(atol=1e-5, rtol=1e-5)


def full_logits(model, ids):
    T = len(ids)
    logits, _ = model(torch.tensor([ids]), torch.arange(T), masks.causal(T))
    return logits[0]


def cached_logits(model, ids, chunk_sizes):
    """Feed ids through a KV cache in chunks of the given sizes; return every position's logits."""
    cache, out, start = KVCache.for_model(model), [], 0
    for n in chunk_sizes:
        pos = torch.arange(start, start + n)
        logits, _ = model(torch.tensor([ids[start:start + n]]), pos,
                          masks.cached_block(start, masks.causal(n), start + n), cache, pos)
        out.append(logits[0])
        start += n
    return torch.cat(out)


def test_cached_one_token_at_a_time_equals_full():
    model = random_gpt()
    ids = torch.randint(0, 11, (20,)).tolist()
    assert torch.allclose(cached_logits(model, ids, [1] * 20), full_logits(model, ids), **TOL)


@pytest.mark.parametrize("seed", range(5))
def test_cached_blocks_equal_full(seed):
    model = random_gpt(seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (30,), generator=g).tolist()
    chunks, left = [], 30
    while left:
        chunks.append(min(left, int(torch.randint(1, 6, (1,), generator=g))))
        left -= chunks[-1]
    assert torch.allclose(cached_logits(model, ids, chunks), full_logits(model, ids), **TOL)


def test_full_cache_width_and_stale_slots_are_hidden():
    """Reading all max_len slots (the CUDA-graph shape) with garbage in the unused ones changes nothing."""
    model = random_gpt()
    ids = torch.randint(0, 11, (10,)).tolist()
    cache = KVCache.for_model(model)
    cache.kv.normal_()  # stale garbage everywhere
    pos = torch.arange(10)
    logits, _ = model(torch.tensor([ids]), pos, masks.cached_block(0, masks.causal(10), cache.max_len), cache, pos)
    assert torch.allclose(logits[0], full_logits(model, ids), **TOL)


def test_block_at_other_slots_than_positions():
    """Slot and position are independent: a token's logits depend on its position, not its slot."""
    model = random_gpt()
    ids = [3, 1, 4, 1, 5]
    cache = KVCache.for_model(model)
    pos = torch.arange(4)
    model(torch.tensor([ids[:4]]), pos, masks.causal(4), cache, pos)
    # the last token at position 4, but written in slot 9, with slots 4..8 hidden
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, :4] = mask[0, 9] = True
    logits, _ = model(torch.tensor([[ids[4]]]), torch.tensor([4]), mask, cache, torch.tensor([9]))
    assert torch.allclose(logits[0, 0], full_logits(model, ids)[-1], **TOL)


def test_attention_equals_naive_softmax():
    model = random_gpt(n_head=2, n_embd=16)
    attn = model.transformer.h[0].attn
    T, C, nh = 7, 16, 2
    x = torch.randn(1, T, C)
    mask = masks.causal(T)
    q, k, v = attn.c_attn(x).split(C, dim=2)
    heads = []
    for h in range(nh):
        sl = slice(h * C // nh, (h + 1) * C // nh)
        scores = q[0, :, sl] @ k[0, :, sl].T / math.sqrt(C // nh)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[0, :, sl])
    naive = attn.c_proj(torch.cat(heads, -1))
    assert torch.allclose(attn(x, mask)[0], naive, **TOL)


def test_layer_subsets_and_skips():
    model = random_gpt(n_layer=4)
    ids = torch.tensor([[1, 2, 3, 4]])
    pos, mask = torch.arange(4), masks.causal(4)
    x = model.embed(ids, pos)
    staged = model.head(model.run_layers(model.run_layers(x, mask, layers=[0, 1]), mask, layers=[2, 3]))[0]
    assert torch.allclose(staged, model(ids, pos, mask)[0], **TOL)
    skip_layer_2 = {(2, "attn"), (2, "mlp")}
    assert torch.allclose(model(ids, pos, mask, skip=skip_layer_2)[0], model(ids, pos, mask, layers=[0, 1, 3])[0], **TOL)
    assert not torch.allclose(model(ids, pos, mask, skip={(1, "mlp")})[0], model(ids, pos, mask)[0], **TOL)


def test_kvcache_move():
    cache = KVCache(n_layer=2, n_head=1, head_dim=1, max_len=6)
    cache.kv[:, :, 0, 0, :, 0] = torch.arange(6.0)
    cache.move(torch.tensor([3, 5]), torch.tensor([1, 2]))
    assert cache.kv[0, 1, 0, 0, :, 0].tolist() == [0, 3, 5, 3, 4, 5]


def test_mask_must_be_bool_query_by_key():
    model = random_gpt()
    with pytest.raises(ValueError):
        model(torch.tensor([[1, 2]]), torch.arange(2), torch.ones(2, 2))
