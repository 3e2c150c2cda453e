"""Which windows an evaluation reads (raygpt.training.evaluation); the evaluation's results in a
run are tested with the loop (test_loop.py)."""

import pytest

from raygpt.training.evaluation import spread_windows


@pytest.mark.parametrize("n, count", [(10, 3), (1000, 7), (1944, 512), (5, 5), (5, 50), (2, 2), (100, 99)])
def test_spread_windows_are_evenly_spaced_over_the_whole_split(n, count):
    picked = spread_windows(n, count)
    assert picked == spread_windows(n, count)  # a pure function: the same at every eval, on every rank
    assert len(picked) == min(n, count) and len(set(picked)) == len(picked) and picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] == n - 1  # the beginning and the end of the split
    gaps = [b - a for a, b in zip(picked, picked[1:])]
    assert max(gaps) - min(gaps) <= 1
    assert spread_windows(n, 10**9) == list(range(n))  # capped: the whole split


def test_spread_windows_edge_cases():
    assert spread_windows(7, 1) == [0] and spread_windows(0, 5) == [] and spread_windows(1, 3) == [0]
