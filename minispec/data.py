"""The training corpus and the batches cut from it.

By default the corpus is the Python standard library's own source, found next to the
interpreter that runs this file: about 12 MB of real, varied code with no download.
`--data PATH` swaps in any text file or folder. As in nanoGPT, the text is encoded once
into one long array of token ids (cached as .npy), and training reads random windows of it.
"""

import codecs
import hashlib
import os
import pathlib
import sysconfig
import zlib

import numpy as np
import tiktoken
import torch

from minispec.errors import MinispecError
from minispec.tokenizer import encoding_state

# Tests are big, repetitive and full of odd encodings; site-packages is not the stdlib.
SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages"}


def _is_text(path: pathlib.Path) -> bool:
    """Cheap check on the first KB: not empty, no NUL byte, valid UTF-8 so far."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head or b"\0" in head:
        return False
    try:  # an incremental decoder forgives a character cut in half at the 1 KB mark
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _corpus_root(path: str | None) -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"] if path is None else path)


def corpus_files(path: str | None) -> list[pathlib.Path]:
    """The text files of a corpus, sorted: the stdlib's *.py (path=None), one file, or a folder's."""
    root = _corpus_root(path)
    if path is None:
        files = [p for p in root.rglob("*.py")
                 if not SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts[:-1])]
    elif root.is_file():
        files = [root] if _is_text(root) else []
    elif root.is_dir():
        files = [p for p in root.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                 and _is_text(p)]
    else:
        raise MinispecError(f"no such file or folder: {path}")
    if not files:
        raise MinispecError(f"no text found in {root}")
    return sorted(files)


def _split_text(text: str, val_percent: int) -> tuple[str, str]:
    """Split one text near (100 - val_percent)%, at a line boundary when there is one."""
    target = len(text) * (100 - val_percent) // 100
    cut = text.rfind("\n", 0, target) + 1
    if not 0 < cut < len(text):
        cut = max(1, target)
    return text[:cut], text[cut:]


def read_corpus(path: str | None = None, max_bytes: int | None = None,
                val_percent: int = 5) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs): one document per file, split by a hash of each file's name."""
    if max_bytes is not None and max_bytes <= 0:
        raise MinispecError(f"max_bytes must be positive, got {max_bytes}")
    root = _corpus_root(path)
    texts: dict[str, str] = {}  # path relative to the root (posix) -> text
    budget = max_bytes
    for file in corpus_files(path):
        data = file.read_bytes()
        if budget is not None:
            if budget <= 0:
                break
            if len(data) > budget:  # cut the last file at a line boundary inside the budget
                data = data[: data.rfind(b"\n", 0, budget) + 1 or budget]
            budget -= len(data)
        name = file.name if file == root else file.relative_to(root).as_posix()
        texts[name] = data.decode("utf-8", errors="replace")

    if len(texts) == 1:
        train, val = _split_text(next(iter(texts.values())), val_percent)
        return [train], [val]
    # Hashing the name (not drawing at random) keeps the split the same on every machine and run.
    bucket = {name: zlib.crc32(name.encode("utf-8")) % 100 for name in texts}
    by_bucket = sorted(texts, key=lambda name: (bucket[name], name))
    val_names = {name for name in texts if bucket[name] < val_percent}
    if not val_names:
        val_names = {by_bucket[0]}
    elif len(val_names) == len(texts):
        val_names.discard(by_bucket[-1])
    train = [texts[name] for name in sorted(texts) if name not in val_names]
    val = [texts[name] for name in sorted(texts) if name in val_names]
    return train, val


def encode_docs(enc: tiktoken.Encoding, docs: list[str]) -> np.ndarray:
    """All documents' token ids in one array, with <|endoftext|> between documents."""
    # encode_ordinary treats a literal "<|endoftext|>" in the text as plain text, not the special token.
    encoded = enc.encode_ordinary_batch(docs)
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.int32
    pieces = []
    for i, ids in enumerate(encoded):
        if i > 0:
            pieces.append(np.array([enc.eot_token], dtype=dtype))
        pieces.append(np.array(ids, dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def cached_encode(enc: tiktoken.Encoding, docs: list[str], cache_file: pathlib.Path) -> np.ndarray:
    """encode_docs, cached on disk as cache_file with a hash of the tokenizer and docs in its name.

    For cache_file "out/train.npy" the array lands in "out/train-<hash>.npy", so changing the
    tokenizer or the text makes a new file instead of silently reusing a stale one.
    """
    h = hashlib.sha1(repr(encoding_state(enc)).encode("utf-8"))
    h.update(repr([len(doc) for doc in docs]).encode("utf-8"))  # so doc boundaries count too
    for doc in docs:
        h.update(doc.encode("utf-8", errors="surrogatepass"))
    cache_file = pathlib.Path(cache_file)
    keyed_file = cache_file.with_name(f"{cache_file.stem}-{h.hexdigest()[:16]}.npy")
    if keyed_file.exists():
        return np.load(keyed_file)
    ids = encode_docs(enc, docs)
    keyed_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = keyed_file.with_name(f"{keyed_file.name}.{os.getpid()}.tmp")
    with open(tmp_file, "wb") as f:  # a file object, so np.save does not append ".npy" to the name
        np.save(f, ids)
    os.replace(tmp_file, keyed_file)  # atomic: a reader never sees half a file
    return ids


def get_batch(ids: np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows: inputs x (B, T) and targets y, the same windows one token later."""
    if len(ids) < block_size + 1:
        raise MinispecError(f"the text is too short: {len(ids)} tokens, need at least {block_size + 1}")
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator).numpy()
    windows = torch.from_numpy(ids[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
