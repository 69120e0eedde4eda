"""Decode with any method, or with all of them side by side, and report what happened.

    python decode.py                                   # every method on the held-out prompts: one table
    python decode.py --method draft_model --prompt "def parse(" --show
    python decode.py --method all --json results.json
    python decode.py --device cuda                     # verification as captured CUDA graphs
    python decode.py --device cuda --no-graphs         # the same, plain eager forwards: the graphs' speedup

With --method all every method decodes the same prompts in this one process, after a warm-up,
interleaved prompt by prompt so that a slow moment of the machine hits all methods alike. The
speedup is tokens/s over autoregressive decoding (`ar`) measured in the same run; draft s and
verify s are the seconds spent proposing and verifying over all prompts; identical_to_ar says
whether the greedy tokens equal plain greedy decoding's, prompt by prompt.

Forwards: on a GPU every cached forward after the prefill is replayed from a CUDA graph
(cudagraph.py); --no-graphs runs them plainly (eager, masks as wide as the prefix). On CPU they
always run plainly unless --static runs them through the graphs' static buffers eagerly (what a
graph replays, without capture; it reads the whole cache width).
"""

import argparse
import json
import os
import sys

import torch

import minispec
from minispec import MinispecError, bench, checkpoint, html_report
from minispec.cli import Parser, pick_device, run, set_threads, threads_flag, write_text

# With --gpt2 there are no held-out prompts stored with the model: these are the default.
GPT2_PROMPTS = ["The meaning of life is", "Once upon a time, there was a", "The capital of France is",
                "In a shocking finding, scientists discovered"]
TEMPERATURES = (1e-3, 1e3)  # outside them softmax(logits / T) overflows or is uniform to float precision
COLOURS = {"accepted": "\033[32m", "correction": "\033[33m", "bonus": "\033[36m", "end": "\033[0m"}


def show(tok, prompt_ids, res, colour):
    """The prompt, then each step's tokens: accepted drafts, then the correction or bonus token."""
    def paint(ids, kind):
        text = tok.decode(ids)
        return f"{COLOURS[kind]}{text}{COLOURS['end']}" if colour else text
    parts = [tok.decode(prompt_ids)]
    for emitted, accepted, depth in res.steps:
        parts.append(paint(emitted[:accepted], "accepted"))
        parts.append(paint(emitted[accepted:], "bonus" if accepted == depth and depth else "correction"))
    if colour:
        parts.append(f"\n[{COLOURS['accepted']}accepted draft{COLOURS['end']}, "
                     f"{COLOURS['correction']}target's token{COLOURS['end']}, "
                     f"{COLOURS['bonus']}bonus after a fully accepted draft{COLOURS['end']}]")
    return "".join(parts)


def draft_length(text):
    """--k: a whole number, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or 'auto': {text!r}") from None


def check_flags(args):
    """Flags that are wrong whatever the model: refused before anything is loaded."""
    if not (args.temperature == 0 or TEMPERATURES[0] <= args.temperature <= TEMPERATURES[1]):
        raise MinispecError(f"--temperature must be 0 (greedy) or from {TEMPERATURES[0]} to {TEMPERATURES[1]}, "
                            f"got {args.temperature}")
    if args.max_new_tokens < 1:
        raise MinispecError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise MinispecError(f"--top-k must be at least 1, got {args.top_k}")
    if not 0 <= args.seed < 2 ** 63:
        raise MinispecError(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    if args.beta is None and args.margin is not None:
        raise MinispecError("--margin is the tolerance of --beta's relaxed verification: give --beta too")
    if args.beta is not None and (args.beta < 1 or args.temperature != 0):
        raise MinispecError("--beta needs a value of at least 1 and greedy decoding (--temperature 0)")
    if args.margin is not None and not 0 <= args.margin < float("inf"):
        raise MinispecError(f"--margin must be a number of 0 or more, got {args.margin}")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise MinispecError("the prompt is not valid UTF-8 text") from None
    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path is not None and (not path or os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            raise MinispecError(f"{flag} {path!r}: not a file name in an existing folder")


def check_input(args, model, prompts):
    """What must fit the model: k, the prompts and the new tokens in its context, beta in its vocabulary."""
    context, vocab = model.config.block_size, model.config.vocab_size
    k = minispec.AUTO_K_MAX if args.k == "auto" else args.k
    if k < 1 or k + 1 > context:
        raise MinispecError(f"--k must be auto or between 1 and {context - 1} (the context is {context}), got {k}")
    if args.beta is not None and args.beta > vocab:
        raise MinispecError(f"--beta must be at most the vocabulary size, {vocab}, got {args.beta}")
    for ids in prompts:
        if not ids:
            raise MinispecError("the prompt is empty")
        if len(ids) + args.max_new_tokens > context:
            raise MinispecError(f"a prompt of {len(ids)} tokens plus {args.max_new_tokens} new tokens "
                                f"does not fit in the context of {context} tokens")


def top_beta(args):
    """(beta, margin) for SpecDec's lossy relaxed verification, or None for exact verification."""
    return None if args.beta is None else (args.beta, 3.0 if args.margin is None else args.margin)


def forwards(args, device):
    """How forwards run: 'graphs' (CUDA graphs), 'static' (their buffers, eagerly) or 'plain'."""
    if args.no_graphs:
        return "plain"
    return "static" if args.static else "graphs" if device == "cuda" else "plain"


def decode_one(args, model, tok, prompt_ids, drafter, static):
    res = minispec.generate(model, prompt_ids, args.max_new_tokens, drafter, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, eot=tok.eot_token, top_beta=top_beta(args),
                            static=static)
    colour = args.show and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(show(tok, prompt_ids, res, colour) if args.show else tok.decode(prompt_ids + res.tokens))
    s = res.stats
    if args.beta is not None:
        print(f"LOSSY: top-beta verification (beta {args.beta}, margin {top_beta(args)[1]}) may change the output")
    print(f"--- {args.method}: {s.new_tokens} new tokens in {s.total_s:.2f}s, {s.tokens_per_s:.1f} tokens/s | "
          f"tau {s.tau:.2f} | alpha {s.alpha:.2f} | target forwards {s.target_forwards} | "
          f"accept at 1..: {' '.join(f'{a:.2f}' for a in s.accept_at)}")
    return bench.row(args.method, args.k, s)


def decode_all(args, model, tok, prompts, drafters, static):
    if skipped := [m for m in minispec.METHODS if m not in drafters]:
        print(f"skipped (they need drafters trained against this model, see train_tiny.py --init-from): "
              f"{', '.join(skipped)}")
    rows, spread = bench.side_by_side(model, prompts, drafters, args.max_new_tokens, args.k,
                                      temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                      eot=tok.eot_token, top_beta=top_beta(args), static=static)
    if args.beta is not None:
        print(f"top-beta verification (beta {args.beta}, margin {top_beta(args)[1]}) is LOSSY: 'NO a/b' counts the "
              f"new tokens that differ from greedy decoding's at the same place")
    print(bench.table(rows))
    warning = bench.unsteady(spread)
    if warning:
        print(warning)
    return rows, spread


def main():
    ap = Parser(description=__doc__.split("\n")[0])
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default="out/tiny", help="checkpoint folder made by train_tiny.py")
    source.add_argument("--gpt2", default=None, metavar="DIR", help="a Hugging Face GPT-2 folder (config.json, "
                        "model.safetensors or pytorch_model.bin, vocab.json, merges.txt): training-free methods only")
    ap.add_argument("--method", default="all", choices=list(minispec.METHODS) + ["all"])
    ap.add_argument("--prompt", default=None, help="text to continue (default: the held-out prompts; with --gpt2, a few "
                    "English sentences)")
    ap.add_argument("--k", type=draft_length, default=4, help="draft length, or auto: chosen before every step, "
                    f"up to {minispec.AUTO_K_MAX} (lookahead: {minispec.AUTO_K_SWEEP}), from the acceptance and "
                    "the costs measured so far")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    ap.add_argument("--beta", type=int, default=None, help="LOSSY: SpecDec's relaxed verification, accepting a "
                    "draft among the target's top-beta tokens (SpecDec uses 5); greedy only")
    ap.add_argument("--margin", type=float, default=None, help="with --beta: accept only if log p(top-1) - "
                    "log p(draft) <= margin (default 3.0; SpecDec calls it tau, but here tau is the metric)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=threads_flag, default=1, help="CPU threads for torch, or auto (default 1: "
                    "it holds up when another process is busy, and a tiny model's decoding gains little from more)")
    graphs = ap.add_mutually_exclusive_group()
    graphs.add_argument("--no-graphs", action="store_true",
                        help="on a GPU, run every forward eagerly, not as CUDA graphs")
    graphs.add_argument("--static", action="store_true", help="run forwards through the CUDA graphs' static "
                        "buffers but eagerly (the graphs' code path without capture; works on CPU)")
    ap.add_argument("--show", action="store_true", help="colour accepted drafts, corrections and bonus tokens")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--html", default=None, help="also write a self-contained HTML report of every step to this file")
    args = ap.parse_args()
    check_flags(args)
    set_threads(args.threads)
    device = pick_device(args.device)
    if args.gpt2:
        args.ckpt = None  # no trained drafters: make_drafter falls back to the training-free defaults
        model, tok = minispec.load_gpt2(args.gpt2, device)
    else:
        model, tok = minispec.load(args.ckpt, device)
    texts = ([args.prompt] if args.prompt is not None else
             GPT2_PROMPTS if args.gpt2 else checkpoint.target_meta(args.ckpt)["prompts"])
    prompts = [tok.encode(t, allowed_special="all") for t in texts]
    check_input(args, model, prompts)
    mode = forwards(args, device)
    static = None if mode == "plain" else minispec.StaticForwards(graphs=mode == "graphs")
    spread = None
    if args.method == "all":
        print(f"device {device}, forwards: {mode}, threads: {torch.get_num_threads()}")
        drafters, _ = bench.make_drafters(model, args.ckpt, args.k)
        rows, spread = decode_all(args, model, tok, prompts, drafters, static)
    else:
        prompts = prompts[:1]
        drafters = {args.method: minispec.make_drafter(args.method, model, ckpt=args.ckpt, k=args.k)}
        rows = [decode_one(args, model, tok, prompts[0], drafters[args.method], static)]
    if args.html:  # the same prompts decoded once more, untimed, with every step recorded
        runs = html_report.trace_runs(model, tok, prompts, drafters, args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, seed=args.seed, top_beta=top_beta(args), static=static)
        settings = {"device": device, "forwards": mode, "k": args.k, "max new tokens": args.max_new_tokens,
                    "temperature": args.temperature, "top-k": args.top_k, "seed": args.seed,
                    "verification": "exact" if args.beta is None else f"top-beta {top_beta(args)}, LOSSY"}
        html_report.write(args.html, tok, runs, rows, settings)
        print(f"wrote {args.html} ({os.path.getsize(args.html) / 1000:.0f} kB)")
    if args.json:
        report = {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "graphs": mode == "graphs", "forwards": mode, "prompts": len(prompts),
                  "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                  "threads": torch.get_num_threads(), "ar_spread": None if spread is None else round(spread, 3),
                  "verification": "exact" if args.beta is None else "top-beta, LOSSY",
                  **({} if args.beta is None else dict(zip(("beta", "margin"), top_beta(args)))), "methods": rows}
        write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
