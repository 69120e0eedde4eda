"""CUDA graphs: record a fixed-shape forward once, then replay it with one launch per step.

A forward of the tiny GPT is a few hundred small kernels. On a GPU each launch costs a few
microseconds of CPU time while the kernel itself runs for about as long, so the GPU idles and
decoding is bound by Python and the driver, not by arithmetic. A CUDA graph records every
kernel of one forward with its arguments; `replay()` launches the whole recording at once.
(The same trick as gpt-fast's torch.compile(mode="reduce-overhead"), written out by hand.)

A recording replays the SAME kernels on the SAME memory addresses, so everything it reads or
writes must be static:
- shapes: one graph per block shape (the autoregressive step T=1, a chain of k drafts T=k+1,
  the [M] block, Lookahead's block, a layer-skip draft step), all sharing one memory pool;
- the KV cache: allocated once (kvcache.py), written with index_copy_ at slots given as a tensor,
  and read over its FULL width max_len, the mask hiding the slots a step may not see;
- the inputs: token ids, positions, slots and the mask live in buffers allocated at capture
  time; each step `copy_`s its values into them before `replay()`;
- the outputs: the graph writes them into the same tensors every replay, so they are cloned
  before the next replay can overwrite them.
Acceptance (verify.py) stays outside the graphs: it reads the logits on the host, which is the
one synchronisation a step needs.

On CPU there are no graphs, but `StaticForwards(graphs=False)` runs the very same code path
eagerly: inputs copied into the same buffers, masks widened to the cache's full width. The tests
check it equals the plain path token for token, so the GPU path is tested everywhere except for
capture itself; on a GPU, tests/test_cudagraph.py checks capture too and lesson 08 times it.
"""

import time
from dataclasses import dataclass

import torch

from . import masks
from .errors import MinispecError
from .kvcache import KVCache


@dataclass
class Recording:
    fn: object  # the forward: fn(*inputs) -> tuple of tensors
    inputs: list  # static input buffers
    graph: torch.cuda.CUDAGraph | None  # None: run fn eagerly over the buffers
    outputs: tuple | None  # the graph's output tensors, overwritten by every replay


class StaticForwards:
    """Fixed-shape forwards over static buffers: captured as CUDA graphs, or run eagerly (graphs=False).

    One object serves a whole decoding session: its caches and recordings are reused by every
    `generate` call, since a graph is bound to the memory of the cache it was recorded with.
    """

    def __init__(self, graphs=True):
        if graphs and not torch.cuda.is_available():
            raise MinispecError("CUDA graphs need a CUDA GPU; on CPU use StaticForwards(graphs=False)")
        self.graphs = graphs
        self.pool = torch.cuda.graph_pool_handle() if graphs else None  # one pool for all graphs
        self.recordings = {}  # key -> Recording
        self.caches = {}  # id(model) -> (model, its KVCache)

    def cache_for(self, model):
        """The one static KV cache of `model` (the target or a drafter's own model)."""
        if id(model) not in self.caches:
            cache = KVCache.for_model(model)
            cache.static = self
            self.caches[id(model)] = (model, cache)  # holding the model keeps its id unique
        return self.caches[id(model)][1]

    def run(self, key, fn, *inputs):
        """fn(*inputs) through the recording for `key`, made on first use. The key must name
        everything fn bakes in besides its inputs: the model, the cache, the layers, the shapes."""
        rec = self.recordings.get(key)
        if rec is None:
            rec = self.recordings[key] = self.record(fn, inputs)
        for buffer, x in zip(rec.inputs, inputs):
            same = (buffer.shape, buffer.dtype, buffer.device) == (x.shape, x.dtype, x.device)
            assert same, f"recording {key}: an input changed shape, dtype or device"
            buffer.copy_(x)
        if rec.graph is None:
            return rec.fn(*rec.inputs)  # what a replay would run: the function recorded first
        rec.graph.replay()
        return tuple(out.clone() for out in rec.outputs)  # the next replay overwrites rec.outputs

    def record(self, fn, inputs):
        buffers = [x.clone() for x in inputs]  # allocated once, outside the graphs' pool
        if not self.graphs:
            return Recording(fn, buffers, None, None)
        # Warm up on a side stream first (PyTorch's rule for capture): the first calls allocate
        # workspaces and pick kernels, which must not happen inside the recording.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*buffers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(*buffers)
        return Recording(fn, buffers, graph, outputs)


def cache_like(cache, model):
    """A KV cache for a drafter's own `model`, run the way `cache` is: static (and reused) or plain."""
    return KVCache.for_model(model) if cache.static is None else cache.static.cache_for(model)


def run(cache, key, fn, idx, pos, mask, slots, *extra):
    """A forward over `cache`: fn(idx, pos, mask, slots, *extra) -> tuple of tensors.

    idx (B, T), pos (T,), mask (T, S) with S the slots read, slots (T,). With a plain cache fn is
    simply called. With a static one the mask is widened to all max_len slots (the extra columns
    False) and the call goes through the recording for this key and block size T.
    """
    if cache.static is None:
        return fn(idx, pos, mask, slots, *extra)
    key = (id(cache), idx.size(1), *key)
    return cache.static.run(key, fn, idx, pos, masks.widen(mask, cache.max_len), slots, *extra)


def forward(model, idx, pos, mask, cache, slots):
    """model(idx, pos, mask, cache, slots) -> (logits, hidden), static when the cache is."""
    return run(cache, ("forward", id(model)), lambda i, p, m, s: model(i, p, m, cache, s), idx, pos, mask, slots)


def seconds_per_call(f, reps=20, rounds=5):
    """Seconds one call of f() takes: the fastest of `rounds` rounds of `reps` calls, since other
    processes only ever slow a round down. On a GPU it waits for the kernels to finish."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # kernels run asynchronously: wait for them
        best = min(best, (time.perf_counter() - t0) / reps)
    return best
