"""Tests for minispec/tokenizer.py: BPE training, the tiktoken wrapper, and checkpoint state."""

import pathlib
import pickle
import random
import sysconfig
from collections import Counter

import pytest
import tiktoken

from minispec.errors import MinispecError
from minispec.tokenizer import (EOT, _TRAINING_SPLIT, encoding_from_state, encoding_state, gpt2_encoding,
                                make_encoding, train_bpe)

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["argparse.py", "dataclasses.py", "inspect.py", "typing.py"]  # about 450 KB
VOCAB_SIZE = 1024


@pytest.fixture(scope="module")
def texts():
    return [(STDLIB / name).read_text(encoding="utf-8") for name in TRAIN_FILES]


@pytest.fixture(scope="module")
def ranks(texts):
    return train_bpe(texts, VOCAB_SIZE)


@pytest.fixture(scope="module")
def enc(ranks):
    return make_encoding(ranks)


def naive_train_bpe(texts, vocab_size):
    """Reference trainer: recount every pair after every merge (slow, obviously right)."""
    word_counts = Counter(w for text in texts for w in _TRAINING_SPLIT.findall(text))
    words = {w: list(w.encode("utf-8")) for w in word_counts}
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) < vocab_size - 1:
        pairs = Counter()
        for w, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += word_counts[w]
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merged = vocab[a] + vocab[b]
        if merged not in vocab:
            vocab.append(merged)
        new_id = vocab.index(merged)
        for w, ids in words.items():
            out, i = [], 0
            while i < len(ids):
                if ids[i:i + 2] == [a, b]:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[w] = out
    return {token: rank for rank, token in enumerate(vocab)}


def test_vocabulary_has_requested_size_and_all_bytes(ranks, enc):
    assert len(ranks) == VOCAB_SIZE - 1
    assert enc.n_vocab == VOCAB_SIZE
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_merged_tokens_rank_after_their_parts(ranks):
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank, so every
    # learned token must be a concatenation of two tokens with smaller ranks.
    for token, rank in ranks.items():
        if len(token) > 1:
            assert any(ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
                       for i in range(1, len(token)))


def test_incremental_training_matches_naive_reference(texts):
    small = [texts[1][:20_000], "aaaaaaa abababab aaa aabbaab " * 20, "日本語 日本 😀😀 é e\u0301"]
    for vocab_size in (257, 300, 450):
        assert train_bpe(small, vocab_size) == naive_train_bpe(small, vocab_size)


def test_training_is_deterministic(texts):
    small = [text[:30_000] for text in texts]
    assert train_bpe(small, 500) == train_bpe(list(small), 500)


def test_training_stops_when_no_pair_repeats():
    ranks = train_bpe(["abcdef"], 1000)  # every pair occurs once: nothing worth merging
    assert len(ranks) == 256


def test_vocab_size_too_small_raises():
    with pytest.raises(MinispecError):
        train_bpe(["hello hello"], 256)


def random_text(rng):
    pieces = ["def f(x):\n    return x ** 2\n", "    ", "\t\t", "\n\n\n", " ", "'s", "don't",  # code, spaces
              "_private", "1234567", "3.14e-10", "{}[]();:", "x", "Z", "\x00", "\x7f", "\r\n", "\u200b",
              "😀", "🇫🇷", "👩‍💻", "日本語", "中文", "한국어", "Ωμέγα", "привет", "ß", "ﬁ",  # emoji, scripts
              "é", "e\u0301", "\u0301\u0302"]  # precomposed vs combining marks, and marks with no base
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))


def test_roundtrip_arbitrary_unicode(enc):
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng)
        tokens = enc.encode(text)
        assert enc.decode(tokens) == text
        assert enc.decode_bytes(tokens) == text.encode("utf-8")


def test_roundtrip_random_bytes(enc):
    rng = random.Random(1)
    for _ in range(300):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        text = raw.decode("utf-8", errors="replace")  # tiktoken encodes str, so make the bytes valid text
        assert enc.decode_bytes(enc.encode(text)) == text.encode("utf-8")


def test_special_token(enc):
    eot = enc.eot_token
    assert eot == VOCAB_SIZE - 1
    assert enc.encode(EOT, allowed_special="all") == [eot]
    tokens = enc.encode(f"a = 1{EOT}b = 2", allowed_special="all")
    assert tokens.count(eot) == 1
    assert enc.decode(tokens) == f"a = 1{EOT}b = 2"
    assert eot not in enc.encode_ordinary(EOT)  # as ordinary text it is just characters


def test_compresses_unseen_python_source(enc):
    source = (STDLIB / "functools.py").read_text(encoding="utf-8")  # not in the training files
    assert len(source.encode("utf-8")) / len(enc.encode_ordinary(source)) > 2


def test_state_roundtrip(enc, texts):
    state = pickle.loads(pickle.dumps(encoding_state(enc)))
    assert state["kind"] == "bpe"
    rebuilt = encoding_from_state(state)
    assert rebuilt.n_vocab == enc.n_vocab
    assert rebuilt.encode(texts[0], allowed_special="all") == enc.encode(texts[0], allowed_special="all")


def test_gpt2_state_is_just_a_name(ranks):
    assert encoding_state(make_encoding(ranks, name="gpt2")) == {"kind": "gpt2"}
    with pytest.raises(MinispecError):
        encoding_from_state({"kind": "sentencepiece"})


def test_make_encoding_rejects_bad_ranks():
    byte_ranks = {bytes([i]): i for i in range(256)}
    with pytest.raises(MinispecError):
        make_encoding({**byte_ranks, b"ab": 300})  # a gap in the ranks
    with pytest.raises(MinispecError):
        make_encoding({token: rank for token, rank in byte_ranks.items() if rank != 255})


def test_gpt2_unavailable_is_one_clear_line(monkeypatch):
    def offline(name):
        raise ConnectionError("Max retries exceeded\nName resolution failed")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    for load in (gpt2_encoding, lambda: encoding_from_state({"kind": "gpt2"})):
        with pytest.raises(MinispecError) as info:
            load()
        assert "GPT-2" in str(info.value) and "\n" not in str(info.value)


def test_gpt2_available_is_returned(monkeypatch, enc):
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc if name == "gpt2" else None)
    assert gpt2_encoding() is enc
