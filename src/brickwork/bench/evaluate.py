"""Evaluation of encoders + task heads, and hyperparameter selection on validation data.

:func:`select_hyperparameters` is given a scoring function bound to the *validation*
split and nothing else, so it cannot read test data; the runner evaluates the test split
once, afterwards, with the chosen hyperparameters only, and keeps the per-example
correctness (:meth:`Evaluator.correct`) from which its bootstrap intervals are drawn.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .suites import Suite, Task
from .train import Trainer, features

#: At most this many hyperparameter combinations are tried per method.
MAX_COMBOS = 6


class Evaluator:
    """Accuracy of encoder states with task heads, on one split. Keeps one encoder module
    and loads each state into it, so evaluating many merges allocates nothing new."""

    def __init__(self, suite: Suite, trainer: Trainer) -> None:
        self.suite, self.trainer = suite, trainer
        self._enc = suite.new_encoder()
        self.calls: list[tuple[str, tuple[str, ...]]] = []  # (split, tasks): for audits/tests

    def _load(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        self._enc.load_state_dict(dict(state))
        return self._enc

    def logits(
        self, state: Mapping[str, torch.Tensor], head: nn.Linear, task: Task, split: str
    ) -> torch.Tensor:
        x = features(self.suite, self._load(state), self.trainer.prepared(task, split))
        with torch.no_grad():
            return head(x)  # (examples, classes)

    def correct(
        self,
        state: Mapping[str, torch.Tensor],
        heads: Mapping[str, nn.Linear],
        tasks: Sequence[Task],
        split: str,
    ) -> dict[str, np.ndarray]:
        """Per task, whether ``state`` with ``heads[task]`` gets each example of ``split``
        right: a ``(examples,)`` bool array in the split's order."""
        self.calls.append((split, tuple(t.name for t in tasks)))
        enc = self._load(state)
        out: dict[str, np.ndarray] = {}
        for t in tasks:
            x = features(self.suite, enc, self.trainer.prepared(t, split))
            with torch.no_grad():
                pred = heads[t.name](x).argmax(1)
            out[t.name] = hits(pred, t, split)
        return out

    def accuracy(
        self,
        state: Mapping[str, torch.Tensor],
        heads: Mapping[str, nn.Linear],
        tasks: Sequence[Task],
        split: str,
    ) -> dict[str, float]:
        """Per-task accuracy of one encoder ``state`` with ``heads[task]``."""
        return accuracies(self.correct(state, heads, tasks, split))

    def ensemble_correct(
        self,
        states: Sequence[Mapping[str, torch.Tensor]],
        heads: Mapping[str, nn.Linear],
        tasks: Sequence[Task],
        split: str,
    ) -> dict[str, np.ndarray]:
        """Given the task, average the class probabilities of ``heads[task]`` on every
        encoder in ``states`` (the fine-tunes) and take the argmax; per-example correctness."""
        self.calls.append((split, tuple(t.name for t in tasks)))
        probs = {t.name: torch.zeros(len(t.splits[split]), len(t.classes)) for t in tasks}
        for state in states:
            enc = self._load(state)
            for t in tasks:
                x = features(self.suite, enc, self.trainer.prepared(t, split))
                with torch.no_grad():
                    probs[t.name] += heads[t.name](x).softmax(-1) / len(states)
        return {t.name: hits(probs[t.name].argmax(1), t, split) for t in tasks}

    def ensemble_accuracy(
        self,
        states: Sequence[Mapping[str, torch.Tensor]],
        heads: Mapping[str, nn.Linear],
        tasks: Sequence[Task],
        split: str,
    ) -> dict[str, float]:
        return accuracies(self.ensemble_correct(states, heads, tasks, split))


def hits(pred: torch.Tensor, task: Task, split: str) -> np.ndarray:
    """``pred == label`` per example of ``task``'s ``split``: ``(examples,)`` bool."""
    y = torch.tensor(task.splits[split].labels, dtype=torch.long)
    return (pred == y).numpy().astype(bool)


def accuracies(correct: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-task accuracy (NaN for an empty split) of per-example correctness."""
    return {t: float(np.mean(c)) if len(c) else float("nan") for t, c in correct.items()}


def to_bits(correct: np.ndarray) -> str:
    """Per-example correctness as a string of ``0`` / ``1`` (how rows store it in JSON)."""
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool))


def from_bits(bits: str) -> np.ndarray:
    """The ``(examples,)`` bool array of :func:`to_bits`."""
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) == ord("1")


def grid(space: Mapping[str, Sequence[Any]], *, cap: int = MAX_COMBOS) -> list[dict[str, Any]]:
    """The cartesian product of ``space`` (``[{}]`` when empty); when it has more than
    ``cap`` combinations, ``cap`` of them evenly spaced in product order."""
    keys = list(space)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(space[k] for k in keys))]
    if len(combos) <= cap:
        return combos
    if cap <= 1:
        return combos[:1]
    return [combos[round(i * (len(combos) - 1) / (cap - 1))] for i in range(cap)]


@dataclass
class Selection:
    params: dict[str, Any] | None  # None: every combination failed
    val_avg: float
    tried: list[dict[str, Any]] = field(default_factory=list)  # {"params", "val_avg" | "error"}
    state: dict[str, torch.Tensor] | None = None  # the chosen merge
    error: str | None = None


def select_hyperparameters(
    combos: Sequence[dict[str, Any]],
    merge: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    score_val: Callable[[dict[str, torch.Tensor]], Mapping[str, float]],
    *,
    errors: tuple[type[BaseException], ...] = (),
) -> Selection:
    """Merge with each combination, score it with ``score_val`` (validation accuracy per
    task) and keep the best average; the first best wins ties. Exceptions in ``errors``
    mark a combination as failed; when all fail, ``params`` is None and ``error`` says why."""
    best = Selection(params=None, val_avg=float("-inf"))
    for params in combos:
        try:
            state = merge(params)
        except errors as e:
            best.tried.append({"params": params, "error": str(e)})
            best.error = best.error or str(e)
            continue
        scores = score_val(state)
        avg = sum(scores.values()) / len(scores)
        best.tried.append({"params": params, "val_avg": round(avg, 6)})
        if avg > best.val_avg:
            best.params, best.val_avg, best.state = dict(params), avg, state
    return best
