"""Every lesson script runs on the test-preset checkpoint, exits 0, and prints its key lines.

Lessons are found by glob (lessons/[0-9]*.py), so a new lesson is run the moment it exists; the
ones listed in KEY_LINES must also print what they promise, with the numbers they measure.
"""

import os
import re
import subprocess
import sys

import pytest
from tests.helpers import ROOT


LESSONS = sorted((ROOT / "lessons").glob("[0-9]*.py"))
MASK_ROW = re.compile(r"^ *\S+( +[1.])+ *$", re.M)  # a row of minispec.masks.render's output

KEY_LINES = {  # lesson number -> patterns its output must match
    "01": [r"cached == uncached: max \|logit difference\| over \d+ steps = \S+ .*same tokens: True",
           r"still match the uncached ones"],
    "02": [r"the tree's logits equal", r"\[M\]s present equal a plain causal", r"each group's logits equal",
           r"one token at each position t..its own: True"],
    "03": [r"tokens identical to plain greedy decoding: True", r"noise floor", r"tau \d+\.\d+, alpha"],
    "04": [r"acceptance as k grows", r"^ *6 +\d+\.\d+ +\d+\.\d+ +True", r"no other model forward",
           r"sampling set: 1 - TV\(p, q\) per head .*\d\.\d\d$",
           r"without knowing the token before it is accepted at most about \d\.\d\d of the time$",
           r"^\(the best q\), \d\.\d\d with the marginal over that token"],
    "05": [r"^mask +1 .* True", r"^blockwise .* True", r"^draft_model .* True",
           r"sampling set: 1 - TV\(p, q\) per \[M\] .*\d\.\d\d$"],
    "06": [r"the fixed point equals greedy decoding: True", r"^lookahead .* True", r"lookahead pool holds \d+",
           r"\d+ iterations to the fixed point of 16 tokens; fast-forwarded \d+"],
    "07": [r"^ +1 +\d\.\d\d +\d\.\d\d +\d\.\d\d +\d\.\d\dx +\d\.\d\d$", r"layer 0: skip attn",
           r"runs \d+ of \d+ sub-layers"],
    "08": [r"^ar +static tokens == plain tokens: True", r"^mask +static tokens == plain tokens: True",
           r"\d+ recordings", r"^T=1: plain \d\.\d+ ms"],
    "09": [r"every method identical to greedy: True", r"^ar +0 +0\.00 +1\.00", r"wrote out/lesson09\.html"],
    "10": [r"^ +5 +\d+\.\d{3} +\d\.\d\d", r"costs \d\.\d\d one-token forwards", r"^c = \d+\.\d{3} ms a draft",
           r"^ 0\.90( +\d+\.\d\d){8} +\d$", r"predicted \d+\.\d\dx from tau .* measured \d+\.\d\dx"],
    "11": [r"tokens identical to plain greedy decoding: True", r"^ +0 +1\.00 +1\.00 +\d+\.\d{3} ",
           r"<- the choice now$", r"never right: \d+ of \d+ steps drafted nothing"],
}


def run_lesson(path, ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(path), "--ckpt", str(ckpt)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_lessons_are_numbered_and_complete():
    numbers = {p.name[:2] for p in LESSONS}
    assert set(KEY_LINES) <= numbers, f"missing lessons: {sorted(set(KEY_LINES) - numbers)}"


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs(path, tiny_ckpt):
    proc = run_lesson(path, tiny_ckpt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert MASK_ROW.search(out), "every lesson draws the mask it uses (minispec.masks.render)"
    for pattern in KEY_LINES.get(path.name[:2], []):
        assert re.search(pattern, out, re.M), f"{path.name} should print a line matching {pattern!r}"
    if path.name.startswith("01"):
        assert float(re.search(r"logit difference\| over \d+ steps = (\S+)", out).group(1)) < 1e-4
    if path.name.startswith("04"):  # the best q is accepted at least as often as the marginal
        best = float(re.search(r"accepted at most about (\d\.\d\d) of the time$", out, re.M).group(1))
        assert best >= float(re.search(r"^\(the best q\), (\d\.\d\d) with the marginal", out, re.M).group(1))
    if path.name.startswith("11"):  # a drafter that is never right ends up taking autoregressive steps
        nothing, steps = map(int, re.search(r"never right: (\d+) of (\d+) steps", out).groups())
        assert nothing > 0.8 * steps
    if path.name.startswith("03"):  # the sampling experiment: right rule ~ p, the bug far from it
        rows = dict(re.findall(r"^(\w[\w ()+:]*?) {2,}(\d\.\d+ +\d\.\d+ +\d\.\d+)$", out, re.M))
        for drafter in ("trained draft model", "random draft model (poor)"):
            rate, expected, tv = map(float, rows[drafter].split())
            assert tv < 0.06 and abs(rate - expected) < 0.03, f"{drafter}: {rows[drafter]}"
            assert float(rows[drafter + " + BUG: argmax draft"].split()[2]) > 0.1


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run_lesson(LESSONS[0], tmp_path / "nothing")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no checkpoint") and "Traceback" not in proc.stderr
