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

import json
import os
import sys

import torch

import minispec
from minispec import checkpoint
from minispec.cli import Parser, pick_device, run
from minispec.cudagraph import StaticForwards
from minispec.errors import MinispecError
from minispec.speculative import Stats

# With --gpt2 there are no held-out prompts stored with the model: these are the default.
GPT2_PROMPTS = ["The meaning of life is", "Once upon a time, there was a", "The capital of France is",
                "In a shocking finding, scientists discovered"]
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


def check_args(args, model, prompts):
    context = model.config.block_size
    if args.temperature < 0:
        raise MinispecError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise MinispecError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.k < 1 or args.k + 1 > context:
        raise MinispecError(f"--k must be between 1 and {context - 1} (the context is {context}), got {args.k}")
    if args.top_k is not None and args.top_k < 1:
        raise MinispecError(f"--top-k must be at least 1, got {args.top_k}")
    if args.beta is None and args.tau is not None:
        raise MinispecError("--tau is the tolerance of --beta's relaxed verification: give --beta too")
    if args.beta is not None and (args.beta < 1 or args.temperature != 0 or (args.tau is not None and args.tau < 0)):
        raise MinispecError("--beta needs a value of at least 1, --tau 0 or more, and greedy decoding (--temperature 0)")
    for ids in prompts:
        if not ids:
            raise MinispecError("the prompt is empty")
        if len(ids) + args.max_new_tokens > context:
            raise MinispecError(f"a prompt of {len(ids)} tokens plus {args.max_new_tokens} new tokens "
                                f"does not fit in the context of {context} tokens")


def top_beta(args):
    """(beta, tau) for SpecDec's lossy relaxed verification, or None for exact verification."""
    return None if args.beta is None else (args.beta, 3.0 if args.tau is None else args.tau)


def forwards(args, device):
    """How forwards run: 'graphs' (CUDA graphs), 'static' (their buffers, eagerly) or 'plain'."""
    if args.no_graphs:
        return "plain"
    return "static" if args.static else "graphs" if device == "cuda" else "plain"


def decode_one(args, model, tok, prompt_ids, static):
    drafter = minispec.make_drafter(args.method, model, ckpt=args.ckpt, k=args.k)
    res = minispec.generate(model, prompt_ids, args.max_new_tokens, drafter, args.temperature,
                            args.top_k, args.seed, eot=tok.eot_token, top_beta=top_beta(args), static=static)
    colour = args.show and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(show(tok, prompt_ids, res, colour) if args.show else tok.decode(prompt_ids + res.tokens))
    s = res.stats
    print(f"--- {args.method}: {s.new_tokens} new tokens in {s.total_s:.2f}s, {s.tokens_per_s:.1f} tokens/s | "
          f"tau {s.tau:.2f} | alpha {s.alpha:.2f} | target forwards {s.target_forwards} | "
          f"accept at 1..: {' '.join(f'{a:.2f}' for a in s.accept_at)}")
    return row(args.method, args.k, s)


def row(method, k, s):
    """One method's line of the report, as in DESIGN.md's JSON."""
    return {"method": method, "k": 0 if method == "ar" else k, "tau": round(s.tau, 3), "alpha": round(s.alpha, 3),
            "accept_at": [round(a, 3) for a in s.accept_at], "tokens_per_s": round(s.tokens_per_s, 1),
            "new_tokens": s.new_tokens, "target_forwards": s.target_forwards,
            "draft_s": round(s.draft_s, 3), "verify_s": round(s.verify_s, 3)}


def decode_all(args, model, tok, prompts, static):
    drafters, skipped = {}, []
    for m in minispec.METHODS:
        try:
            drafters[m] = minispec.make_drafter(m, model, ckpt=args.ckpt, k=args.k)
        except MinispecError:
            if args.ckpt is not None:
                raise
            skipped.append(m)  # a trained method, and no checkpoint holds its drafter
    methods = list(drafters)
    if skipped:
        print(f"skipped (they need drafters trained against this model, see train_tiny.py --init-from): "
              f"{', '.join(skipped)}")

    def gen(method, ids, n):
        return minispec.generate(model, ids, n, drafters[method], args.temperature, args.top_k,
                                 args.seed, eot=tok.eot_token, top_beta=top_beta(args), static=static)

    # Warm-up: first calls pay for allocations and lazy initialisation. With static forwards every
    # prompt is decoded once in full first, so that each block shape is recorded (captured) before
    # the timed runs; greedy decoding then meets exactly the same shapes again.
    warm_prompts = prompts if static else prompts[:1]
    for m in methods:
        for ids in warm_prompts:
            gen(m, ids, args.max_new_tokens if static else min(16, args.max_new_tokens))
    totals = {m: Stats() for m in methods}
    identical = {m: True for m in methods}
    differing = {m: 0 for m in methods}  # new tokens unlike greedy's at the same place (lossy --beta)
    for i, ids in enumerate(prompts):
        print(f"\rprompt {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
        reference = None
        for m in methods:
            res = gen(m, ids, args.max_new_tokens)
            totals[m].add(res.stats)
            reference = res.tokens if m == "ar" else reference
            identical[m] &= res.tokens == reference
            differing[m] += sum(a != b for a, b in zip(res.tokens, reference)) + abs(len(res.tokens) - len(reference))
    print(file=sys.stderr)
    ar_speed = totals["ar"].tokens_per_s
    rows = [{**row(m, args.k, totals[m]), "speedup": round(totals[m].tokens_per_s / ar_speed, 3),
             "identical_to_ar": identical[m] if args.temperature == 0 else None,
             **({"differing_from_ar": differing[m]} if args.temperature == 0 else {})} for m in methods]
    if args.beta is not None:
        print(f"top-beta verification (beta {args.beta}, tau {top_beta(args)[1]}) is LOSSY: 'NO a/b' counts the "
              f"new tokens that differ from greedy decoding's at the same place")
    print(f"{'method':<12} {'k':>2} {'tau':>5} {'alpha':>5} {'tok/s':>7} {'speedup':>7} {'draft s':>7} "
          f"{'verify s':>8} {'identical':>9}  accept at 1..k")
    for r in rows:
        same = ("-" if r["identical_to_ar"] is None else "yes" if r["identical_to_ar"] else
                f"NO {r['differing_from_ar']}/{r['new_tokens']}")
        print(f"{r['method']:<12} {r['k']:>2} {r['tau']:>5.2f} {r['alpha']:>5.2f} {r['tokens_per_s']:>7.1f} "
              f"{r['speedup']:>6.2f}x {r['draft_s']:>7.2f} {r['verify_s']:>8.2f} {same:>9}  "
              f"{' '.join(f'{a:.2f}' for a in r['accept_at'])}")
    return rows


def main():
    ap = Parser(description=__doc__.split("\n")[0])
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default="out/tiny", help="checkpoint folder made by train_tiny.py")
    source.add_argument("--gpt2", default=None, metavar="DIR", help="a Hugging Face GPT-2 folder (config.json, "
                        "model.safetensors or pytorch_model.bin, vocab.json, merges.txt): training-free methods only")
    ap.add_argument("--method", default="all", choices=list(minispec.METHODS) + ["all"])
    ap.add_argument("--prompt", default=None, help="text to continue (default: the held-out prompts; with --gpt2, a few "
                    "English sentences)")
    ap.add_argument("--k", type=int, default=4, help="draft length")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    ap.add_argument("--beta", type=int, default=None, help="LOSSY: SpecDec's relaxed verification, accepting a "
                    "draft among the target's top-beta tokens (SpecDec uses 5); greedy only")
    ap.add_argument("--tau", type=float, default=None, help="with --beta: accept only if log p(top-1) - log p(draft) "
                    "<= tau (default 3.0, SpecDec's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    graphs = ap.add_mutually_exclusive_group()
    graphs.add_argument("--no-graphs", action="store_true",
                        help="on a GPU, run every forward eagerly, not as CUDA graphs")
    graphs.add_argument("--static", action="store_true", help="run forwards through the CUDA graphs' static "
                        "buffers but eagerly (the graphs' code path without capture; works on CPU)")
    ap.add_argument("--show", action="store_true", help="colour accepted drafts, corrections and bonus tokens")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.gpt2:
        args.ckpt = None  # no trained drafters: make_drafter falls back to the training-free defaults
        model, tok = minispec.load_gpt2(args.gpt2, device)
    else:
        model, tok = minispec.load(args.ckpt, device)
    texts = ([args.prompt] if args.prompt is not None else
             GPT2_PROMPTS if args.gpt2 else checkpoint.target_meta(args.ckpt)["prompts"])
    prompts = [tok.encode(t, allowed_special="all") for t in texts]
    check_args(args, model, prompts)
    mode = forwards(args, device)
    static = None if mode == "plain" else StaticForwards(graphs=mode == "graphs")
    if args.method == "all":
        print(f"device {device}, forwards: {mode}")
        rows = decode_all(args, model, tok, prompts, static)
    else:
        rows = [decode_one(args, model, tok, prompts[0], static)]
    if args.json:
        report = {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "graphs": mode == "graphs", "forwards": mode, "prompts": len(prompts),
                  "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "methods": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
