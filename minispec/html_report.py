"""An HTML report of a decoding run: what every step drafted, accepted and rejected, in one file.

`decode.py --html FILE` writes it and a student opens it in any browser. The file is complete
in itself (inline CSS and SVG; no JavaScript, nothing fetched) and holds
  1. the run's benchmark table and two bar charts: speedup per method, and the acceptance rate
     at each draft position per method;
  2. per method and prompt, the text step by step: accepted drafts, rejected drafts struck
     through where they were, the target's correction and the bonus token, each in its own
     colour; a token's title (hover it) gives its step, its depth and, when sampling, the
     probability it had of being accepted (a step's rejected drafts share one title: only the
     first of them was tried);
  3. per method, the attention mask of one verification block (its biggest), drawn as a grid
     with the block's tokens on both axes: the cells masks.render prints.

`Trace` wraps any drafter and records each step as the one loop (speculative.generate) runs it;
the loop is untouched. The page is a pure function of the traces and the table rows (no clock,
no randomness), so two identical runs give identical files; speeds come only from the rows.
"""

import codecs
import html
from dataclasses import dataclass, replace

from .cli import write_text
from .speculative import Draft, Drafter, Result, generate


@dataclass
class TracedStep:
    block: list  # the verified block's token ids: x_t, then the drafted tokens
    draft: Draft  # as the loop verified it (trimmed the same way), without q
    path: list  # the accepted block indices, root first
    emitted: list  # the new tokens
    chosen: list  # the candidate path the accepted one lies on: its rest are the rejected drafts
    accept_p: list | None  # when sampling: the acceptance probability of each tried draft on `chosen`
    drafting: tuple | None  # the [M]-token drafter's own forward: (its block mask, the tokens it fed)


class Trace(Drafter):
    """A drafter that hands every call to `inner` (None: autoregressive) and records each step."""

    def __init__(self, inner=None):
        self.inner = inner or Drafter()
        self.k = self.inner.k
        self.steps = []

    def start(self, prompt, cache):
        self.steps, self.slots = [], cache.max_len
        self.inner.start(prompt, cache)

    def propose(self, seq, room, sampling):
        draft = self.inner.propose(seq, room, sampling)
        # a drafter with a masked forward of its own (the [M]-token drafter) says what it ran:
        # (its block mask, the tokens it fed before the [M]s)
        self.drafting = getattr(self.inner, "drafting", None)
        self.sampling = sampling  # the loop trims the draft exactly so before verifying it:
        self.draft = draft.trimmed(room, self.slots - (len(seq) - 1))
        return draft

    def verify(self, model, idx, pos, mask, cache, slots):
        # delegated, not inherited: early exit runs its own upper layers and checks it is its cache
        return self.inner.verify(model, idx, pos, mask, cache, slots)

    def observe(self, step):
        draft, path = self.draft, step.path
        chosen = next(p for p in draft.paths or [[0]] if p[:len(path)] == path)
        accept_p = None
        if self.sampling.temperature > 0:  # tried: the accepted drafts and the first rejected one
            p = self.sampling.probs(step.logits.float())
            accept_p = []
            for parent, i in zip(chosen, chosen[1:len(path) + 1]):
                d = int(step.tokens[i])
                # a sampled chain is accepted with min(1, p/q) (verify.accept_sampled); a
                # deterministic draft with p(d), before any sibling was tried and rejected
                q = 1.0 if draft.q is None else float(draft.q[i - 1, d])  # q: a chain's, row i-1 for block i
                accept_p.append(min(1.0, float(p[parent, d]) / q))
        self.steps.append(TracedStep(step.tokens.tolist(), replace(draft, q=None), path, list(step.emitted),
                                     chosen, accept_p, self.drafting))
        self.inner.observe(step)


@dataclass
class Run:
    method: str
    prompt: list  # token ids
    result: Result
    steps: list  # a TracedStep per verification forward


def trace_runs(model, tok, prompts, drafters, max_new_tokens, **generate_kwargs):
    """Decode every prompt (a list of token ids) with every method of `drafters` (name -> drafter,
    or None for autoregressive), each through a Trace. generate_kwargs go to generate; eot defaults
    to the tokenizer's, as decode.py decodes. Returns [Run], by method, then prompt."""
    generate_kwargs.setdefault("eot", tok.eot_token)
    runs = []
    for method, drafter in drafters.items():
        for prompt in prompts:
            trace = Trace(drafter)
            result = generate(model, list(prompt), max_new_tokens, trace, **generate_kwargs)
            runs.append(Run(method, list(prompt), result, trace.steps))
    return runs


# Text. HTML forbids most control characters and the noncharacters: they show as a picture or as
# <U+XXXX>. Newlines and tabs stay in the text (it copies and parses back unchanged); CSS marks them.
_FORBIDDEN = [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0xFDD0, 0xFDF0),
              *(plane + end for plane in range(0, 0x110000, 0x10000) for end in (0xFFFE, 0xFFFF))]
_VISIBLE = {c: chr(0x2400 + c) if c < 0x20 else "\u2421" if c == 0x7F else html.escape(f"<U+{c:04X}>")
            for c in _FORBIDDEN}
_VISIBLE.update({ord("\n"): "<span class=nl>\n</span>", ord("\t"): "<span class=tb>\t</span>"})


def esc(text):
    """Any text as HTML text: escaped, newlines and tabs marked, forbidden characters made visible."""
    return html.escape(text, quote=False).translate(_VISIBLE)  # attributes: html.escape(text)


def token_text(tok, t):
    return tok.decode_single_token_bytes(t).decode(errors="replace")


def label(text, width=10):
    """A token as a short one-line label for a grid: space, newline and tab drawn as ·, ↵, →."""
    text = text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u2192")
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def token_html(kind, text, title, first):
    """A token, or for kind "r" the list of a step's rejected drafts (an <i> each) struck through
    where they were. Class n marks the first of a step (CSS draws a bar before it)."""
    if kind == "r":
        return f'<s{" class=n" if first else ""} title="{title}">{"".join(f"<i>{esc(t)}</i>" for t in text)}</s>'
    cls = f'"{kind} n"' if first else kind
    return f'<span class={cls} title="{title}">{esc(text)}</span>'


def step_html(tok, n, step, decoder):
    """Step n: its accepted drafts, the rejected ones struck through, then the correction or bonus.
    decoder: the UTF-8 decoder of the text so far (a token may hold part of a character)."""
    depth, probs = [0] + step.draft.depth.tolist(), step.accept_p or []
    a = min(len(step.path) - 1, len(step.emitted))  # accepted drafts emitted (eot may cut them)
    rejected = step.chosen[len(step.path):]

    def title(j, d):  # j: the draft's place on the chosen path, which its probability has
        return f"step {n}, depth {d}" + (f", accept p {probs[j]:.2f}" if j < len(probs) else "")

    out = [("a", decoder.decode(tok.decode_single_token_bytes(step.block[i])), title(j, depth[i]))
           for j, i in enumerate(step.path[1:a + 1])]
    if rejected:  # one title: the first was tried (and rejected), the ones after it fell with it
        depths = f"{depth[rejected[0]]}" + (f"-{depth[rejected[-1]]}" if len(rejected) > 1 else "")
        out.append(("r", [token_text(tok, step.block[i]) for i in rejected], title(len(step.path) - 1, depths)))
    kind = "c" if rejected or len(step.chosen) == 1 else "b"  # bonus: the whole candidate was accepted
    out += [(kind, decoder.decode(tok.decode_single_token_bytes(t)), title(len(probs), a + 1))
            for t in step.emitted[a:]]
    return "".join(token_html(*token, first=i == 0) for i, token in enumerate(out))


def run_html(tok, run, index, shown):
    """One prompt's text, step by step, in a <details> that is open if `shown`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    prompt = decoder.decode(tok.decode_bytes(run.prompt))
    steps = "".join(step_html(tok, n, step, decoder) for n, step in enumerate(run.steps, 1))
    s = run.result.stats
    return (f"<details{' open' if shown else ''} class=run data-method=\"{html.escape(run.method)}\" "
            f"data-prompt={index}><summary>prompt {index}: {s.new_tokens} new tokens in {len(run.steps)} "
            f"steps, tau {s.tau:.2f}</summary><p class=tx><span class=p>{esc(prompt)}</span>{steps}"
            f"{esc(decoder.decode(b'', final=True))}</p></details>")


def grid_html(mask, labels, caption, data=""):
    """A T x T mask as a table; labels: (text, css class, title) of each row's and column's token."""
    heads = "".join(f'<th class="{c}" title="{html.escape(t)}">{esc(x)}</th>' for x, c, t in labels)
    rows = "".join(f'<tr><th class="{c}" title="{html.escape(t)}">{esc(x)}</th>'
                   + "".join("<td class=y>1</td>" if m else "<td>.</td>" for m in row) + "</tr>"
                   for (x, c, t), row in zip(labels, mask.tolist()))
    return (f"<figure><table class=mask {data}><thead><tr><th></th>{heads}</tr></thead><tbody>{rows}"
            f"</tbody></table><figcaption>{esc(caption)}</figcaption></figure>")


def mask_html(tok, runs):
    """One method's biggest verification block (the first on ties) as a grid; with the [M]-token
    drafter also the mask of the drafter's own forward in that step. Returns (html, its prompt)."""
    def interest(pn):  # the biggest block; among those, one with accepted and rejected drafts
        step = runs[pn[0]].steps[pn[1]]
        return len(step.block), len(step.path) > 1 and len(step.chosen) > len(step.path)

    p, n = max(((p, n) for p, run in enumerate(runs) for n in range(len(run.steps))), key=interest)
    step = runs[p].steps[n]  # (max keeps the first of equals)
    depth, on_path = [0] + step.draft.depth.tolist(), set().union(*step.draft.paths)
    kinds = {i: "a" for i in step.path} | {i: "r" for i in step.chosen[len(step.path):]}
    labels = [(label(token_text(tok, t)), kinds.get(i, "" if i in on_path else "w"),
               f"block index {i}, position t+{depth[i]}: {token_text(tok, t)!r}") for i, t in enumerate(step.block)]
    caption = f"Prompt {p}, step {n + 1}: "
    caption += ("every block is x_t alone: nothing is drafted." if len(step.block) == 1 else
                f"the block the target verified in one forward, x_t then {len(step.block) - 1} drafted tokens. "
                "A row is a query, a column a key, 1: may attend. Every row also sees the whole accepted "
                "prefix (masks.cached_block). Green: accepted, red: rejected, grey: on no candidate path "
                "(computed for the drafter only).")
    out = grid_html(step.draft.mask, labels, caption, f"data-prompt={p} data-step={n + 1}")
    if step.drafting:
        block, fed = step.drafting
        k = len(block) - len(fed)
        labels = [(label(token_text(tok, t)), "", f"accepted since the drafter's last step: {token_text(tok, t)!r}")
                  for t in fed]
        labels += [(f"[M]{i}", "", f"placeholder for the token {i} ahead") for i in range(1, k + 1)]
        out += grid_html(block, labels, (
            f"The same step inside the [M]-token drafter (masks.mask_token_block): the {len(fed)} tokens "
            f"its cache lacked, then {k} [M]s; every [M] is its own query over the prefix and all [M]s."))
    return out, p


def chart(title, labels, series, fmt, vmax, legend=(), ref=None, bar=14):
    """A horizontal bar chart as inline SVG: a group of bars per label, one bar per value."""
    left, width, y, parts = 110, 380, 40, []
    for group, values in zip(labels, series):
        top = y
        for i, v in enumerate(values):
            w = width * v / vmax
            name = f"{group}, {legend[i]}" if legend else group
            parts.append(f'<rect class="k{i % 8}" x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}">'
                         f'<title>{esc(name)}: {fmt(v)}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{y + bar - 2.5}">{fmt(v)}</text>')
            y += bar
        if not values:
            parts.append(f'<text x="{left + 4}" y="{y + bar - 3}">no drafts</text>')
            y += bar
        parts.append(f'<text x="{left - 6}" y="{(top + y) / 2 + 4:.0f}" text-anchor="end">{esc(group)}</text>')
        y += 6
    if ref is not None:
        x = left + width * ref / vmax
        parts.append(f'<line class="ref" x1="{x:.1f}" x2="{x:.1f}" y1="34" y2="{y}"/>')
    for i, name in enumerate(legend):
        parts.append(f'<rect class="k{i % 8}" x="{left + 90 * i}" y="20" width="10" height="10"/>'
                     f'<text x="{left + 14 + 90 * i}" y="29">{esc(name)}</text>')
    svg_width = max(left + width, left + 90 * len(legend)) + 60
    return (f'<svg width="{svg_width}" height="{y + 4}" role="img"><text x="0" y="12" class="h">{esc(title)}</text>'
            f'{"".join(parts)}</svg>')


COLUMNS = {"method": "method", "k": "k", "tau": "tau", "alpha": "alpha", "tokens_per_s": "tokens/s",
           "speedup": "speedup", "identical_to_ar": "identical", "accept_at": "accept at 1..k",
           "new_tokens": "new tokens", "target_forwards": "target forwards", "draft_s": "draft s",
           "verify_s": "verify s"}


def cell(row, key):
    """A row's value as decode.py prints it."""
    value = row.get(key)
    if value is False and "differing_from_ar" in row:
        return f"NO {row['differing_from_ar']}/{row['new_tokens']}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "-" if value is None else str(value)


def summary_html(rows):
    head = "".join(f"<th data-key={key}>{name}</th>" for key, name in COLUMNS.items())
    body = "".join("<tr>" + "".join(f"<td>{esc(cell(r, key))}</td>" for key in COLUMNS) + "</tr>" for r in rows)
    labels = [r["method"] for r in rows]
    if all("speedup" in r for r in rows):
        speed = chart("speedup over autoregressive (tokens/s)", labels, [[r["speedup"]] for r in rows],
                      lambda v: f"{v:.2f}x", max(1, *(r["speedup"] for r in rows)) * 1.2, ref=1.0)
    else:  # one method: no autoregressive run to compare with
        speed = chart("tau: new tokens per target forward", labels, [[r["tau"]] for r in rows],
                      lambda v: f"{v:.2f}", max(1, *(r["tau"] for r in rows)) * 1.2, ref=1.0)
    depth = max((len(r["accept_at"]) for r in rows), default=0)
    accept = chart("acceptance at each draft position", labels, [r["accept_at"] for r in rows],
                   lambda v: f"{v:.2f}", 1.2, legend=[f"position {i}" for i in range(1, depth + 1)], bar=10)
    return f"<table class=sum><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><div>{speed}{accept}</div>"


LEGEND = ("<p class=legend><span class=p>prompt</span> <span class=a>accepted draft</span> <s>rejected draft</s> "
          "<span class=c>the target's token (correction)</span> <span class=b>bonus token (the whole candidate "
          "accepted)</span> | a bar starts each step | <span class=nl></span> newline, <span class=tb></span> "
          "tab. Hover a token for its step, its depth (its position after the step's x_t) and, when sampling, "
          "the probability it had of being accepted.</p>")

CSS = """body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1150px;margin:1em auto;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin:1.4em 0 .3em}summary{cursor:pointer;color:#555}
.sum{border-collapse:collapse;font-size:13px}.sum td:first-child,.sum th:first-child{text-align:left}
.sum th,.sum td{padding:2px 7px;border-bottom:1px solid #ddd;text-align:right}
svg{font:10px sans-serif;margin:.8em 1.5em 0 0;vertical-align:top}svg .h{font-weight:bold;font-size:12px}
.ref{stroke:#333;stroke-dasharray:3 2}.k0{fill:#2b6cb0}.k1{fill:#4a90d9}.k2{fill:#7db3ea}.k3{fill:#a9cdf2}
.k4{fill:#6b5fb5}.k5{fill:#9c8fd6}.k6{fill:#c3b9ea}.k7{fill:#ddd6f5}
.tx{font:13px/1.7 ui-monospace,monospace;white-space:pre-wrap;overflow-wrap:anywhere;background:#fafafa;
border:1px solid #eee;padding:.5em;margin:.3em 0}.p{color:#777}.n{border-left:2px solid #bbb}
.a{background:#c6efc6}.c{background:#ffdf9e}.b{background:#b9defc}s{background:#f8d0d0;color:#b33}
s i{font-style:normal}s i+i{border-left:1px dotted #d88}
.nl:before{content:"\\21b5";color:#999}.tb:before{content:"\\2192";color:#999}
.mask{border-collapse:collapse;font:11px ui-monospace,monospace}.mask td.y{background:#2b6cb0;color:#fff}
.mask td{width:15px;text-align:center;color:#bbb;border:1px solid #eee}
.mask th{font-weight:normal;white-space:pre;padding:0 3px;text-align:right}
.mask thead th{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left}.mask th.a{background:#c6efc6}
.mask th.r{background:#f8d0d0}.mask th.w{color:#999;font-style:italic}
figure{margin:.5em 0 1em;display:inline-block;vertical-align:top}
figcaption{font-size:12px;color:#555;max-width:560px}"""


def render(tok, runs, rows, settings=None, title="minispec: what each decoding step did"):
    """The whole report as one HTML page. runs: from trace_runs; rows: the run's benchmark table
    (decode.py's row dicts); settings: {name: value} to list under the title, in their order."""
    methods = list(dict.fromkeys(run.method for run in runs))
    listed = " · ".join(f"{esc(str(name))} {esc(str(value))}" for name, value in (settings or {}).items())
    nav = " · ".join(f'<a href="#m-{html.escape(m)}">{esc(m)}</a>' for m in methods)
    sections = []
    for m in methods:
        mine = [run for run in runs if run.method == m]
        steps, new = sum(len(r.steps) for r in mine), sum(r.result.stats.new_tokens for r in mine)
        grid, p = mask_html(tok, mine)
        drafted = any(len(step.block) > 1 for run in mine for step in run.steps)  # else nothing to look at
        sections.append(f'<section id="m-{html.escape(m)}"><h2>{esc(m)}</h2><p>{len(mine)} prompts, {new} new '
                        f"tokens in {steps} steps (tau {new / max(steps, 1):.2f})</p>{grid}"
                        + "".join(run_html(tok, run, i, drafted and i == p) for i, run in enumerate(mine))
                        + "</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title><style>{CSS}</style>'
            f"</head><body><h1>{esc(title)}</h1><p>{listed}</p>{summary_html(rows)}<p>Steps: {nav}. They "
            "come from decoding the prompts again, with the same seed, each drafter wrapped in a "
            f"minispec.html_report.Trace; speeds come from the table only.</p>{LEGEND}{''.join(sections)}"
            "</body></html>\n")


def write(path, tok, runs, rows, settings=None, **options):
    """render(...) into the file `path`, atomically: a reader sees the old file or the whole new one."""
    write_text(path, render(tok, runs, rows, settings, **options))
