"""What train_tiny.py and decode.py share: one-line errors with exit status 2, and the device flag."""

import argparse
import sys

import torch

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
