"""Train the tiny target GPT and every trained drafter into one checkpoint folder.

    python train_tiny.py                  # preset cpu: a few minutes on a 2-core CPU
    python train_tiny.py --preset test    # seconds: what the tests and CI use
    python train_tiny.py --preset gpu --device cuda

Steps: read the corpus (default: this Python's standard library source), train a byte-level
BPE on it, encode it (cached as .npy in the output folder), train the target, then the drafters.
Every file is written through a temporary file and a rename.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minispec import checkpoint
from minispec.cli import Parser, pick_device, run
from minispec.data import cached_encode, read_corpus
from minispec.drafters.draft_model import TEACHERS, train_draft_model
from minispec.errors import MinispecError
from minispec.model import GPT, GPTConfig
from minispec.tokenizer import make_encoding, train_bpe
from minispec.train import greedy_agreement, train_lm


@dataclass
class Preset:
    model: GPTConfig
    steps: int  # target training steps
    batch_size: int
    lr: float
    corpus_bytes: int | None  # cap on the corpus read (None: all of it)
    bpe_bytes: int  # how much of it the tokenizer is trained on
    draft_steps: int


PRESETS = {
    "test": Preset(GPTConfig(block_size=128, vocab_size=384, n_layer=4, n_head=2, n_embd=48),
                   steps=150, batch_size=8, lr=3e-3, corpus_bytes=300_000, bpe_bytes=100_000, draft_steps=60),
    "cpu": Preset(GPTConfig(block_size=256, vocab_size=2048, n_layer=6, n_head=4, n_embd=128),
                  steps=600, batch_size=16, lr=2e-3, corpus_bytes=None, bpe_bytes=3_000_000, draft_steps=300),
    "gpu": Preset(GPTConfig(block_size=512, vocab_size=4096, n_layer=8, n_head=8, n_embd=512),
                  steps=3000, batch_size=32, lr=1e-3, corpus_bytes=None, bpe_bytes=6_000_000, draft_steps=1500),
}


def heldout_prompts(val_docs, n=8, chars=60):
    """Fixed benchmark prompts: the start of a `def` line from the middle of n validation files."""
    prompts = []
    for doc in val_docs:
        starts = [i for i, line in enumerate(doc.splitlines(keepends=True)) if line.lstrip().startswith("def ")]
        if starts:
            lines = doc.splitlines(keepends=True)
            prompts.append("".join(lines[starts[len(starts) // 2]:])[:chars])
        if len(prompts) == n:
            break
    return prompts or [doc[:chars] for doc in val_docs[:n]]


def main():
    ap = Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="cpu", help="model size and training budget")
    ap.add_argument("--out", default="out/tiny", help="checkpoint folder (default out/tiny)")
    ap.add_argument("--data", default=None, help="a text file or a folder of text files (default: the Python stdlib)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draft-teacher", choices=TEACHERS + ("compare",), default="soft",
                    help="what the draft model learns from (compare: train each, keep the best)")
    args = ap.parse_args()
    device = pick_device(args.device)
    preset = PRESETS[args.preset]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MinispecError(f"--out {out} is a file, not a folder")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    train_docs, val_docs = read_corpus(args.data, preset.corpus_bytes)
    bpe_texts, size = [], 0
    for doc in train_docs:  # the tokenizer learns from the first bpe_bytes of the training files
        bpe_texts.append(doc)
        size += len(doc)
        if size >= preset.bpe_bytes:
            break
    enc = make_encoding(train_bpe(bpe_texts, preset.model.vocab_size))
    train_ids = cached_encode(enc, train_docs, out / "tokens-train.npy")
    val_ids = cached_encode(enc, val_docs, out / "tokens-val.npy")
    print(f"corpus: {len(train_docs)} training and {len(val_docs)} validation files, "
          f"{len(train_ids):,} + {len(val_ids):,} tokens, vocabulary {enc.n_vocab} "
          f"({time.perf_counter() - t0:.1f}s)")
    if len(val_ids) <= preset.model.block_size:
        raise MinispecError(f"the corpus is too small: the validation split needs more than "
                            f"{preset.model.block_size} tokens, it has {len(val_ids)}")

    target = GPT(preset.model).to(device)
    print(f"target: {target.num_params() / 1e6:.2f}M parameters, {preset.model}")
    result = train_lm(target, train_ids, val_ids, preset.steps, preset.batch_size, preset.lr, args.seed)
    meta = {"preset": args.preset, "data": args.data, "train": result, "prompts": heldout_prompts(val_docs)}
    checkpoint.save_target(out, target, enc, meta)
    print(f"saved {out / 'target.pt'}")

    train_draft(args, preset, target, train_ids, val_ids, out)
    print(f"all done in {time.perf_counter() - t0:.0f}s")


def train_draft(args, preset, target, train_ids, val_ids, out):
    """The classic draft model. With --draft-teacher compare, every teacher is tried and the draft
    whose greedy choice agrees most often with the target's on held-out text is kept."""
    teachers = TEACHERS if args.draft_teacher == "compare" else (args.draft_teacher,)
    drafts = {t: train_draft_model(target, train_ids, val_ids, preset.draft_steps, preset.batch_size,
                                   preset.lr, t, seed=args.seed) for t in teachers}
    agreement = {t: round(greedy_agreement(target, d, val_ids), 4) for t, d in drafts.items()}
    best = max(agreement, key=agreement.get)
    print(f"draft model: top-1 agreement with the target on held-out text {agreement}; keeping {best!r}")
    checkpoint.save_gpt(out / "draft_model.pt", "draft_model", drafts[best],
                        meta={"teacher": best, "agreement": agreement})
    print(f"saved {out / 'draft_model.pt'}")


if __name__ == "__main__":
    run(main)
