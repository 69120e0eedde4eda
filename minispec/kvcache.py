"""A static KV cache: one tensor allocated once, written at slot indices (as in gpt-fast).

Layout: (n_layer, 2, batch, n_head, max_len, head_dim), the 2 being keys and values. A forward
writes its tokens' keys and values at the slots it is given and its queries read slots 0..S-1,
S being the width of its attention mask. Nothing is ever appended or truncated, so:
- rolling back a rejected draft costs nothing: the next step's mask hides the stale slots and
  its own tokens overwrite them;
- every buffer keeps its address, which is what a captured CUDA graph needs;
- a slot is where an entry lives, a position is what its position embedding said. They differ
  inside a draft tree or a Lookahead window; `move` compacts accepted entries so that after
  every step slot == position again for the whole accepted prefix.
"""

import torch


class KVCache:
    static = None  # the cudagraph.StaticForwards that owns this cache, if its forwards are static

    def __init__(self, n_layer, n_head, head_dim, max_len, batch=1, device="cpu", dtype=torch.float32):
        self.max_len = max_len
        self.kv = torch.zeros(n_layer, 2, batch, n_head, max_len, head_dim, device=device, dtype=dtype)

    @classmethod
    def for_model(cls, model, batch=1, max_len=None):
        """A cache shaped for `model`, on its device and in its dtype; max_len defaults to its context."""
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, c.n_head, c.n_embd // c.n_head, max_len or c.block_size, batch, p.device, p.dtype)

    def write(self, layer, k, v, slots, width):
        """Store k, v (B, nh, T, hs) at `slots` (T,) of `layer`; return keys and values of slots 0..width-1."""
        self.kv[layer, 0].index_copy_(2, slots, k)
        self.kv[layer, 1].index_copy_(2, slots, v)
        return self.kv[layer, 0, :, :, :width], self.kv[layer, 1, :, :, :width]  # (B, nh, width, hs)

    def move(self, src, dst, layers=slice(None)):
        """Copy the entries of slots src (n,) to slots dst (n,) in every layer (the compaction step)."""
        self.kv[layers, :, :, :, dst] = self.kv[layers, :, :, :, src]
