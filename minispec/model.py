"""A small GPT in the GPT-2 architecture whose every forward takes an EXPLICIT attention mask.

The architecture is GPT-2's (Radford et al. 2019), as in nanoGPT: learned token and position
embeddings, pre-LayerNorm blocks of causal self-attention and a GELU MLP, a final LayerNorm and
an LM head tied to the token embedding, biases everywhere. The parameter names follow nanoGPT's,
so real GPT-2 weights load into it unchanged apart from the transposed Conv1D matrices.

What differs from nanoGPT is the contract of `forward`, which speculative decoding needs:
- positions are an input, not `arange(T)`: a draft tree or a Jacobi window puts several tokens
  at the same position, and a cached block starts wherever the prefix ends;
- the attention mask is an input, a boolean [T_query, S_keys] tensor (True = may attend); the
  model never assumes causality (minispec/masks.py builds every mask and can print it);
- with a KV cache the new keys and values are written at given cache slots and every query
  attends over cache slots 0..S-1, where S is the width of the mask;
- it can run any subset of its layers, starting from any hidden state, so one model serves as
  its own layer-skipping or early-exit drafter.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256  # the context: positions 0..block_size-1
    vocab_size: int = 2048
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, mask, cache=None, layer=0, slots=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            # write the new entries at their slots, then attend over slots 0..S-1 of the cache
            k, v = cache.write(layer, k, v, slots, width=mask.size(-1))  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's tanh GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache=None, layer=0, slots=None, run_attn=True, run_mlp=True):
        # a skipped sub-layer is the identity on the residual stream (Draft & Verify's sparse model)
        if run_attn:
            x = x + self.attn(self.ln_1(x), mask, cache, layer, slots)
        if run_mlp:
            x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    # The three stages of a forward, usable one by one (early exit resumes from a middle layer).

    def embed(self, idx, pos):
        """idx (B, T) token ids, pos (T,) or (B, T) positions -> residual stream (B, T, C)."""
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    def run_layers(self, x, mask, cache=None, slots=None, layers=None, skip=frozenset()):
        """Run the blocks listed in `layers` (default: all, in order) over x (B, T, C).

        mask (T, S) bool; cache: a KVCache or None; slots (T,) cache slots of the T tokens.
        skip: a set of (layer, "attn" | "mlp") sub-layers to replace by the identity.
        """
        for i in range(self.config.n_layer) if layers is None else layers:
            x = self.transformer.h[i](x, mask, cache, i, slots,
                                      run_attn=(i, "attn") not in skip, run_mlp=(i, "mlp") not in skip)
        return x

    def head(self, x):
        """Residual stream (B, T, C) -> (logits (B, T, V), final hidden state ln_f(x) (B, T, C))."""
        hidden = self.transformer.ln_f(x)
        return self.lm_head(hidden), hidden

    def forward(self, idx, pos, mask, cache=None, slots=None, layers=None, skip=frozenset()):
        """The whole model: token ids (B, T) at positions pos -> (logits (B, T, V), hidden (B, T, C)).

        Without a cache, mask is (T, T) over the T tokens themselves. With a cache, the tokens'
        keys and values are written at `slots` and mask is (T, S) over cache slots 0..S-1.
        """
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.size(0) != idx.size(1):
            raise ValueError(f"mask must be a bool [T_query, S_keys] tensor, got {tuple(mask.shape)} {mask.dtype}")
        x = self.embed(idx, pos)
        x = self.run_layers(x, mask, cache, slots, layers, skip)
        return self.head(x)
