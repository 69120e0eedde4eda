"""Lesson 09: every method side by side

The same target, the same prompts, the same loop; only the drafter changes. This runs every
registered method (minispec.METHODS) with the routine `decode.py --method all` uses: a warm-up,
then the prompts one by one, each method in turn, so a slow moment of the machine hits all
methods alike. tau is new tokens per target forward (autoregressive = 1.00), alpha the share of
drafts accepted, speedup the tokens/s over `ar` in this same run, and `identical` says whether
the greedy tokens equal plain greedy decoding's: they must, for every method. tau is what a
method buys; speedup is what is left after paying for the drafter, and on a CPU, where a
target forward over k+1 tokens costs more than one over a single token, it is the harder number.

Papers: Spec-Bench (Xia et al., "Unlocking Efficiency in Large Language Model Inference", ACL
Findings 2024) compares methods this way. Files: minispec/bench.py, minispec/html_report.py,
minispec/drafters/__init__.py.
"""

from common import OUT, display, lesson, prompts, run, section, show_mask
from minispec import bench, html_report, masks

K = 4
NEW_TOKENS = 48


def main():
    model, tok, ckpt = lesson(__doc__)
    test_prompts = prompts(ckpt, tok, 2)
    section(f"what the target verifies each step (k = {K})")
    print("Every method but lookahead hands the target a chain, [x_t, d_1..d_k] under the causal block mask")
    print("(behind the cached prefix, lesson 02); lookahead hands it its window and n-grams (lesson 06):")
    show_mask(masks.causal(K + 1), ["x_t"] + [f"d{i}" for i in range(1, K + 1)])
    section(f"greedy, k = {K}, {len(test_prompts)} held-out prompts x {NEW_TOKENS} tokens "
            f"(the full benchmark: python decode.py)")
    drafters, _ = bench.make_drafters(model, ckpt, K)
    rows, _ = bench.side_by_side(model, test_prompts, drafters, NEW_TOKENS, K, eot=tok.eot_token)
    print(bench.table(rows))
    best = max((r for r in rows if r["method"] != "ar"), key=lambda r: r["tau"])
    print(f"\nmeasured: the highest tau is {best['method']}'s ({best['tau']:.2f}); every method identical to greedy: "
          f"{all(r['identical_to_ar'] for r in rows)}")
    print("Two prompts are a demonstration, not a benchmark: timings on a shared CPU vary by 20% from run to run.")

    section("the same run, step by step, in a browser")
    runs = html_report.trace_runs(model, tok, test_prompts, drafters, NEW_TOKENS)
    OUT.mkdir(exist_ok=True)
    report = OUT / "lesson09.html"
    html_report.write(report, tok, runs, rows, {"k": K, "new tokens": NEW_TOKENS, "prompts": len(test_prompts)})
    print(f"wrote {display(report)}: every step of every method (accepted drafts, the rejected ones struck through,\n"
          f"corrections and bonus tokens) and one verification mask per method. Open it in any browser.")


if __name__ == "__main__":
    run(main)
