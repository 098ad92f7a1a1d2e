"""Bootstrap intervals and paired comparisons on cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from brickwork.bench import stats


def test_interval_of_a_mean_matches_the_normal_approximation():
    # 0/1 correctness with p = 0.7 on 2,000 examples: SE = sqrt(p(1-p)/n) = 0.01025,
    # so the 95 % interval is 0.7 ± 1.96 · 0.01025 = ±0.0201 (bootstrap within ~10 %)
    rng = np.random.default_rng(0)
    correct = (np.arange(2000) < 1400).astype(float)
    rng.shuffle(correct)
    b = stats.Bootstrap({"t": 2000}, n=2000, seed=1)
    lo, hi = stats.interval(b.means({"t": correct})["t"])
    assert lo < 0.7 < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.7 * 0.3 / 2000), rel=0.1)


def test_resamples_are_seeded_and_shared_by_every_row():
    b1 = stats.Bootstrap({"a": 50, "b": 80}, n=100, seed=3)
    b2 = stats.Bootstrap({"a": 50, "b": 80}, n=100, seed=3)
    assert all(np.array_equal(b1.indices[t], b2.indices[t]) for t in ("a", "b"))
    assert not np.array_equal(b1.indices["a"], stats.Bootstrap({"a": 50}, seed=4).indices["a"])
    with pytest.raises(ValueError, match="task 'a': 49 values for 50 examples"):
        b1.means({"a": np.zeros(49)})


def test_paired_comparison_sees_a_small_consistent_gain_that_unpaired_intervals_miss():
    # row b is row a with 30 of 1,000 wrong answers fixed (+3 points): the unpaired
    # intervals overlap, the paired difference is always > 0
    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.6).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:30]] = 1
    boot = stats.Bootstrap({"t": 1000}, seed=0)
    ra, rb = boot.means({"t": a})["t"], boot.means({"t": b})["t"]
    ahi, blo = stats.interval(ra)[1], stats.interval(rb)[0]
    assert blo < ahi  # overlapping intervals
    assert stats.compare(rb, ra) == "better" and stats.compare(ra, rb) == "worse"
    assert stats.compare(ra, ra) == "tie"


def test_normalized_accuracy_and_loss_gain_on_hand_values():
    row = {"x": np.array([0.4, 0.5, 0.1]), "y": np.array([0.9, 0.0, 0.2])}
    ref = {"x": np.array([0.8, 0.5, 0.0]), "y": np.array([0.9, 0.0, 0.0])}
    # x: 0.5, 1.0, -; y: 1.0, -, - (reference 0: left out of that resample); mean over tasks
    assert stats.normalized_accuracy(row, ref).tolist() == [0.75, 1.0, 0.0]
    base = {"d": np.array([3.0, 3.0])}
    ft = {"d": np.array([2.0, 3.0])}
    merged = {"d": np.array([2.5, 2.0])}
    assert stats.loss_gain_kept(merged, base, ft).tolist() == [0.5, 0.0]
    assert stats.average({"a": np.array([1.0, 0.0]), "b": np.array([0.0, 0.0])}).tolist() == [
        0.5,
        0.0,
    ]
