"""The benchmark's spread helper (ki_bench.timing): paired rounds, the median's interval, the stopping rule.

Costs here are given numbers, not timings, so every assertion is exact."""

from __future__ import annotations

import itertools

import pytest

from ki_bench.timing import Pair, RepeatPolicy, Spread, median_interval, paired_rounds


def _costs(values):
    it = iter(values)
    return lambda: next(it)


def test_median_interval_uses_order_statistics_with_95_percent_coverage():
    # n = 20: the classical ranks 6 and 15 (coverage 95.9 %); below 6 rounds: min and max.
    assert median_interval([float(i) for i in range(1, 21)]) == (6.0, 15.0)
    assert median_interval([1.0, 2.0, 3.0]) == (1.0, 3.0)
    assert median_interval([float(i) for i in range(1, 7)]) == (1.0, 6.0)


def test_a_figure_is_the_median_of_paired_ratios_not_the_ratio_of_medians():
    # Round costs a = 2, 4, 6 and b = 1, 4, 6 (after one first, uncounted call each): ratios 2, 1, 1, median 1.
    run = paired_rounds({"a": _costs([0, 2, 4, 6]), "b": _costs([0, 1, 4, 6])}, {"r": Pair("a", "b")},
                        RepeatPolicy(min_repeats=3, max_repeats=3))
    sp = run.spreads["r"]
    assert sp.ratios == (1.0, 1.0, 2.0) and sp.median == 1.0 and sp.n == 3
    assert run.first == {"a": 0, "b": 0} and run.costs == {"a": [2, 4, 6], "b": [1, 4, 6]}


def test_rounds_stop_once_the_interval_clears_the_goal():
    # Ratios 2.0 every round, goal 1.25: settled after the minimum rounds.
    run = paired_rounds({"a": itertools.repeat(2.0).__next__, "b": itertools.repeat(1.0).__next__},
                        {"r": Pair("a", "b", goal=1.25)}, RepeatPolicy(min_repeats=4, max_repeats=20))
    assert run.spreads["r"].n == 4 and run.spreads["r"].settled and run.spreads["r"].stop == "settled"


def test_rounds_stop_at_the_cap_and_say_so_when_the_goal_stays_inside_the_interval():
    # Ratios alternate 1.0 and 1.5 around the goal 1.25: never settled.
    ratios = itertools.cycle([1.0, 1.5])
    run = paired_rounds({"a": lambda: next(ratios), "b": itertools.repeat(1.0).__next__},
                        {"r": Pair("a", "b", goal=1.25)}, RepeatPolicy(min_repeats=3, max_repeats=9))
    sp = run.spreads["r"]
    assert sp.n == 9 and not sp.settled and sp.stop == "max_repeats"
    assert sp.ci_low <= 1.25 <= sp.ci_high and sp.q1 == 1.0 and sp.q3 == 1.5


def test_the_order_within_a_round_alternates():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or 1.0) for name in ("a", "b")}
    paired_rounds(fns, {"r": Pair("a", "b")}, RepeatPolicy(min_repeats=3, max_repeats=3))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # first calls, then a b | b a | a b


def test_a_clamped_extra_cost_is_never_below_its_floor():
    # K=4 / K=1 step ratios, some below 1 (noise): the extra cost per sample maps each round and clamps at 0.
    sp = Spread.of([0.97, 0.99, 1.02, 1.06, 1.09], goal=None, rel_tol=0.05)
    extra = sp.map(lambda r: max(0.0, (r - 1.0) / 3))
    assert extra.ratios[:2] == (0.0, 0.0) and min(extra.ratios) == 0.0
    assert extra.median == pytest.approx(0.02 / 3) and extra.q1 == 0.0 and extra.ci_low == 0.0
