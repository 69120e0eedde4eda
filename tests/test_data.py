"""Tests for minispec/data.py: finding and splitting the corpus, encoding it, and batches."""

import pathlib
import sysconfig

import numpy as np
import pytest
import torch

import minispec.data as data
from minispec.data import cached_encode, corpus_files, encode_docs, get_batch, read_corpus
from minispec.errors import MinispecError
from minispec.tokenizer import EOT, make_encoding

BYTE_RANKS = {bytes([i]): i for i in range(256)}  # no merges: one token per byte, easy to predict


@pytest.fixture
def byte_enc():
    return make_encoding(BYTE_RANKS)


def write_modules(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"# {name}\nprint({name!r})\n", encoding="utf-8")


def test_default_corpus_is_the_stdlib():
    files = corpus_files(None)
    names = {f.name for f in files}
    assert len(files) > 100 and {"os.py", "functools.py"} <= names
    assert files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages"}
    assert not any(skipped & set(f.relative_to(root).parts) for f in files)


def test_split_is_deterministic_disjoint_and_order_independent(tmp_path):
    names = [f"mod{i:02d}.py" for i in range(60)]
    write_modules(tmp_path / "a", names)
    write_modules(tmp_path / "b", reversed(names))  # created in the other order
    train, val = read_corpus(str(tmp_path / "a"))
    assert train and val
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(f"# {n}\nprint({n!r})\n" for n in names)
    assert read_corpus(str(tmp_path / "a")) == (train, val)
    assert read_corpus(str(tmp_path / "b")) == (train, val)


@pytest.mark.parametrize("val_percent", [0, 100])
def test_both_sides_get_a_file(tmp_path, val_percent):
    write_modules(tmp_path, ["one.py", "two.py"])
    train, val = read_corpus(str(tmp_path), val_percent=val_percent)
    assert len(train) == 1 and len(val) == 1


def test_folder_without_text_raises(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden folders are skipped
    with pytest.raises(MinispecError, match="no text found"):
        corpus_files(str(tmp_path))


def test_binary_files_are_skipped(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    write_modules(tmp_path / "src", ["x.py"])
    assert corpus_files(str(tmp_path)) == [tmp_path / "src" / "x.py"]


def test_missing_path_raises(tmp_path):
    with pytest.raises(MinispecError, match="no such file or folder"):
        read_corpus(str(tmp_path / "nope"))


def test_single_file_splits_at_a_line_near_95_percent(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    (train,), (val,) = read_corpus(str(tmp_path / "one.txt"))
    assert train + val == text
    assert train.endswith("\n") and val.startswith("line ")
    assert 0.9 < len(train) / len(text) < 0.96


def test_max_bytes_caps_the_text_read(tmp_path):
    write_modules(tmp_path, [f"mod{i:02d}.py" for i in range(60)])
    train, val = read_corpus(str(tmp_path), max_bytes=200)
    assert 0 < sum(len(doc.encode()) for doc in train + val) <= 200
    with pytest.raises(MinispecError):
        read_corpus(str(tmp_path), max_bytes=0)


def test_encode_docs_puts_eot_between_documents(byte_enc):
    ids = encode_docs(byte_enc, ["ab", "c", f"x{EOT}"])
    eot = byte_enc.eot_token
    assert ids.dtype == np.uint16
    assert ids.tolist() == [97, 98, eot, 99, eot, 120, *EOT.encode()]  # a literal EOT stays text


def test_cached_encode_reuses_then_refreshes(tmp_path, byte_enc, monkeypatch):
    docs = ["hello", "world"]
    first = cached_encode(byte_enc, docs, tmp_path / "train.npy")
    assert len(list(tmp_path.glob("train-*.npy"))) == 1

    def must_not_encode(enc, docs):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(data, "encode_docs", must_not_encode)
    assert np.array_equal(cached_encode(byte_enc, docs, tmp_path / "train.npy"), first)
    monkeypatch.undo()

    changed = cached_encode(byte_enc, ["hello", "world!"], tmp_path / "train.npy")
    assert changed.tolist() == first.tolist() + [ord("!")]
    regrouped = cached_encode(byte_enc, ["hellow", "orld"], tmp_path / "train.npy")  # same text, new split
    assert regrouped.tolist() != first.tolist()
    other_enc = make_encoding({**BYTE_RANKS, b"he": 256})
    assert len(cached_encode(other_enc, docs, tmp_path / "train.npy")) == len(first) - 1
    assert len(list(tmp_path.glob("train-*.npy"))) == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_get_batch_shapes_shift_and_determinism():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(ids, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # ids are consecutive, so the next token is the id plus one
    assert y.view(-1).numel() == 128  # contiguous, ready for a cross-entropy view
    x2, y2 = get_batch(ids, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = get_batch(ids, 8, 16, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_get_batch_reaches_the_last_token_and_rejects_short_ids():
    ids = np.arange(17, dtype=np.uint16)
    x, y = get_batch(ids, 4, 16, torch.Generator().manual_seed(0))  # exactly one window fits
    assert x[0].tolist() == list(range(16)) and y[0].tolist() == list(range(1, 17))
    with pytest.raises(MinispecError):
        get_batch(ids, 4, 17, torch.Generator().manual_seed(0))
