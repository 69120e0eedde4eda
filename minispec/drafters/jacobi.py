"""Jacobi-iteration drafting, and Lookahead decoding's n-gram pool: drafting with no draft model.

Santilli et al., "Accelerating Transformer Inference for Translation via Parallel Decoding"
(ACL 2023); Fu, Bailis, Stoica & Zhang, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding" (ICML 2024), and its repository hao-ai-lab/LookaheadDecoding.

Greedy decoding as a system of equations. The m greedy tokens after a prompt x solve
    y_i = argmax p(. | x, y_1 .. y_{i-1})        i = 1..m.
Autoregressive decoding solves them one at a time. Jacobi iteration solves all of them at once:
guess y, run ONE causal forward over [x, y] and replace every y_i by the argmax at the position
before it. y_1 depends on x alone, so it is right after one iteration, y_2 after at most two, and
so on: at most m iterations reach exactly the greedy output. `jacobi_solve` shows this on a whole
block, for the lesson.

`jacobi`: Jacobi iteration as a drafter. The drafter keeps k guesses for the positions after
x_t. The loop's forward over [x_t, g_1..g_k] verifies them (greedy match) and, in the same pass,
yields the argmax o_i after every block token: the Jacobi update. After a accepted guesses and
the target's token o_a, the refined tail o_{a+1}..o_k becomes the next step's first guesses;
the positions no guess reaches yet start from the initial guess: copies of the newest token
(Santilli et al. start from padding; repeating the last token is as cheap and sometimes right,
in indentation and runs of punctuation). On a model trained left to right this gains little: a
token rarely becomes right while the one before it is still wrong (the CLLM authors measured
about 1.05x on 7B models). Consistency training (drafters/consistency.py, CLLM) fine-tunes the
target so that it does get tokens right behind wrong ones; this drafter then runs unchanged on
the tuned target, lossless with respect to that target.

`lookahead`: keep the Jacobi trajectory, not just its last guess. A 2-D window of N-1 levels of
W columns holds the last N-1 Jacobi iterations; level l, column c sits at position t + c + l,
and x_t itself is level 0, column 0 (W=5, N=4; letters are guesses, o the forward's outputs):

    position   t   t+1 t+2 t+3 t+4 t+5 t+6 t+7
    level 0    x_t a1  a2  a3  a4                 oldest iteration
    level 1        b0  b1  b2  b3  b4
    level 2            c0  c1  c2  c3  c4         newest iteration
    outputs                o0  o1  o2  o3  o4     the argmax after each c

Column c, a diagonal in this picture, reads (a_c, b_c, c_c, o_c), a_0 being x_t: N tokens at consecutive
positions, and o_c is the model's continuation of exactly that chain. Each step harvests the W
column n-grams into a pool keyed by their first token (at most G per key, most recent first),
then shifts the window up one level: the outputs become the newest level, the oldest level is
dropped and x_t's slot takes the new x_t (as the reference does, whatever the step accepted).
The verification branch is the pool's n-grams that start with x_t, verified as candidate paths.
Both branches run in the target's ONE forward, under masks.lookahead(W, N, G): each window token
sees one token per earlier position (level 0 up to its column, then its own column), each n-gram
sees x_t and itself, and the branches never see each other. For W=5, N=4, G=2:

         x a a a a b b b b b c c c c c n n n m m m
    x_t  1 . . . . . . . . . . . . . . . . . . . .      x_t = level 0, column 0
    a1   1 1 . . . . . . . . . . . . . . . . . . .      level 0: causal
    a2   1 1 1 . . . . . . . . . . . . . . . . . .
    a3   1 1 1 1 . . . . . . . . . . . . . . . . .
    a4   1 1 1 1 1 . . . . . . . . . . . . . . . .
    b0   1 . . . . 1 . . . . . . . . . . . . . . .      level 1: level 0 up to its column,
    b1   1 1 . . . . 1 . . . . . . . . . . . . . .      then itself
    b2   1 1 1 . . . . 1 . . . . . . . . . . . . .
    b3   1 1 1 1 . . . . 1 . . . . . . . . . . . .
    b4   1 1 1 1 1 . . . . 1 . . . . . . . . . . .
    c0   1 . . . . 1 . . . . 1 . . . . . . . . . .      level 2: level 0 up to its column,
    c1   1 1 . . . . 1 . . . . 1 . . . . . . . . .      its column at level 1, itself
    c2   1 1 1 . . . . 1 . . . . 1 . . . . . . . .
    c3   1 1 1 1 . . . . 1 . . . . 1 . . . . . . .
    c4   1 1 1 1 1 . . . . 1 . . . . 1 . . . . . .
    n1   1 . . . . . . . . . . . . . . 1 . . . . .      n-gram 1 (positions t+1..t+3)
    n2   1 . . . . . . . . . . . . . . 1 1 . . . .
    n3   1 . . . . . . . . . . . . . . 1 1 1 . . .
    m1   1 . . . . . . . . . . . . . . . . . 1 . .      n-gram 2
    m2   1 . . . . . . . . . . . . . . . . . 1 1 .
    m3   1 . . . . . . . . . . . . . . . . . 1 1 1

The window's tokens lie on no candidate path: the loop computes them only for observe() to read.
The accepted n-gram's cache entries are not at slots t+1.. but after the window; the loop moves
them there (the compaction step). The first window is tokens drawn from the prompt, as in the
reference; n-grams are harvested once every level above 0 is a model output. Optionally
(seed_pool) the pool also learns every n-gram of the text itself, the prompt and then each
accepted token, as the reference's POOL_FROM_PROMPT. Near the end of the token budget or of the
cache the whole block may not fit (it needs a cache slot per token, not per position): then the
newest n-gram for x_t is verified alone, as a chain, and the window waits.
With sampling the n-grams are deterministic candidates, tried in turn (verify.accept_candidates),
so the output keeps the target's distribution; the window's updates stay greedy.
"""

import torch

from .. import masks
from ..errors import MinispecError
from ..speculative import Draft, Drafter


@torch.no_grad()
def jacobi_solve(model, prompt, m, init):
    """Jacobi iteration of the whole m-token greedy system, with the full model and no cache.

    init: the m starting guesses. Returns (tokens, iterations): the fixed point, which is the
    greedy continuation, and how many updates changed the guess before it stopped changing.
    """
    device = next(model.parameters()).device
    n = len(prompt)
    prompt, guess = torch.as_tensor(prompt, device=device), torch.as_tensor(init, device=device)  # (n,), (m,)
    pos, mask = torch.arange(n + m, device=device), masks.causal(n + m, device)
    iterations = 0
    while True:  # after j updates the first j tokens are final, so this ends within m + 1 forwards
        logits, _ = model(torch.cat([prompt, guess])[None], pos, mask)  # (1, n+m, V)
        update = logits[0, n - 1:-1].argmax(-1)  # (m,) the prediction for each guessed position
        if torch.equal(update, guess):
            return guess.tolist(), iterations
        guess, iterations = update, iterations + 1


class Jacobi(Drafter):
    def __init__(self, k):
        self.k = k

    def start(self, prompt, cache):
        self.guesses = []  # guesses for the positions after x_t

    def propose(self, seq, room, sampling):
        k = min(self.k, room)
        self.guesses = (self.guesses + [seq[-1]] * k)[:k]  # unguessed positions: copies of x_t
        return Draft.chain(self.guesses)

    def observe(self, step):
        tail = step.logits[len(step.path):]  # (T - len(path), V) after the emitted token; none at depth 0
        self.guesses = tail.argmax(-1).tolist() if len(tail) else []  # the Jacobi update: the refined tail


class Lookahead(Drafter):
    def __init__(self, W, N, G, seed_pool=True):
        if W < 1 or N < 2 or G < 0:
            raise MinispecError(f"lookahead needs W >= 1, N >= 2 and G >= 0; got W={W}, N={N}, G={G}")
        self.W, self.N, self.G, self.seed_pool = W, N, G, seed_pool
        self.k = N - 1  # the longest draft a step can accept
        levels = torch.arange(N - 1)[:, None]
        self.window_depth = (levels + torch.arange(W)).flatten()[1:]  # (W*(N-1) - 1,) level + column, x_t left out
        self.block_masks = [masks.lookahead(W, N, g) for g in range(G + 1)]  # by the number of n-grams

    def start(self, prompt, cache):
        self.cache_len = cache.max_len  # the block needs a cache slot per token, not per position
        self.pool = {}  # first token -> up to G continuations of N-1 tokens, most recent first
        self.text_seen = 0  # seq[:text_seen] has given its n-grams to the pool
        self.updates = 0  # Jacobi updates the window has had
        # initial guess: tokens drawn from the prompt (the reference's default), reproducibly
        draw = torch.randint(len(prompt), (self.N - 1, self.W), generator=torch.Generator().manual_seed(0))
        self.window = torch.tensor(prompt)[draw]  # (N-1, W) level by level

    def remember(self, ngram):
        entries = self.pool.setdefault(ngram[0], [])
        rest = tuple(ngram[1:])
        if rest in entries:
            entries.remove(rest)
        entries.insert(0, rest)
        del entries[self.G:]

    def propose(self, seq, room, sampling):
        if room <= 0:  # nothing to draft: the pool catches up with the text next time
            self.window_in_block = False
            return Draft.chain([])
        if self.seed_pool:  # the text's own n-grams, from the prompt on
            for end in range(max(self.text_seen, self.N), len(seq) + 1):
                self.remember(seq[end - self.N:end])
            self.text_seen = len(seq) + 1
        self.window[0, 0] = seq[-1]
        ngrams = self.pool.get(seq[-1], [])
        n = self.N - 1
        tokens = torch.cat([self.window.flatten()[1:], torch.tensor(ngrams, dtype=torch.long).flatten()])
        depth = torch.cat([self.window_depth, torch.arange(1, n + 1).repeat(len(ngrams))])
        self.window_in_block = max(depth.tolist(), default=0) <= room and len(tokens) <= self.cache_len - len(seq)
        if not self.window_in_block:  # near the end of the budget or the cache: the newest n-gram alone
            return Draft.chain(ngrams[0][:room] if ngrams else [])
        first = self.window.numel()  # block index of the first n-gram token
        paths = [[0, *range(first + g * n, first + (g + 1) * n)] for g in range(len(ngrams))]
        return Draft(tokens, depth, self.block_masks[len(ngrams)], paths or [[0]])

    def observe(self, step):
        if not self.window_in_block:
            return
        newest = slice(self.window.numel() - self.W, self.window.numel())
        outputs = step.logits[newest].argmax(-1).cpu()  # (W,) the newest level's Jacobi update
        if self.updates >= self.N - 2:  # every level above 0 is a model output: harvest the columns
            for ngram in torch.cat([self.window, outputs[None]]).T.tolist():
                self.remember(ngram)
        self.window = torch.cat([self.window[1:], outputs[None]])
        self.updates += 1


def make_jacobi(model, ckpt=None, k=4, untrained=False):
    """k guesses, verified and refined by each forward. Training-free: ckpt and untrained are unused."""
    return Jacobi(k)


def make_lookahead(model, ckpt=None, k=4, untrained=False, W=2, N=None, G=2, seed_pool=True):
    """Lookahead with window W, n-gram size N (default k + 1: k is the longest accepted draft) and
    at most G n-grams per first token. Training-free: ckpt and untrained are unused.

    The defaults are the fastest measured on a 2-core CPU (k=4: W=2, N=5, G=2), where every window
    token costs compute; on a GPU wider blocks are nearly free (the reference README uses W=7, N=5, G=7).
    """
    return Lookahead(W, N or k + 1, G, seed_pool)
