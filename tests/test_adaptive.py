"""Adaptive draft length (k="auto"): it goes where the measurements point, and stays lossless.

Its greedy identity with every method is in test_methods.py (k="auto") and its exact sampled
distribution in test_sampling_exact.py; here, what it chooses. The drafters advance a fake
clock by what their step would cost (1 + 0.3 k), so the choices do not depend on this machine.
"""

import random

import pytest
import torch

from minispec import masks
from minispec.adaptive import EXPLORE, IDLE_EXPLORE, Adaptive
from minispec.speculative import Draft, Drafter, generate
from tests.helpers import random_gpt


class FakeClock:
    now = 0.0

    def __call__(self):
        return self.now


class Scripted(Drafter):
    """Proposes the next tokens of `text` (right, as long as the text is greedy's) or a token
    that greedy decoding never writes (always wrong); every step costs 1 + 0.3 k fake seconds."""
    k = 6

    def __init__(self, clock, text, prompt_len, wrong=None):
        self.clock, self.text, self.prompt_len, self.wrong = clock, text, prompt_len, wrong

    def propose(self, seq, room, sampling):
        k = min(self.k, room)
        self.clock.now += 1.0 + 0.3 * k
        done = len(seq) - self.prompt_len
        return Draft.chain([self.wrong] * k if self.wrong_at(done) else self.text[done:done + k])

    def wrong_at(self, done):
        """Whether the drafts after `done` new tokens are wrong."""
        return self.wrong is not None


@pytest.fixture(scope="module")
def model():
    return random_gpt(vocab_size=50, scale=3.0, seed=4, block_size=256)


def adaptive_run(model, right, kind=Scripted, n_new=200, sweep=None):
    """Greedy decoding with Adaptive around a `kind` drafter (a Scripted one) on the fake clock;
    right=False hands it a token that greedy decoding never writes. sweep: the deepest depth the
    first steps time (Adaptive's default: all)."""
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, n_new).tokens
    wrong = next(t for t in range(model.config.vocab_size) if t not in greedy)
    clock = FakeClock()
    drafter = Adaptive(kind(clock, greedy, len(prompt), None if right else wrong), sweep=sweep,
                       clock=clock)
    res = generate(model, prompt, n_new, drafter)
    assert res.tokens == greedy  # whatever it chose, the output is greedy decoding's
    return drafter, res


CATCH_UP = 0.1  # fake seconds a CatchingUp drafter takes per token it reads before it drafts


class CatchingUp(Scripted):
    """Scripted, with a cache of its own as the draft model and the [M] drafter have: before it
    drafts it reads every token accepted since it last drafted, CATCH_UP fake seconds each."""

    def start(self, prompt, cache):
        self.fed = len(prompt)

    def propose(self, seq, room, sampling):
        if min(self.k, room) > 0:
            self.clock.now += CATCH_UP * (len(seq) - self.fed)
            self.fed = len(seq)
        return super().propose(seq, room, sampling)


def test_a_cost_is_timed_where_the_drafter_has_nothing_to_catch_up_on(model):
    """Never right, so not drafting is the choice and depth 1 is drafted only to explore, after
    dozens of steps that drafted nothing: that step reads them all and is not timed; the same depth
    once more, which costs what a step drafting 1 deep every time costs (1.3 and one token read),
    is. Timing the first put depth 1 at several times that."""
    drafter, res = adaptive_run(model, right=False, kind=CatchingUp, n_new=400)
    assert drafter.chosen[1] >= 3, "explored too seldom to test"
    assert drafter.timed_at[1] > drafter.k + 2, "depth 1 not timed again after the first sweep"
    assert drafter.seconds()[1] == pytest.approx(1.3 + CATCH_UP)


def test_a_drafter_that_is_never_right_ends_up_taking_autoregressive_steps(model):
    drafter, res = adaptive_run(model, right=False)
    k = drafter.k
    assert res.stats.accepted == 0
    steps = sum(drafter.chosen)
    explored = steps // IDLE_EXPLORE + 1  # not drafting is the choice: it explores seldom
    assert drafter.chosen[2:] == [1] * (k - 1), "deeper than 1: only in the first sweep over depths"
    # depth 1: the sweep and each exploring step, every one of them twice (see the test above)
    assert drafter.chosen[1] <= 2 * explored + 2, "depth 1: only the sweep and the exploring steps"
    assert drafter.chosen[0] >= steps - 2 * explored - k - 1


class BusyAtFirst(Scripted):
    """Never right; drafting k deep costs 1 + 0.05 k, but the machine was busy for the sweep's
    first two timed steps (depths 0 and 1: half a second more each)."""

    def propose(self, seq, room, sampling):
        self.calls = getattr(self, "calls", 0) + 1
        k = min(self.k, room)
        self.clock.now += (0.5 if 2 <= self.calls <= 3 else 0.0) + 0.05 * k - 0.3 * k  # Scripted adds 1 + 0.3 k
        return super().propose(seq, room, sampling)


def test_a_cost_measured_while_the_machine_was_busy_is_measured_again(model):
    """After the sweep, not drafting looks dearer than drafting 2 deep, and exploring one deeper or
    shallower never reaches it: now and then an exploring step drafts nothing, and a cost forgets
    old timings by time, so the drafter goes back to autoregressive steps."""
    drafter, res = adaptive_run(model, right=False, kind=BusyAtFirst, n_new=250)
    assert res.stats.accepted == 0
    assert drafter.seconds()[0] == pytest.approx(1.0, abs=0.01)  # measured again; the busy timing forgotten
    late = [depth for _, _, depth in res.steps[-100:]]  # the last 100 steps' draft depths
    assert late.count(0) >= 95, drafter.chosen


class HalfTheTime(Scripted):
    """Always right when it drafts, but drafts on half of the steps only, at random (Lookahead
    with no n-gram for x_t), at the same cost."""

    def __init__(self, *args):
        super().__init__(*args)
        self.coin = random.Random(0)

    def propose(self, seq, room, sampling):
        draft = super().propose(seq, room, sampling)
        return draft if self.coin.random() < 0.5 else Draft.chain([])


def test_a_draft_asked_for_but_not_made_counts_as_not_accepted(model):
    """Drafting on half of the steps, k deep, gives 1 + k/2 tokens a step, not the 1 + k of the
    steps that drafted: the acceptance at depth 1 is 1/2."""
    drafter, res = adaptive_run(model, right=True, kind=HalfTheTime)
    expected = drafter.expected_tokens()
    assert expected[drafter.k] == pytest.approx(1 + drafter.k / 2, abs=1.0), expected  # counting drafts made: 1 + k
    assert res.stats.accepted > 0  # it did draft


class HalfAsDeep(Scripted):
    """Always right, but asked for k drafts it makes only the first half of them (rounded up)."""

    def propose(self, seq, room, sampling):
        draft = super().propose(seq, room, sampling)
        return Draft.chain(draft.tokens[:(len(draft.tokens) + 1) // 2].tolist())


def test_the_tokens_expected_of_the_chosen_depth_are_the_tokens_it_gives(model):
    """Drafts made short of the depth asked for: what auto expects of the depth it settles on is what
    the steps give (counting only the drafts made, it would expect 1 + k of k asked for)."""
    drafter, res = adaptive_run(model, right=True, kind=HalfAsDeep)
    settled = drafter.chosen.index(max(drafter.chosen))
    assert max(drafter.chosen) >= 0.7 * sum(drafter.chosen), drafter.chosen
    tau = res.stats.new_tokens / res.stats.target_forwards
    assert drafter.expected_tokens()[settled] == pytest.approx(tau, abs=0.5), (drafter.chosen, tau)


class WrongForAWhile(Scripted):
    """Scripted: right, but wrong while the text is between WRONG_FROM and WRONG_TO new tokens."""

    def wrong_at(self, done):
        return WRONG_FROM <= done < WRONG_TO


WRONG_FROM, WRONG_TO = 80, 140


def test_a_drafter_right_again_after_a_wrong_stretch_drafts_again_soon(model):
    """While the drafts are wrong not drafting pays, and a step that drafts nothing leaves the
    state "not after a fully accepted step", where not drafting still pays once they are right
    again. Drafting still pays after a fully accepted step, so it explores every EXPLORE-th step,
    not every IDLE_EXPLORE-th as a drafter that never pays does, and is soon drafting again."""
    drafter, res = adaptive_run(model, right=False, kind=WrongForAWhile, n_new=250)
    done, waited = 0, None
    for emitted, accepted, depth in res.steps:
        if done >= WRONG_TO and waited is None:
            waited = 0
        if waited is not None:
            if depth > 1:
                break
            waited += 1
        done += len(emitted)
    assert drafter.chosen[0] > 10, "not drafting was never chosen in the wrong stretch: nothing tested"
    assert waited is not None and waited <= EXPLORE + 2, f"{waited} steps before drafting deep again"


def test_a_drafter_that_is_always_right_drafts_as_deep_as_it_may(model):
    drafter, res = adaptive_run(model, right=True)
    k = drafter.k
    assert res.stats.accepted > 0
    # shallower than k: the first step, the sweep's k + 1 (depth 1 twice: first right after not
    # drafting, untimed) and the exploring steps
    assert drafter.chosen[k] >= sum(drafter.chosen) - (k + 2) - sum(drafter.chosen) // EXPLORE, "sweep and exploring"
    assert res.stats.tau > k - 0.25  # k drafts and the bonus on almost every step (the sweep drafts less)


def test_past_the_first_depths_it_drafts_deeper_one_depth_at_a_time_while_deeper_pays(model):
    """The first steps time depths 0..3 only; always right, the deepest of them is the best, so
    each deeper depth is drafted (and timed) in turn, up to k, where it then stays."""
    drafter, res = adaptive_run(model, right=True, sweep=3)
    k, steps = drafter.k, sum(drafter.chosen)
    assert k > 4
    assert all(drafter.chosen[depth] >= 1 for depth in range(4, k)), "a depth past the first ones was skipped"
    # shallower than k: the first step, the sweep's 3 + 1 (depth 1 twice), depths 4..k-1 once, exploring
    shallower = 1 + (3 + 2) + (k - 4)
    assert drafter.chosen[k] >= steps - shallower - steps // EXPLORE, "not as deep as it may"
    # each timed, and only by steps that drafted that deep (the end of the text cuts the last ones short)
    assert drafter.seconds()[4:] == pytest.approx([1.0 + 0.3 * depth for depth in range(4, k + 1)])


def test_a_drafter_that_is_never_right_never_drafts_past_the_first_depths(model):
    """Depth 3, the deepest of the first ones, is never the best: nothing deeper is drafted or timed."""
    drafter, res = adaptive_run(model, right=False, sweep=3)
    assert drafter.chosen[4:] == [0] * (drafter.k - 3)
    assert drafter.seconds()[4:] == [float("inf")] * (drafter.k - 3)  # never timed: never the best


def test_it_is_the_wrapped_drafter_for_what_it_does_not_change(model):
    drafter, _ = adaptive_run(model, right=True)
    assert drafter.prompt_len == 3 and drafter.text == drafter.drafter.text
    with pytest.raises(AttributeError):
        drafter.no_such_attribute


def test_the_costs_are_what_the_steps_took(model):
    drafter, _ = adaptive_run(model, right=False)
    seconds = drafter.seconds()
    assert seconds[0] == pytest.approx(1.0)  # the autoregressive steps' mean
    assert seconds[1:] == pytest.approx([1.0 + 0.3 * k for k in range(1, drafter.k + 1)])  # each depth's own


class Branching(Scripted):
    """A draft of two paths, like a small tree: the next tokens of `text` as a chain, and a wrong
    sibling of the first. Up to `wide` deep its chain is always right; deeper, as a deeper tree
    of the same size keeps fewer alternatives, its first token is wrong on 3 steps out of 4. The
    acceptance at a depth depends on k: only the tokens measured at each k tell what k gives."""
    wide = 2

    def propose(self, seq, room, sampling):
        k = min(self.k, room)
        self.clock.now += 1.0 + 0.3 * k
        self.steps = getattr(self, "steps", 0) + 1
        if k == 0:
            return Draft.chain([])
        done = len(seq) - self.prompt_len
        chain = list(self.text[done:done + k])
        if k > self.wide and self.steps % 4:
            chain[0] = self.wrong
        parents = list(range(k)) + [0]  # the chain 1..k, then node k + 1 under the root
        return Draft(torch.tensor(chain + [self.wrong]), torch.tensor(list(range(1, k + 1)) + [1]),
                     masks.tree(parents), [list(range(k + 1)), [0, k + 1]])


def test_a_branching_draft_is_judged_by_the_tokens_each_depth_gave(model):
    drafter, res = adaptive_run(model, right=False, kind=Branching)  # its chain is right up to `wide`
    steps = sum(drafter.chosen)
    # depth 2 gives 3 tokens for 1.6 s, depth 6 about 2.5 for 2.8 s; the product of the acceptance
    # per depth (1 at depth 1 from the shallow steps, 1 beyond it) would promise 7 at depth 6
    assert drafter.chosen[2] >= 0.6 * steps and sum(drafter.chosen[4:]) <= 0.2 * steps, drafter.chosen
