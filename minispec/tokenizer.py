"""A byte-level BPE tokenizer trained offline and wrapped in a tiktoken.Encoding.

Follows GPT-2's recipe as retold in Karpathy's minbpe: split text into words with a
regex, count the words, then repeatedly merge the most frequent adjacent pair of tokens.
Training runs here in Python; encoding and decoding run in tiktoken's Rust core, which
only needs the "mergeable ranks" (token bytes -> rank) that training produces.
"""

import heapq
import re
from collections import Counter
from collections.abc import Iterable

import tiktoken

from minispec.errors import MinispecError

EOT = "<|endoftext|>"

# GPT-2's split pattern, the one tiktoken's "gpt2" encoding uses; tiktoken applies it when encoding.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The standard library's `re` has no \p{...} classes, so training splits with a close
# approximation: letters are word characters that are neither digits nor "_", and "other"
# is anything that is neither space nor a word character, plus "_". The split only decides
# which pairs get counted, so close is enough: tiktoken encodes with the exact pattern, and
# any merge table can encode any text because all 256 single bytes are tokens.
_TRAINING_SPLIT = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)


def _merge(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every non-overlapping (a, b) in word, left to right, with new_id."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_bpe(texts: Iterable[str], vocab_size: int = 2048) -> dict[bytes, int]:
    """Learn merges until the ranks plus the one special token fill vocab_size."""
    if vocab_size < 257:
        raise MinispecError(f"vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    word_counts = Counter()
    for text in texts:
        word_counts.update(_TRAINING_SPLIT.findall(text))
    # Work on distinct words: a word seen 10,000 times is merged once and weighted by its count.
    words = [list(w.encode("utf-8")) for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts: Counter = Counter()
    pair_words: dict[tuple[int, int], set[int]] = {}
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            pair_words.setdefault(pair, set()).add(i)
    # Max-heap of (-count, a, b); ties go to the smaller ids so training is deterministic.
    # Entries go stale as counts change; a popped entry is trusted only if its count is current.
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # token id (= rank) -> bytes
    id_of = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < vocab_size - 1 and heap:
        neg_count, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg_count:
            if 0 < count < -neg_count:  # count went down since this entry was pushed: requeue it
                heapq.heappush(heap, (-count, a, b))
            continue  # (if it went up, a newer entry is already in the heap)
        if count < 2:
            break
        # Two different pairs can spell the same bytes ("a"+"bc" and "ab"+"c"): reuse the id.
        merged_bytes = vocab[a] + vocab[b]
        new_id = id_of.get(merged_bytes)
        if new_id is None:
            new_id = len(vocab)  # larger than both parents' ranks, so rank order = merge order
            vocab.append(merged_bytes)
            id_of[merged_bytes] = new_id

        # Re-count pairs only in the words that contain (a, b).
        delta: Counter = Counter()
        for i in pair_words.pop((a, b)):
            old, new = words[i], _merge(words[i], a, b, new_id)
            words[i] = new
            old_pairs, new_pairs = set(zip(old, old[1:])), set(zip(new, new[1:]))
            for pair in zip(old, old[1:]):
                delta[pair] -= freqs[i]
            for pair in zip(new, new[1:]):
                delta[pair] += freqs[i]
            for pair in old_pairs - new_pairs:
                if pair in pair_words:
                    pair_words[pair].discard(i)
            for pair in new_pairs - old_pairs:
                pair_words.setdefault(pair, set()).add(i)
        for pair, change in delta.items():
            pair_counts[pair] += change
            if pair_counts[pair] <= 0:
                del pair_counts[pair]
                pair_words.pop(pair, None)
            elif change > 0:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
    return {token: rank for rank, token in enumerate(vocab)}


def make_encoding(ranks: dict[bytes, int], name: str = "minispec-bpe") -> tiktoken.Encoding:
    """Wrap mergeable ranks in a tiktoken.Encoding with <|endoftext|> as the last id."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise MinispecError("tokenizer ranks must be exactly 0..n-1, each used once")
    if any(bytes([i]) not in ranks for i in range(256)):
        raise MinispecError("tokenizer ranks must include all 256 single bytes")
    return tiktoken.Encoding(
        name, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )


def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's own vocabulary, which tiktoken downloads once and then caches."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' network errors, a bad cache...: all mean "unavailable"
        raise MinispecError(
            f"could not load GPT-2's vocabulary ({type(e).__name__}); "
            "use the default offline tokenizer or a local GPT-2 folder instead"
        ) from None


def encoding_state(enc: tiktoken.Encoding) -> dict:
    """A small picklable description of enc, to store inside a checkpoint."""
    if enc.name == "gpt2":
        return {"kind": "gpt2"}
    if enc.special_tokens_set != {EOT} or enc.eot_token != enc.n_vocab - 1:
        raise MinispecError(f"cannot save tokenizer {enc.name!r}: not a minispec BPE or GPT-2")
    return {"kind": "bpe", "tokens": [enc.decode_single_token_bytes(i) for i in range(enc.eot_token)]}


def encoding_from_state(state: dict) -> tiktoken.Encoding:
    """Rebuild the Encoding that encoding_state described."""
    if state.get("kind") == "gpt2":
        return gpt2_encoding()
    if state.get("kind") == "bpe":
        return make_encoding({token: rank for rank, token in enumerate(state["tokens"])})
    raise MinispecError(f"unknown tokenizer kind in checkpoint: {state.get('kind')!r}")
