"""The genome: which numbers a search varies, and the merge recipe each point stands for.

A point is a vector ``x`` in ``[0, 1]^d``; gene ``i`` maps it onto its parameter's bounds,
``lo + x_i (hi - lo)``. Genes exist per group of ``layer_granularity`` layers, per model
(for per-model parameters such as ``weight`` and ``density``; once per group for global
ones such as ``lambda``) and per tensor-name filter (mergekit-evolve's ``filters``: one set
for each filter, then one for every other tensor). The layout follows mergekit-evolve's
genotype (Goddard et al.; Akiba et al. 2024, "Evolutionary Optimization of Model Merging
Recipes", arXiv:2403.13187, parameter space), with any registered tensor-level method.

:meth:`Genome.recipe` turns a point into an ordinary brickwork recipe (a dict) of the
``models:`` form: with one group its parameters are scalars; with several, each is a
gradient with one point per layer index (constant within a group, so exact at each layer)
or, with ``smooth: true``, one point per group (interpolated between groups, as
mergekit-evolve's ``smooth``). Groups are formed over the layers the checkpoint holds (a
model of BERT's layers 4-5 has two), and tensors outside the layers take the first
(embeddings) or last (head, final norm) layer's values, as gradients do. ``brickwork
merge`` of that recipe is the candidate that was scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError
from ..merge.registry import MergeMethod, get_method
from .config import GenomeSpec

#: mergekit-evolve's searched parameters for its five methods (used when `parameters:` is absent).
MERGEKIT_PARAMETERS: dict[str, list[str]] = {
    "linear": ["weight"],
    "task_arithmetic": ["weight"],
    "ties": ["weight", "density"],
    "dare_ties": ["weight", "density"],
    "slerp": ["t"],
}

#: Default bounds of well-known parameters (``weight`` becomes [-1, 1] with
#: ``allow_negative_weights``); others come from the method's search space.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.05, 1.0),
    "t": (0.0, 1.0),
    "lambda": (0.0, 2.0),
    "epsilon": (0.0, 1.0),
    "gamma": (0.0, 1.0),
}


@dataclass(frozen=True)
class Gene:
    param: str
    group: int  # layer group
    model: int | None  # index into the genome's models; None for a global parameter
    filter: str | None  # tensor-name filter of this parameter set; None: every other tensor
    lo: float
    hi: float

    def value(self, x: float) -> float:
        return round(self.lo + min(1.0, max(0.0, float(x))) * (self.hi - self.lo), 6)

    def unit(self, value: float) -> float:
        return (value - self.lo) / (self.hi - self.lo)

    def label(self, model_names: list[str]) -> str:
        who = "" if self.model is None else f"{model_names[self.model]}."
        where = "" if self.filter is None else f"[{self.filter}]"
        return f"g{self.group}.{who}{self.param}{where}"


class Genome:
    """The genes of ``spec`` for a model of ``n_layers`` layers; every problem with the
    spec (unknown method or parameter, a data-aware method, reversed bounds, a granularity
    that does not divide the layers) is a :class:`RecipeError` that names it."""

    def __init__(self, spec: GenomeSpec, n_layers: int, layers: list[int] | None = None) -> None:
        self.spec = spec
        self.method: MergeMethod = get_method(spec.merge_method)
        m = self.method
        if m.needs_data:
            raise RecipeError(
                f"genome.merge_method '{m.name}' needs calibration data (statistics or "
                "modules); a search merges every candidate without data. Choose a data-free "
                "method (task_arithmetic, ties, dare_ties, ...)."
            )
        if m.needs_base and spec.base_model is None:
            raise RecipeError(f"genome.merge_method '{m.name}' needs genome.base_model: PATH")
        g = spec.layer_granularity
        self.layers = sorted(layers) if layers is not None else list(range(n_layers))
        k = len(self.layers)
        if g > 0 and (k == 0 or k % g):
            raise RecipeError(
                f"genome.layer_granularity = {g} does not divide the models' {k} layers; "
                f"choose a divisor of {k} (or 0 for one group)"
            )
        self.n_layers = max(n_layers, self.layers[-1] + 1 if self.layers else 0)
        self.n_groups = k // g if g > 0 else 1
        # the group of every layer index 0..n_layers-1 (absent layers: the nearest below, or 0)
        group_of, current = [], 0
        for i in range(self.n_layers):
            if i in self.layers:
                current = self.layers.index(i) // g if g > 0 else 0
            group_of.append(current)
        self.group_of = group_of
        self.models = list(spec.models)
        known = {p.name: p for p in m.params}
        names = spec.parameters
        if names is None:
            if m.name not in MERGEKIT_PARAMETERS:
                raise RecipeError(
                    f"genome.parameters: say which parameters of '{m.name}' to search "
                    f"(its parameters: {', '.join(known) or 'none'})"
                )
            names = MERGEKIT_PARAMETERS[m.name]
        if not names:
            raise RecipeError("genome.parameters is empty: list at least one parameter to search")
        for n in [*names, *spec.fixed, *spec.bounds, *spec.initial]:
            if n not in known:
                raise RecipeError(
                    f"method '{m.name}' has no parameter '{n}'; its parameters: "
                    f"{', '.join(known) or 'none'}"
                )
        for n, v in spec.fixed.items():
            known[n].validate(v, where=f"genome.fixed.{n}")
        self.fixed: dict[str, Any] = dict(spec.fixed)
        if spec.normalize is not None:
            if "normalize" not in known:
                raise RecipeError(
                    f"genome.normalize: method '{m.name}' has no 'normalize' parameter; drop it"
                )
            self.fixed.setdefault("normalize", spec.normalize)
        elif "normalize" in known and m.name in ("ties", "dare_ties", "linear"):
            self.fixed.setdefault("normalize", True)  # mergekit-evolve's default
        self.names = list(names)
        self.bounds = {n: self._bounds(n, known[n]) for n in self.names}
        sets: list[str | None] = [*(spec.filters or []), None]
        genes = []
        for group in range(self.n_groups):
            for n in self.names:
                lo, hi = self.bounds[n]
                owners = range(len(self.models)) if known[n].per_model else [None]
                for model in owners:
                    for f in sets:
                        genes.append(Gene(n, group, model, f, lo, hi))
        self.genes = genes
        self.per_model = {n: known[n].per_model for n in self.names}

    def _bounds(self, name: str, spec: Any) -> tuple[float, float]:
        if name in self.spec.bounds:
            lo, hi = self.spec.bounds[name]
        elif name == "weight" and self.spec.allow_negative_weights:
            lo, hi = -1.0, 1.0
        elif name in DEFAULT_BOUNDS:
            lo, hi = DEFAULT_BOUNDS[name]
        else:
            grid = [v for v in self.method.search_space.get(name, []) if _number(v)]
            if len(grid) < 2 or min(grid) == max(grid):
                raise RecipeError(
                    f"genome.bounds.{name}: no default range for '{name}' of "
                    f"'{self.method.name}'; give one, e.g. bounds: {{{name}: [LOW, HIGH]}}"
                )
            lo, hi = float(min(grid)), float(max(grid))
        for v in (lo, hi):
            try:
                spec.validate(v, where=f"genome.bounds.{name}")
            except RecipeError as e:
                raise RecipeError(
                    f"genome.bounds.{name} = [{lo}, {hi}]: {v} is not a valid value ({e}); "
                    "narrow the bounds"
                ) from None
        return float(lo), float(hi)

    @property
    def dims(self) -> int:
        return len(self.genes)

    def x0(self) -> list[float]:
        """The starting point: ``initial:`` values, else mergekit-evolve's (weight 1/n,
        density 1), else the method's default inside the bounds, else the middle."""
        defaults = {p.name: p.default for p in self.method.params}
        out = []
        for g in self.genes:
            if g.param in self.spec.initial:
                v = self.spec.initial[g.param]
            elif g.param == "weight":
                v = 1.0 / len(self.models)
            elif g.param == "density":
                v = 1.0
            elif _number(defaults.get(g.param)):
                v = float(defaults[g.param])
            else:
                v = (g.lo + g.hi) / 2
            out.append(min(1.0, max(0.0, g.unit(v))))
        return out

    def labels(self) -> list[str]:
        names = [_short(m) for m in self.models]
        return [g.label(names) for g in self.genes]

    # -- a point as a recipe -----------------------------------------------------------
    def _value(self, vals: dict[tuple, float], n: str, model: int | None, f: str | None) -> Any:
        """One parameter set's value: a scalar (one group), a gradient over the groups
        (``smooth``, interpolated between them) or one value per layer index (a gradient
        with a point at every layer: exact at each layer, constant within a group)."""
        per_group = [vals[(n, g, model, f)] for g in range(self.n_groups)]
        if self.n_groups == 1:
            return per_group[0]
        if self.spec.smooth:
            return per_group
        return [per_group[g] for g in self.group_of]

    def _setting(self, vals: dict[tuple, float], n: str, model: int | None) -> Any:
        sets = [*(self.spec.filters or []), None]
        if len(sets) == 1:
            return self._value(vals, n, model, None)
        return [
            {"filter": f, "value": self._value(vals, n, model, f)} if f is not None
            else {"value": self._value(vals, n, model, f)}
            for f in sets
        ]  # fmt: skip

    def recipe(self, x: list[float], *, seed: int = 0) -> dict[str, Any]:
        """The brickwork recipe of point ``x`` (a plain dict, ready for YAML)."""
        if len(x) != self.dims:
            raise ValueError(f"a point of this genome has {self.dims} numbers, got {len(x)}")
        vals = {(g.param, g.group, g.model, g.filter): g.value(v) for g, v in zip(self.genes, x)}
        base = self.spec.base_model
        out: dict[str, Any] = {"method": self.method.name}
        if base is not None:
            out["base"] = base
        out["models"] = [
            {"model": m, "parameters": {n: self._setting(vals, n, i)
                                        for n in self.names if self.per_model[n]}}
            for i, m in enumerate(self.models) if m != base
        ]  # fmt: skip
        out["parameters"] = {**self.fixed, **{n: self._setting(vals, n, None)
                                              for n in self.names if not self.per_model[n]}}  # fmt: skip
        if self.spec.dtype is not None:
            out["dtype"] = self.spec.dtype
        out["seed"] = seed
        return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _short(path: str) -> str:
    from pathlib import PurePath

    p = PurePath(path.rstrip("/"))
    return p.stem if p.suffix in (".safetensors", ".bin", ".pt") else p.name or path
