"""Ask / tell optimisers over ``[0, 1]^d`` (higher scores are better).

``cma``: CMA-ES (Hansen & Ostermeier 2001, "Completely derandomized self-adaptation in
evolution strategies"; the ``cma`` package, box-bounded), mergekit-evolve's default.
``random``: uniform points, the baseline. ``tpe``: Optuna's tree-structured Parzen
estimator (Bergstra et al. 2011, "Algorithms for hyper-parameter optimization").

Each proposes one *batch* at a time and is told the whole batch's scores. Everything is
seeded, so the same sequence of asks and tells gives the same points: a resumed search
replays the logged batches through a fresh optimiser (no pickled state is ever read) and
then goes on exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import OptimizerSpec

#: Score told for a candidate that failed (a crash that exhausted its retries).
FAILED = -1e9


class Optimizer:
    name = ""

    def __init__(self, dims: int, x0: Sequence[float], spec: OptimizerSpec) -> None:
        self.dims, self.x0, self.spec = dims, list(x0), spec
        self.batch = spec.batch or self.default_batch()
        self.told = 0

    def default_batch(self) -> int:
        return 8

    def ask(self) -> list[list[float]]:
        raise NotImplementedError

    def tell(self, xs: Sequence[Sequence[float]], scores: Sequence[float]) -> None:
        self.told += len(xs)

    def state(self) -> dict[str, Any]:
        """A summary of the optimiser's state (written to ``optimizer.json``)."""
        return {"name": self.name, "batch": self.batch, "told": self.told}


def _clean(scores: Sequence[float | None]) -> list[float]:
    return [FAILED if s is None or not math.isfinite(s) else float(s) for s in scores]


class CMA(Optimizer):
    name = "cma"

    def __init__(self, dims: int, x0: Sequence[float], spec: OptimizerSpec) -> None:
        super().__init__(dims, x0, spec)
        import cma

        opts = {
            "bounds": [0.0, 1.0],
            "popsize": self.batch,
            "seed": spec.seed + 1,  # cma reads seed 0 as "from the clock"
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        self.es = cma.CMAEvolutionStrategy(list(x0), spec.sigma0, opts)

    def default_batch(self) -> int:
        return 4 + int(3 * math.log(max(1, self.dims)))

    def ask(self) -> list[list[float]]:
        return [[float(v) for v in x] for x in self.es.ask()]

    def tell(self, xs: Sequence[Sequence[float]], scores: Sequence[float]) -> None:
        super().tell(xs, scores)
        if len(xs) == self.batch:  # CMA-ES learns from whole generations only
            self.es.tell([np.asarray(x) for x in xs], [-s for s in _clean(scores)])

    def state(self) -> dict[str, Any]:
        return {**super().state(), "generation": int(self.es.countiter),
                "sigma": float(self.es.sigma),
                "mean": [round(float(v), 6) for v in self.es.mean]}  # fmt: skip


class Random(Optimizer):
    name = "random"

    def __init__(self, dims: int, x0: Sequence[float], spec: OptimizerSpec) -> None:
        super().__init__(dims, x0, spec)
        self.rng = np.random.default_rng(spec.seed)
        self.first = True

    def ask(self) -> list[list[float]]:
        pts = [[float(v) for v in self.rng.random(self.dims)] for _ in range(self.batch)]
        if self.first:  # the starting point is the first candidate, as for CMA-ES's mean
            pts[0] = list(self.x0)
            self.first = False
        return pts


class TPE(Optimizer):
    name = "tpe"

    def __init__(self, dims: int, x0: Sequence[float], spec: OptimizerSpec) -> None:
        super().__init__(dims, x0, spec)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=spec.seed, constant_liar=True)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.study.enqueue_trial({f"x{i}": v for i, v in enumerate(self.x0)})
        self._open: list[Any] = []

    def default_batch(self) -> int:
        return 4

    def ask(self) -> list[list[float]]:
        self._open = [self.study.ask() for _ in range(self.batch)]
        return [[t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(self.dims)] for t in self._open]

    def tell(self, xs: Sequence[Sequence[float]], scores: Sequence[float]) -> None:
        super().tell(xs, scores)
        for t, s in zip(self._open[: len(xs)], _clean(scores)):
            self.study.tell(t, s)
        self._open = []


OPTIMIZERS: dict[str, type[Optimizer]] = {"cma": CMA, "random": Random, "tpe": TPE}


def make_optimizer(spec: OptimizerSpec, dims: int, x0: Sequence[float]) -> Optimizer:
    return OPTIMIZERS[spec.name](dims, x0, spec)
