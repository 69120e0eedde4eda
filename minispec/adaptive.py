"""Adaptive draft length: before every step, choose how deep to draft from what earlier steps measured.

A fixed k is a guess made before decoding. Too short, and a drafter that is usually right leaves
tokens on the table; too long, and every step pays for drafts that are rejected: drafting them
and verifying a block of k + 1 tokens. `Adaptive` wraps any drafter and, before each step,
picks the draft depth k in 0..k_max (0 is a plain autoregressive step) that maximises the
expected new tokens per second:

    E[tokens | k] = 1 + a_1 + a_1 a_2 + ... + a_1 a_2 ... a_k        (the bonus token, then the drafts)
    seconds(k)    = the mean wall time of earlier steps that drafted k deep (drafting + verifying + the loop)
    k*            = argmax_k  E[tokens | k] / seconds(k)

a_i is how often the i-th draft was accepted when the drafts before it were, as the loop's
`accept_at` counts it, except that a draft asked for but not made counts as one not accepted: it
gains nothing (Lookahead with no n-gram for x_t, a blockwise tree shallower than k, or a drafter
that stops early draft fewer than k). The cost is measured per k, not fitted: it is not a
straight line. Drafting has a fixed cost that the first draft pays in full (the heads' or the
drafter's forward, whatever k is), and Lookahead's window only fits in the block at its full
depth. Each estimate is a weighted average that forgets its old observations, so the choice
follows the text and the machine: an acceptance by DECAY per new observation of it, a cost by
DECAY per step timed since it was last measured (a machine's speed drifts in time, and a depth
seldom drafted must not keep a timing from long ago at full weight). The acceptance a_i is also
kept apart for steps after a fully accepted draft and for the others, because a drafter that was
just right all the way (a greedy loop, a copied line) is likely to be right again; where one of
the two has seen little, it leans on both together (a prior worth PRIOR tries). The first step
of every prompt is left out of the costs: it pays for warming up (a drafter's first forward over
the prompt).

That product assumes the i-th draft is accepted as often whatever k is, which holds for a chain
drafted token by token (a deeper chain only adds drafts after the same ones), nearly so for the
[M] drafter (its [M]s see each other), and not for a drafter whose draft has several paths:
blockwise's best tree of 8 nodes k deep is wide when k is small and nearly a chain when k is
large, so its first draft is accepted less often at large k. For such drafters
E[tokens | k] is ALSO measured directly, as the mean tokens of earlier steps that drafted k deep
(in the same state), shrunk toward the product above (worth PRIOR steps).

Lossless by construction: k is chosen from earlier steps only, never from the target's outputs
for this step, and for ANY k the step is an exact speculative step. So greedy output stays
token-identical and sampling keeps the target's distribution, whatever k is chosen when.

Measuring costs a little: the first timed steps draft at depths 0, 1, ..., `sweep` once each (so
that every depth up to it has a cost; `sweep` defaults to k_max). A depth past `sweep` is first
drafted when the deepest depth timed so far is the best: that step drafts one deeper, and so on
while deeper pays, so a drafter that is right for long stretches may draft to k_max, while one
for which depth `sweep` is never the best never pays for timing depths it will not choose. Then
every EXPLORE-th step drafts one token deeper than the choice, or one shallower (in turn), so
that depths not chosen lately are still measured; every TO_ZERO-th shallower one drafts nothing
at all. A cost is only measured again when its depth is drafted, so without that a too-high
timing of the autoregressive step (a noisy first measurement, the machine busy for a moment)
would keep a drafter that never pays from ever going back to it. While the choice is 0 (no depth
pays) only every IDLE_EXPLORE-th step drafts: such a draft costs a whole step's extra work and
is seldom right. Between those steps the choice is not worked out again: nothing was drafted, so
only the cost of not drafting has moved (a change of choice that alone would bring waits for the
next exploring step). That holds only while drafting pays in neither state: where it pays after
a fully accepted step (blockwise heads in a loop), the choice is worked out on every step and
exploring stays at every EXPLORE-th step, so that a loop coming back is found soon. A step that
drafts nothing leaves the state as it was: it says nothing of the drafter. A drafter that is
never right ends up taking autoregressive steps, and pays only for those exploring steps. k = 0
calls the drafter's propose with room 0, which every drafter answers at once with an empty
draft.

A step is timed only where its cost is what drafting k deep on every step would cost. A drafter
with a cache of its own (the draft model, the [M] drafter) reads the tokens accepted since it
last drafted before it drafts: after a run of steps that drafted nothing, that is every one of
them, a one-off cost a drafter drafting every step never pays. Timed, it made every depth look
dearer than it is, and not drafting, once chosen, kept itself chosen. So a step that drafts
right after one that did not is not timed, and when the choice is then not to draft, its depth
is drafted once more, and that step is timed. So an exploring step while not drafting is chosen
drafts twice in a row, for every drafter: the wrapper cannot tell which ones catch up. A step
whose draft the end of the text cut short is not timed either: it cost less than k's.
"""

import time

from .speculative import Drafter

DECAY = 0.98  # an acceptance's per new observation of it, a cost's per step timed: 50 of them make a third
EXPLORE = 16  # every EXPLORE-th step drafts one token deeper or shallower than the choice ...
IDLE_EXPLORE = 64  # ... every IDLE_EXPLORE-th step while the choice is not to draft
TO_ZERO = 4  # every TO_ZERO-th shallower exploring step drafts nothing at all
PRIOR = 2.0  # how many tries the prior on a depth's acceptance is worth


class Adaptive(Drafter):
    """`drafter` with its draft depth chosen before every step, up to k_max (default drafter.k).
    sweep: the first steps time depths 0..sweep (default k_max); a deeper one is timed, one at a
    time, when the deepest timed is the best. clock: the timer (tests give a fake one, so that
    the choices are reproducible)."""

    def __init__(self, drafter, k_max=None, sweep=None, clock=time.perf_counter):
        self.drafter, self.clock = drafter, clock
        self.k = drafter.k if k_max is None else k_max
        self.sweep = self.k if sweep is None else min(sweep, self.k)  # the deepest depth the first steps time
        # per depth, decayed counts of drafts tried and accepted, after a step that was not (0)
        # or was (1) accepted in full
        self.tried = [[0.0] * self.k for _ in range(2)]
        self.accepted = [[0.0] * self.k for _ in range(2)]
        self.weight = [0.0] * (self.k + 1)  # per depth: decayed count of the steps timed ...
        self.spent = [0.0] * (self.k + 1)  # ... and of the seconds they took
        self.timed_at = [0] * (self.k + 1)  # ... as of which timed step
        self.timed, self.steps, self.hot = 0, 0, 0  # steps timed, steps seen, the state after the last one
        self.chosen = [0] * (self.k + 1)  # how often each depth was chosen, for reports
        self.shallower = 0  # exploring steps that drafted shallower than the choice
        # per state and depth, for drafts of several paths: decayed count of the steps and of their tokens
        self.stepped = [[0.0] * (self.k + 1) for _ in range(2)]
        self.made = [[0.0] * (self.k + 1) for _ in range(2)]
        self.branching = False  # whether a draft has had several paths
        self.idle = False  # whether, at the last choice worked out, drafting paid in neither state
        self.depth = 0  # the depth of the last step
        self.kept_up = True  # whether the drafter drafted on the last step (or read the prompt)
        self.retime = 0  # a depth drafted untimed on the last step, to draft and time again

    def __getattr__(self, name):
        """What Adaptive does not have is the wrapped drafter's (reports read e.g. its `drafting`)."""
        if name == "drafter":  # not set yet: no drafter to ask
            raise AttributeError(name)
        return getattr(self.drafter, name)

    def start(self, prompt, cache):
        self.hot, self.first = 0, True  # the previous prompt's last step says nothing about this one
        self.kept_up, self.retime = True, 0  # the drafter's start reads the prompt
        self.drafter.start(prompt, cache)

    def expected_tokens(self, hot=None):
        """[E[new tokens] of a step drafting k deep for k = 0..k_max], from the acceptance measured
        so far in state `hot` (default: the current one), shrunk toward both states' together, and
        those toward the depth above (1/2 at depth 1): a depth seldom drafted is expected to do as
        well as the one above it. For drafts of several paths, the tokens measured at each k, shrunk
        toward that."""
        hot = self.hot if hot is None else hot
        expected, run, pooled = [1.0], 1.0, 0.5
        for i in range(self.k):
            both = (self.accepted[0][i] + self.accepted[1][i] + PRIOR * pooled) / (
                self.tried[0][i] + self.tried[1][i] + PRIOR)
            rate = (self.accepted[hot][i] + PRIOR * both) / (self.tried[hot][i] + PRIOR)
            pooled = both
            run *= rate
            expected.append(expected[-1] + run)
        if self.branching:
            made, stepped = self.made[hot], self.stepped[hot]
            return [(made[k] + PRIOR * e) / (stepped[k] + PRIOR) for k, e in enumerate(expected)]
        return expected

    def seconds(self):
        """[the expected wall time of a step drafting k deep for k = 0..k_max]: the mean of the
        steps timed at k; infinite for a depth never timed (past `sweep`), which is never best.
        choose asks only after the first sweep, which times every depth up to `sweep`."""
        return [spent / weight if weight else float("inf") for spent, weight in zip(self.spent, self.weight)]

    def best(self, hot=None):
        """The depth with the most expected tokens per second, in state `hot` (default: the current one)."""
        speed = [tokens / seconds for tokens, seconds in zip(self.expected_tokens(hot), self.seconds())]
        return speed.index(max(speed))

    def choose(self):
        if self.timed <= self.sweep:  # the first timed steps: every depth up to `sweep` once
            return self.timed
        if self.idle and self.depth == 0 and self.steps % IDLE_EXPLORE:
            return 0  # nothing drafted since not drafting was chosen: only its own cost has moved (see above)
        best = self.best()
        self.idle = best == 0 and self.best(1 - self.hot) == 0  # in neither state does drafting pay
        if best == 0 and self.retime:
            return self.retime  # the last step drafted after steps that did not, untimed: time its depth
        if best < self.k and not self.weight[best + 1]:
            return best + 1  # the deepest depth timed is the best: time the next one (see above)
        every = IDLE_EXPLORE if self.idle else EXPLORE
        if self.steps % every:
            return best
        if best == 0 or (best < self.k and self.steps // every % 2):  # deeper and shallower in turn
            return best + 1
        self.shallower += 1
        return 0 if self.shallower % TO_ZERO == 0 else best - 1  # now and then not drafting at all (see above)

    def propose(self, seq, room, sampling):
        self.began = self.clock()
        self.depth = self.choose()
        self.chosen[self.depth] += 1
        draft = self.drafter.propose(seq, min(room, self.depth), sampling)
        self.drafted = max((len(path) - 1 for path in draft.paths), default=0)
        self.branching |= len(draft.paths) > 1
        self.asked = min(room, self.depth)  # less than the depth where the end of the text limits the draft
        return draft

    def verify(self, model, idx, pos, mask, cache, slots):
        return self.drafter.verify(model, idx, pos, mask, cache, slots)

    def observe(self, step):
        self.drafter.observe(step)
        seconds, k = self.clock() - self.began, self.depth
        steady = self.kept_up or k == 0  # nothing to catch up on: the step's time is k's cost
        self.retime = 0 if steady or self.first else k
        self.kept_up = self.asked > 0
        if steady and not self.first and self.asked == k:  # a draft the end of the text cut short costs less
            self.timed += 1
            forget = DECAY ** (self.timed - self.timed_at[k])  # a cost forgets by time: the machine drifts
            self.weight[k] = forget * self.weight[k] + 1.0
            self.spent[k] = forget * self.spent[k] + seconds
            self.timed_at[k] = self.timed
        accepted = min(len(step.path) - 1, self.drafted)
        if self.asked == k:  # a draft the end of the text cut short says nothing of what k gives
            self.stepped[self.hot][k] = DECAY * self.stepped[self.hot][k] + 1
            self.made[self.hot][k] = DECAY * self.made[self.hot][k] + len(step.emitted)
        tried, hits = self.tried[self.hot], self.accepted[self.hot]
        for i in range(min(accepted + 1, self.asked)):  # every accepted depth, and the first rejected or not made
            tried[i] = DECAY * tried[i] + 1
            hits[i] = DECAY * hits[i] + (i < accepted)
        if self.drafted:  # a step that drafted nothing says nothing of the drafter: the state stays
            self.hot = int(accepted == self.drafted)  # every draft made was right (even if few)
        self.first = False
        self.steps += 1
