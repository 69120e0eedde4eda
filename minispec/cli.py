"""What train_tiny.py and decode.py share: one-line errors with exit status 2, the device flag and
the number of CPU threads."""

import argparse
import os
import sys

import torch

from .cudagraph import seconds_per_call
from .errors import MinispecError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit status 2), not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run(main):
    """Call main(); turn MinispecError into one line on stderr and exit status 2."""
    try:
        main()
    except MinispecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pick_device(name):
    """auto -> cuda when there is a GPU, else cpu; cuda without a GPU is bad input."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise MinispecError("--device cuda, but torch sees no CUDA GPU on this machine (try --device cpu)")
    return name


def write_text(path, text):
    """Write text to path through a temporary file in the same folder and a rename, so a reader
    sees the old file or the whole new one, never half of one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise MinispecError(f"cannot write {path}: {e.strerror or e}") from None


def threads_flag(text):
    """argparse type of --threads: a number of threads, or "auto"."""
    return text if text == "auto" else int(text)


def set_threads(n):
    """torch's CPU threads for this process: n, or with "auto" whichever of 1 and every core runs
    a training-sized matrix product faster right now. When another process is busy, torch's
    threads wait for each other at every operation and two threads can run ten times slower
    than one, so the choice is measured, not assumed."""
    cores = os.cpu_count() or 1
    if n == "auto":
        n = 1 if cores == 1 else min((1, cores), key=matmul_seconds)
    if not 1 <= n <= cores:
        raise MinispecError(f"--threads must be from 1 to {cores} (this machine's cores) or auto, got {n}")
    torch.set_num_threads(n)
    return n


def matmul_seconds(threads):
    """Seconds of a (4096, 128) x (128, 512) product with `threads` threads: the best of 3 rounds."""
    torch.set_num_threads(threads)
    x, w = torch.randn(4096, 128), torch.randn(128, 512)
    return seconds_per_call(lambda: x @ w, reps=10, rounds=3)
