"""decode.py --html's report (minispec/html_report.py): read back with html.parser, it must say
exactly what the run did: its steps, its tokens of each kind, its table, its masks."""

import shutil
import struct
import subprocess
from collections import Counter
from html.parser import HTMLParser

import pytest

import minispec
from minispec import html_report, masks
from minispec.speculative import Stats
from tests.helpers import prompts

VOID = {"meta", "link", "br", "hr", "img", "input", "wbr", "col", "area", "base", "embed", "source", "track"}
KINDS = {"a", "b", "c"}  # accepted draft, bonus, correction; a rejected draft is an <s>


class Page(HTMLParser):
    """A report read back: per (method, prompt) its steps, token counts by kind, text and titles;
    the summary table; each mask grid. Checks on the way that every element is closed in order."""

    def __init__(self, text):
        assert text.startswith('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">')
        super().__init__(convert_charrefs=True)
        self.open, self.runs, self.table, self.grids = [], {}, [], []
        self.run = self.grid = None
        self.feed(text)
        self.close()
        assert not self.open, f"unclosed: {self.open}"

    def inside(self, tag, cls=None):
        return any(t == tag and (cls is None or a.get("class") == cls) for t, a in self.open)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls, *more = attrs.get("class", "").split() or [None]
        if tag not in VOID:
            self.open.append((tag, attrs))
        if tag == "details" and cls == "run":
            self.run = self.runs[attrs["data-method"], int(attrs["data-prompt"])] = {
                "kinds": Counter(), "steps": 0, "text": [], "prompt": [], "titles": []}
        elif self.run is not None and (tag == "s" or tag == "span" and cls in KINDS):
            if tag == "span":  # (an <s> holds a step's rejected drafts, an <i> each)
                self.run["kinds"][cls] += 1
            self.run["titles"].append(attrs["title"])
            self.run["steps"] += "n" in (cls, *more)  # the first token of a step
        elif self.run is not None and tag == "i" and self.inside("s"):
            self.run["kinds"]["r"] += 1
        elif tag == "table" and cls == "mask":
            self.grid = {"prompt": attrs.get("data-prompt"), "step": attrs.get("data-step"), "rows": []}
            self.grids.append(self.grid)
        elif tag == "tr" and self.inside("tbody"):
            (self.grid["rows"] if self.grid else self.table).append([])
        elif tag == "td":
            (self.grid["rows"] if self.grid else self.table)[-1].append("")

    def handle_startendtag(self, tag, attrs):  # <line/> in SVG: nothing to close
        pass

    def handle_endtag(self, tag):
        assert self.open and self.open[-1][0] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        if tag == "details":
            self.run = None
        elif tag == "table":
            self.grid = None

    def handle_data(self, data):
        if self.run is not None and self.inside("p", "tx") and not self.inside("s"):
            self.run["text"].append(data)
            if self.inside("span", "p"):
                self.run["prompt"].append(data)
        elif self.inside("td"):
            (self.grid["rows"] if self.grid else self.table)[-1][-1] += data


def table_rows(runs, k, timed=True):
    """The rows of decode.py's table (bench.row) for the traced runs; timed=False leaves out the clock's."""
    rows = []
    for method in dict.fromkeys(r.method for r in runs):
        s = Stats()
        for run in runs:
            if run.method == method:
                s.add(run.result.stats)
        row = {"method": method, "k": 0 if method == "ar" else k, "tau": round(s.tau, 3),
               "alpha": round(s.alpha, 3), "accept_at": [round(a, 3) for a in s.accept_at],
               "new_tokens": s.new_tokens, "target_forwards": s.target_forwards}
        if timed:
            row |= {"tokens_per_s": round(s.tokens_per_s, 1), "draft_s": round(s.draft_s, 3),
                    "verify_s": round(s.verify_s, 3)}
        rows.append(row)
    return rows


def report(tiny, ckpt, methods, path, texts=None, n=2, new_tokens=16, timed=True, **generate_kwargs):
    model, tok = tiny
    ids = [tok.encode(t) for t in texts] if texts else [p[:12] for p in prompts(ckpt, n)]
    drafters = {m: minispec.make_drafter(m, model, ckpt=ckpt, k=4) for m in methods}
    runs = html_report.trace_runs(model, tok, ids, drafters, new_tokens, **generate_kwargs)
    rows = table_rows(runs, 4, timed)
    if "ar" in methods and timed:  # as decode.py --method all adds them
        greedy = [run.result.tokens for run in runs if run.method == "ar"]
        for row in rows:
            mine = [run.result.tokens for run in runs if run.method == row["method"]]
            row |= {"speedup": round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 3),
                    "identical_to_ar": mine == greedy}
    html_report.write(path, tok, runs, rows, {"temperature": generate_kwargs.get("temperature", 0.0)})
    return runs, rows, Page(path.read_text(encoding="utf-8"))


def check_runs(tok, runs, page):
    """Every run's steps and tokens in the page are the run's own, counted by kind."""
    assert len(page.runs) == len(runs)
    for run, (key, seen) in zip(runs, page.runs.items()):
        assert key[0] == run.method
        res, s = run.result, run.result.stats
        assert seen["steps"] == s.target_forwards == len(res.steps) == len(run.steps)
        kinds = seen["kinds"]
        assert kinds["a"] == sum(accepted for _, accepted, _ in res.steps) == s.accepted  # no eot met here
        assert kinds["a"] + kinds["b"] + kinds["c"] == s.new_tokens == len(res.tokens)
        if all(len(step.draft.paths) == 1 for step in run.steps):  # chains: every draft past the accepted ones
            assert kinds["r"] == s.proposed - s.accepted
            assert kinds["b"] == sum(accepted == depth > 0 for _, accepted, depth in res.steps)
        assert "".join(seen["text"]) == tok.decode(run.prompt + res.tokens)  # the text, rejected drafts aside


def test_all_methods_greedy(tiny, tiny_ckpt, tmp_path):
    _, tok = tiny
    runs, rows, page = report(tiny, tiny_ckpt, list(minispec.METHODS), tmp_path / "report.html")
    check_runs(tok, runs, page)
    assert len(page.table) == len(rows)
    for row, cells in zip(rows, page.table):
        got = dict(zip(html_report.COLUMNS, cells))
        assert got["method"] == row["method"] and got["identical_to_ar"] == "yes"
        for key in ("k", "tau", "alpha", "tokens_per_s", "speedup", "new_tokens", "target_forwards", "draft_s",
                    "verify_s"):
            assert float(got[key]) == row[key], key
        assert [float(a) for a in got["accept_at"].split()] == row["accept_at"]
    # one verification block per method, cell for cell what masks.render prints
    verified = [grid for grid in page.grids if grid["step"] is not None]
    assert len(verified) == len(minispec.METHODS)
    for grid, method in zip(verified, minispec.METHODS):
        run = [r for r in runs if r.method == method][int(grid["prompt"])]
        mask = run.steps[int(grid["step"]) - 1].draft.mask
        assert grid["rows"] == [line.split()[1:] for line in masks.render(mask).splitlines()[1:]]
    sizes = {method: len(grid["rows"]) for grid, method in zip(verified, minispec.METHODS)}
    assert sizes["ar"] == 1 and sizes["lookahead"] > 5  # Lookahead's block shows its 2-D window
    drafting = [grid for grid in page.grids if grid["step"] is None]  # the [M] drafter's own block
    assert len(drafting) == 1 and drafting[0]["rows"][-1] == ["1"] * len(drafting[0]["rows"])


def test_tracing_changes_nothing(tiny, tiny_ckpt):
    """A Trace only watches: every method decodes the same tokens in the same steps without it."""
    model, tok = tiny
    ids = [p[:12] for p in prompts(tiny_ckpt, 2)]
    drafters = {m: minispec.make_drafter(m, model, ckpt=tiny_ckpt, k=4) for m in minispec.METHODS}
    for run in html_report.trace_runs(model, tok, ids, drafters, 16, temperature=1.0, seed=1):
        plain = minispec.generate(model, run.prompt, 16, drafters[run.method], temperature=1.0, seed=1,
                                  eot=tok.eot_token)
        assert (plain.tokens, plain.steps) == (run.result.tokens, run.result.steps), run.method


@pytest.mark.parametrize("method", ["draft_model", "lookahead"])
def test_one_method_sampled(method, tiny, tiny_ckpt, tmp_path):
    """Sampling: the tried drafts carry their acceptance probability; one method: no speedup."""
    _, tok = tiny
    runs, rows, page = report(tiny, tiny_ckpt, [method], tmp_path / "one.html", temperature=1.0, seed=3)
    check_runs(tok, runs, page)
    assert [cell for cell in page.table[0] if cell == "-"] == ["-", "-"]  # speedup, identical
    for run, seen in zip(runs, page.runs.values()):
        probs = [float(t.split("accept p ")[1]) for t in seen["titles"] if "accept p" in t]
        assert len(probs) == sum(run.result.stats.tried_at) and all(0 <= p <= 1 for p in probs)
        assert all(t.startswith("step ") and ", depth " in t for t in seen["titles"])


def test_html_metacharacters_round_trip(tiny, tiny_ckpt, tmp_path):
    text = "<script>alert('x')</script> & &amp; \"q\" <!-- no -->\n\tx < y && z > 0 ]]> é 日本 😀"
    _, tok = tiny
    runs, _, page = report(tiny, tiny_ckpt, ["ar", "jacobi"], tmp_path / "meta.html", texts=[text])
    check_runs(tok, runs, page)
    for seen in page.runs.values():
        assert "".join(seen["prompt"]) == text
    assert "<script" not in (tmp_path / "meta.html").read_text(encoding="utf-8")
    shown = html_report.esc("\x00\r\x7f\x85\ufffe\U0010ffff")  # HTML forbids these characters: shown visibly
    assert shown.isprintable() and shown == "␀␍␡&lt;U+0085&gt;&lt;U+FFFE&gt;&lt;U+10FFFF&gt;"


def test_same_seed_same_file(tiny, tiny_ckpt, tmp_path):
    """Sampled twice with one seed: identical files (the clock's columns left out of the rows)."""
    files = []
    for name in ("one.html", "two.html"):
        report(tiny, tiny_ckpt, ["ar", "mask", "blockwise"], tmp_path / name, timed=False, temperature=0.8,
               seed=5)
        files.append((tmp_path / name).read_bytes())
    assert files[0] == files[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.html", "two.html"]  # no temp file left
    assert len(files[0]) < 100_000


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, which follows the 8-byte signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (README: apt-get install chromium)")
def test_chromium_screenshot(tiny, tiny_ckpt, tmp_path):
    page = tmp_path / "report.html"
    report(tiny, tiny_ckpt, ["ar", "lookahead"], page)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,900", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png_size(shot) == (1200, 900)
