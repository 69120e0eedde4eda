"""Train the tiny target GPT and every trained drafter into one checkpoint folder.

    python train_tiny.py                  # preset cpu: about 13 minutes on a 2-core CPU
    python train_tiny.py --preset test    # seconds: what the tests and CI use
    python train_tiny.py --no-layerskip --out out/tiny-plain   # the target trained with the plain loss
    python train_tiny.py --preset gpu --device cuda
    python train_tiny.py --consistency --out out/tiny-cllm   # a target tuned for Jacobi decoding (CLLM)
    python train_tiny.py --consistency --tune-from out/tiny --out out/tiny-cllm   # ... from a trained target

Steps: read the corpus (default: this Python's standard library source), train a byte-level
BPE on it, encode it (cached as .npy in the output folder), train the target, then the drafters.
The target is trained with LayerSkip's recipe (layer dropout and an early-exit loss through the
shared head; minispec/drafters/layerskip.py) unless --no-layerskip: its validation loss is about
the plain loss's, but its early layers already decide most tokens, which is what the self-drafting
methods draft with, and what the small drafters imitate more easily in greedy decoding. After a
LayerSkip training (or with --layerskip-search) which layers those methods skip is searched and
saved (layerskip.pt). Every file is written through a temporary file and a rename.
"""

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minispec import checkpoint
from minispec.cli import Parser, pick_device, run, set_threads, threads_flag
from minispec.data import cached_encode, read_corpus
from minispec.drafters.blockwise import (TEACHERS as HEAD_TEACHERS, head_accuracy, head_overlap, save_heads,
                                         train_heads)
from minispec.drafters.consistency import save_plain_target, tune_consistency
from minispec.drafters.draft_model import TEACHERS, train_draft_model
from minispec.drafters.layerskip import SEARCH_FILE, save_search, train_layerskip
from minispec.drafters.mask_drafter import save_drafter
from minispec.drafters.mask_training import (TEACHERS as MASK_TEACHERS, mask_agreement, mask_overlap,
                                             train_mask_drafter)
from minispec.errors import MinispecError
from minispec.gpt2 import load_gpt2
from minispec.model import GPT, GPTConfig
from minispec.tokenizer import make_encoding, train_bpe
from minispec.train import SAMPLE_T, greedy_agreement, train_lm


@dataclass
class Preset:
    model: GPTConfig
    steps: int  # target training steps
    batch_size: int
    lr: float
    corpus_bytes: int | None  # cap on the corpus read (None: all of it)
    bpe_bytes: int  # how much of it the tokenizer is trained on
    draft_steps: int
    heads_steps: int
    n_heads: int = 12  # blockwise heads trained; decoding may use any k up to this
    heads_seqs: int = 512  # windows (greedy continuations) the blockwise heads learn from
    mask_steps: int = 4000  # [M]-token drafter training steps (k up to 12), the greedy set
    mask_sampled_steps: int = 500  # ... and the sampling set
    consistency_steps: int = 400  # --consistency: fine-tuning steps of the target
    consistency_prompts: int = 512  # --consistency: corpus prompts whose Jacobi trajectories it learns from


PRESETS = {
    "test": Preset(GPTConfig(block_size=128, vocab_size=384, n_layer=4, n_head=2, n_embd=48),
                   steps=150, batch_size=8, lr=3e-3, corpus_bytes=300_000, bpe_bytes=100_000, draft_steps=60,
                   heads_steps=30, heads_seqs=32, mask_steps=40, mask_sampled_steps=20,
                   consistency_steps=20, consistency_prompts=32),
    "cpu": Preset(GPTConfig(block_size=256, vocab_size=2048, n_layer=6, n_head=4, n_embd=128),
                  steps=400, batch_size=16, lr=2e-3, corpus_bytes=None, bpe_bytes=3_000_000, draft_steps=200,
                  heads_steps=600, heads_seqs=1024),
    "gpu": Preset(GPTConfig(block_size=512, vocab_size=4096, n_layer=8, n_head=8, n_embd=512),
                  steps=3000, batch_size=32, lr=1e-3, corpus_bytes=None, bpe_bytes=6_000_000, draft_steps=1500,
                  heads_steps=1000, mask_steps=1500, mask_sampled_steps=1000),
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
    ap.add_argument("--threads", type=threads_flag, default="auto", help="CPU threads for torch (default auto: "
                    "1 or every core, whichever is faster now; while another process is busy that is 1)")
    ap.add_argument("--draft-teacher", choices=TEACHERS + ("compare",), default="soft",
                    help="what the draft model learns from (compare: train each, keep the best)")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="a Hugging Face GPT-2 folder to use as the target, with its tokenizer: no target "
                         "training; the drafters are trained against it (the preset's model size is ignored)")
    ap.add_argument("--layerskip", action=argparse.BooleanOptionalAction, default=None,
                    help="train the target with LayerSkip's layer dropout and early-exit loss (the default: its "
                         "early layers then draft far better, at about the same validation loss); "
                         "--no-layerskip: the plain loss")
    ap.add_argument("--layerskip-search", action=argparse.BooleanOptionalAction, default=None,
                    help="search the layerskip skip set and the earlyexit layer (under a minute; the default "
                         "when the target is trained with LayerSkip's loss)")
    ap.add_argument("--consistency", action="store_true",
                    help="consistency-tune the trained target for Jacobi decoding (CLLM) and train the drafters "
                         "against the tuned one; the target before tuning is kept as target_plain.pt")
    ap.add_argument("--tune-from", default=None, metavar="DIR",
                    help="with --consistency: tune the target of this checkpoint folder (and use its tokenizer) "
                         "instead of training a new one")
    ap.add_argument("--heads-teacher", choices=HEAD_TEACHERS + ("compare",), default="greedy",
                    help="what the greedy set of blockwise heads learns from (compare: train each, keep the best); "
                         "the sampling set always learns from sampled continuations")
    ap.add_argument("--mask-teacher", choices=MASK_TEACHERS + ("compare",), default="greedy",
                    help="what the greedy set of the [M]-token drafter learns from (compare: train each, keep "
                    "the best); the sampling set always learns from sampled continuations")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    device = pick_device(args.device)
    preset = PRESETS[args.preset]
    if not args.out.strip():
        raise MinispecError("--out is empty: name the checkpoint folder (default out/tiny)")
    if not 0 <= args.seed < 2 ** 63:
        raise MinispecError(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    if args.tune_from and (not args.consistency or args.init_from or args.layerskip):  # None: not asked for
        raise MinispecError("--tune-from takes a trained minispec target to tune: it needs --consistency, "
                            "and no --init-from or --layerskip")
    if args.init_from and args.layerskip:
        raise MinispecError("--layerskip trains a target; --init-from takes a pretrained one as it is")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MinispecError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MinispecError(f"cannot make the folder --out {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise MinispecError(f"--out {out} is not writable")
    torch.manual_seed(args.seed)
    print(f"device {device}, {threads} CPU thread{'s' * (threads > 1)}")
    t0 = time.perf_counter()

    train_docs, val_docs = read_corpus(args.data, preset.corpus_bytes)
    bpe_texts, size = [], 0
    for doc in train_docs:  # the tokenizer learns from the first bpe_bytes of the training files
        bpe_texts.append(doc)
        size += len(doc)
        if size >= preset.bpe_bytes:
            break
    if args.init_from:  # a pretrained target brings its own tokenizer
        target, enc = load_gpt2(args.init_from, device)
    elif args.tune_from:
        target, enc = checkpoint.load_target(args.tune_from, device)
    else:
        enc = make_encoding(train_bpe(bpe_texts, preset.model.vocab_size))
    train_ids = cached_encode(enc, train_docs, out / "tokens-train.npy")
    val_ids = cached_encode(enc, val_docs, out / "tokens-val.npy")
    print(f"corpus: {len(train_docs)} training and {len(val_docs)} validation files, "
          f"{len(train_ids):,} + {len(val_ids):,} tokens, vocabulary {enc.n_vocab} "
          f"({time.perf_counter() - t0:.1f}s)")
    if len(val_ids) <= preset.model.block_size:
        raise MinispecError(f"the corpus is too small: the validation split needs more than "
                            f"{preset.model.block_size} tokens, it has {len(val_ids)}")

    if not (args.init_from or args.tune_from):
        target = GPT(preset.model).to(device)
    print(f"target: {target.num_params() / 1e6:.2f}M parameters, {target.config}")
    if args.init_from:
        result = {"init_from": str(args.init_from)}
    elif args.tune_from:  # the tuned target keeps the recipe it was trained with
        recipe = checkpoint.target_meta(args.tune_from)["train"].get("recipe")
        result = {"tune_from": str(args.tune_from), **({"recipe": recipe} if recipe else {})}
    else:
        result = (train_lm if args.layerskip is False else train_layerskip)(
            target, train_ids, val_ids, preset.steps, preset.batch_size, preset.lr, args.seed)
    if args.consistency:
        save_plain_target(out, target)
        print(f"saved {out / 'target_plain.pt'} (the target before consistency tuning)")
        result = {**result, "consistency": tune_consistency(target, train_ids, val_ids, preset.consistency_steps,
                                                             n_prompts=preset.consistency_prompts, seed=args.seed)}
    meta = {"preset": args.preset, "data": args.data, "train": result, "prompts": heldout_prompts(val_docs)}
    checkpoint.save_target(out, target, enc, meta)
    print(f"saved {out / 'target.pt'}")
    if args.layerskip_search or (args.layerskip_search is None and result.get("recipe") == "layerskip"):
        save_search(target, train_ids, out)
    else:  # one left by an earlier training into this folder was searched on another target
        (out / SEARCH_FILE).unlink(missing_ok=True)

    draft = train_draft(args, preset, target, train_ids, val_ids, out)
    train_blockwise(args, preset, target, train_ids, val_ids, out)
    train_mask(args, preset, target, train_ids, val_ids, out, draft)
    print(f"all done in {time.perf_counter() - t0:.0f}s")


def train_draft(args, preset, target, train_ids, val_ids, out):
    """The classic draft model. With --draft-teacher compare, every teacher is tried and the draft
    whose greedy choice agrees most often with the target's on held-out text is kept; returned."""
    teachers = TEACHERS if args.draft_teacher == "compare" else (args.draft_teacher,)
    drafts = {t: train_draft_model(target, train_ids, val_ids, preset.draft_steps, preset.batch_size,
                                   preset.lr, t, seed=args.seed) for t in teachers}
    agreement = {t: round(greedy_agreement(target, d, val_ids), 4) for t, d in drafts.items()}
    best = max(agreement, key=agreement.get)
    print(f"draft model: top-1 agreement with the target on held-out text {agreement}; keeping {best!r}")
    checkpoint.save_gpt(out / "draft_model.pt", "draft_model", drafts[best],
                        meta={"teacher": best, "agreement": agreement})
    print(f"saved {out / 'draft_model.pt'}")
    return drafts[best]


def train_blockwise(args, preset, target, train_ids, val_ids, out):
    """Blockwise heads on the frozen target: the greedy set (with --heads-teacher compare, the
    teacher whose heads promise the longer accepted block on held-out text is kept) and the
    sampling set ("sampled" teacher). Prints each set's greedy agreement and sampled overlap."""
    teachers = (HEAD_TEACHERS if args.heads_teacher == "compare" else
                tuple(dict.fromkeys((args.heads_teacher, "sampled"))))  # the sampling set is always trained
    positions = preset.batch_size * preset.model.block_size // 16  # per step; the target never runs in a step
    heads = {t: train_heads(target, train_ids, preset.n_heads, preset.heads_steps, positions, 1.5 * preset.lr, t,
                            preset.heads_seqs, seed=args.seed) for t in teachers}
    acc = {t: head_accuracy(h, target, val_ids) for t, h in heads.items()}  # t -> (n_heads, RANKS)
    overlap = {t: head_overlap(h, target, val_ids) for t, h in heads.items()}  # t -> (n_heads,)
    greedy_set = args.heads_teacher if args.heads_teacher != "compare" else \
        max(acc, key=lambda t: expected_accepted(acc[t][:, 0].tolist()))
    for t in teachers:
        print(f"blockwise heads ({t}): greedy agreement per head {[round(x, 2) for x in acc[t][:, 0].tolist()]} "
              f"(expected accepted drafts {expected_accepted(acc[t][:, 0].tolist()):.2f}); 1 - TV(p, q) at "
              f"T={SAMPLE_T} per head {[round(x, 2) for x in overlap[t].tolist()]}")
    save_heads(out / "blockwise.pt", heads[greedy_set], acc[greedy_set], heads["sampled"],
               meta={"teacher": greedy_set, "sampling_teacher": "sampled",
                     "acc": {t: a.tolist() for t, a in acc.items()},
                     "overlap": {t: o.tolist() for t, o in overlap.items()}})
    print(f"saved {out / 'blockwise.pt'} (greedy set: teacher {greedy_set!r}; sampling set: 'sampled')")


def expected_accepted(agreement):
    """Expected accepted drafts if head i is right with probability agreement[i], independently."""
    total, run = 0.0, 1.0
    for a in agreement:
        run *= a
        total += run
    return total


def train_mask(args, preset, target, train_ids, val_ids, out, draft):
    """The [M]-token drafter's two sets, both started from the trained draft model: the greedy set (with
    --mask-teacher compare, the teacher whose drafter gives the higher tau at k=12 when greedy
    decoding is replayed on the target's held-out continuations is kept), and the sampling set,
    trained on sampled continuations."""
    teachers = (MASK_TEACHERS if args.mask_teacher == "compare" else
                tuple(dict.fromkeys((args.mask_teacher, "sampled"))))  # the sampling set is always trained
    steps = {t: preset.mask_sampled_steps if t == "sampled" else preset.mask_steps for t in teachers}
    rate = {t: 5.0 if t == "sampled" else 2.5 for t in teachers}  # x preset.lr: shallow; the short run higher
    drafters = {t: train_mask_drafter(target, train_ids, steps[t], preset.batch_size // 2, rate[t] * preset.lr, t,
                                      start_from=draft, seed=args.seed) for t in teachers}
    measured = {t: mask_agreement(d, target, val_ids) for t, d in drafters.items()}  # t -> (accept_at, tau)
    overlap = {t: mask_overlap(d, target, val_ids) for t, d in drafters.items()}  # t -> (4,)
    best = args.mask_teacher if args.mask_teacher != "compare" else \
        max((t for t in measured if t != "sampled"), key=lambda t: measured[t][1])
    for t, (accept_at, tau) in measured.items():
        print(f"mask drafter ({t}): on held-out greedy text, acceptance per position "
              f"{[round(a, 2) for a in accept_at]}, tau {tau:.2f}; 1 - TV(p, q) on sampled text at "
              f"T={SAMPLE_T} per [M] {[round(x, 2) for x in overlap[t]]}")
    save_drafter(out / "mask.pt", drafters[best], drafters["sampled"],
                 meta={"teacher": best, "measured": measured, "overlap": overlap})
    print(f"saved {out / 'mask.pt'} (greedy set: teacher {best!r}; sampling set: 'sampled')")


if __name__ == "__main__":
    run(main)
