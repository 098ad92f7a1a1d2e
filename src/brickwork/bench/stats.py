"""Uncertainty of benchmark scores: bootstrap intervals and paired comparisons.

Every score the bench reports is a function of per-task means over test examples
(accuracy: the mean of 0/1 correctness; language modelling: the mean loss per held-out
sequence). :class:`Bootstrap` draws, once per run, ``n`` resamples of each task's test
examples (with replacement, within the task: Efron & Tibshirani 1993, ch. 6) and applies
the *same* resamples to every row, so that

* a row's 95 % interval is the 2.5 / 97.5 percentiles of its score over the resamples
  (:func:`interval`), and
* two rows are compared on the same resamples (a paired bootstrap, Koehn 2004): a row is
  ``better`` than another when the 95 % interval of the difference lies above 0, ``worse``
  when it lies below, ``tie`` otherwise (:func:`compare`).

Scores that divide by a reference row (normalized accuracy = accuracy / the fine-tune's
accuracy; the LM suite's share of the loss gain) are recomputed on each resample from the
resampled reference too, so the interval includes the reference's own noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Resamples per run. 1,000 puts the 2.5 / 97.5 percentiles within ~0.1 points of their
#: limit on the bench's test-set sizes, and costs milliseconds (one gather per task and row).
N_RESAMPLES = 1000
LEVEL = 0.95


class Bootstrap:
    """Fixed resamples of each task's test examples; ``sizes[task]`` examples per task."""

    def __init__(self, sizes: Mapping[str, int], *, n: int = N_RESAMPLES, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.sizes = dict(sizes)
        # one (n, size) index array per task, drawn in task order: seeded, reproducible
        self.indices = {t: rng.integers(0, k, size=(n, k)) for t, k in self.sizes.items()}

    def means(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per task, the mean of ``values[task]`` (one value per test example) on each
        resample: ``(n,)`` arrays."""
        out = {}
        for t, v in values.items():
            v = np.asarray(v, dtype=np.float64)
            if v.shape != (self.sizes[t],):
                raise ValueError(f"task '{t}': {v.shape[0]} values for {self.sizes[t]} examples")
            out[t] = v[self.indices[t]].mean(axis=1)
        return out


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of a score's bootstrap replicates."""
    lo, hi = np.percentile(
        np.asarray(replicates, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)]
    )
    return float(lo), float(hi)


def compare(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> str:
    """``better`` / ``worse`` / ``tie``: is row ``a`` above row ``b`` on the same resamples?"""
    lo, hi = interval(np.asarray(a) - np.asarray(b), level)
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "tie"


def average(per_task: Mapping[str, np.ndarray]) -> np.ndarray:
    """The unweighted mean over tasks of per-task replicate arrays (every task counts alike)."""
    return np.mean(np.stack(list(per_task.values())), axis=0)


def normalized_accuracy(
    row: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Mean over tasks of row accuracy / reference accuracy, per resample. A task whose
    reference accuracy is 0 on a resample is left out of that resample's mean (as the
    point estimate leaves out a task the reference gets all wrong); 0 if every task is."""
    ratios = []
    for t, acc in row.items():
        ref = reference[t]
        ratios.append(np.divide(acc, ref, out=np.full_like(acc, np.nan), where=ref > 0))
    stacked = np.stack(ratios)  # (tasks, resamples)
    counted = np.isfinite(stacked).sum(axis=0)
    total = np.nansum(stacked, axis=0)
    return np.divide(total, counted, out=np.zeros_like(total), where=counted > 0)


def loss_gain_kept(
    row: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    finetuned: Mapping[str, np.ndarray],
) -> np.ndarray:
    """Mean over domains of (L_base − L_row) / (L_base − L_finetune), per resample: the share
    of each fine-tune's loss gain that a merged model keeps (1 = all, 0 = none, < 0 worse
    than the base)."""
    kept = []
    for t, loss in row.items():
        gain = base[t] - finetuned[t]
        kept.append(np.divide(base[t] - loss, gain, out=np.zeros_like(loss), where=gain != 0))
    return np.mean(np.stack(kept), axis=0)


def across_seeds(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "per_seed"}`` of one score over seeds: the mean and the sample
    standard deviation (ddof 1) of the values that are not None (``std`` None for fewer
    than two, ``mean`` None for none), rounded to 4 decimals."""
    ok = [float(v) for v in values if v is not None]
    return {
        "mean": round(float(np.mean(ok)), 4) if ok else None,
        "std": round(float(np.std(ok, ddof=1)), 4) if len(ok) > 1 else None,
        "per_seed": [None if v is None else float(v) for v in values],
    }
