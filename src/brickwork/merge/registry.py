"""The merge-method registry.

A merge method is one typed function, registered by name with :func:`merge_method`.
The decorator reads the signature (STYLE.md §1):

* the first positional argument receives the models' tensors, ``list[Tensor]``, all
  of one shape, in the compute dtype (float32 unless the recipe says otherwise);
* ``base: Tensor`` (required) or ``base: Tensor | None = None`` (optional) receives the
  base model's tensor; a method without ``base`` never sees it;
* ``generator: torch.Generator`` marks a seeded method: the executor passes a generator
  seeded from the run's seed and the tensor name, so results do not depend on order;
* every other keyword-only argument is a parameter. ``PerModel[T]`` parameters are given
  per input model (the function receives ``list[T]``, one entry per tensor); the rest are
  global. Constraints are pydantic ``Field``\\ s in ``Annotated`` and are checked when the
  recipe is read. A trailing underscore is dropped from the public name (``lambda_`` is
  ``lambda``).

``statistics=("gram",)`` (or ``"fisher"``) marks a data-aware method: its function takes a
keyword-only ``statistics: list[TensorStatistics | None]``, one entry per input model (that
model's statistics of the tensor being merged, ``None`` where it has none), which the
executor reads tensor by tensor from the statistics cache (``brickwork.stats``).

:func:`module_merge_method` registers a **module-level** method instead: a function
``(base, models, data, *, ...) -> (nn.Module, info)`` that needs the models as
``nn.Module``\\ s and calibration data (``data[i]``: batches of model ``i``'s task), and
:func:`register_lazy_method` one whose module is imported only when it is used.

``n_models=(lo, hi)`` bounds the number of non-base models (``hi=None``: no upper bound); a
recipe outside it is a :class:`RecipeError` when it is read.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin

from pydantic import TypeAdapter, ValidationError

from ..errors import RecipeError, unknown_name


def brief(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened to about ``limit`` characters for an error message."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[: limit - 15]}...{r[-10:]} ({len(r)} characters)"


class _PerModelMarker:
    def __repr__(self) -> str:
        return "PER_MODEL"


PER_MODEL = _PerModelMarker()


class PerModel:
    """``PerModel[float]``: a parameter given once per input model."""

    def __class_getitem__(cls, item: Any) -> Any:
        return Annotated[item, PER_MODEL]


@dataclass(frozen=True)
class ParamSpec:
    name: str  # public name, as written in recipes
    py_name: str  # keyword name in the function
    per_model: bool
    annotation: Any  # type of one value (per model: of one model's value)
    default: Any  # inspect.Parameter.empty when required
    adapter: TypeAdapter = field(repr=False, compare=False)

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def validate(self, value: Any, *, where: str) -> Any:
        try:
            out = self.adapter.validate_python(value)
        except ValidationError as e:
            msg = "; ".join(err["msg"] for err in e.errors())
            raise RecipeError(
                f"{where}: parameter '{self.name}' = {brief(value)} is invalid: {msg}."
            ) from None
        if isinstance(out, float) and not math.isfinite(out):
            raise RecipeError(
                f"{where}: parameter '{self.name}' = {out!r} is invalid: give a finite number."
            )
        return out

    def type_name(self) -> str:
        ann = self.annotation
        if get_origin(ann) is Annotated:
            base, *meta = get_args(ann)
            cons = [m for m in meta if m is not PER_MODEL]
            txt = getattr(base, "__name__", str(base))
            for c in cons:
                for m in getattr(c, "metadata", [c]):
                    txt += f" {type(m).__name__.lower()} {next(iter(vars(m).values()), '')}"
            return txt
        if get_origin(ann) is typing.Literal:
            return "|".join(map(str, get_args(ann)))
        return getattr(ann, "__name__", str(ann))


@dataclass(frozen=True)
class MergeMethod:
    name: str
    func: Callable[..., Any] = field(repr=False)
    base: str  # "required" | "optional" | "none"
    seeded: bool
    params: tuple[ParamSpec, ...]
    description: str
    reference: str
    search_space: dict[str, list[Any]]
    n_models: tuple[int, int | None] = (1, None)  # non-base models: (at least, at most)
    statistics: tuple[str, ...] = ()  # kinds of statistics the function receives
    level: str = "tensor"  # "tensor": streamed per tensor; "module": nn.Modules and data
    target: str | None = None  # "package.module:function" of a lazily imported method

    @property
    def needs_data(self) -> bool:
        """Whether the method needs calibration data (statistics, or module level)."""
        return bool(self.statistics) or self.level == "module"

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise unknown_name(
            f"parameter of method '{self.name}'", name, [p.name for p in self.params]
        )

    @property
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if not p.per_model)


_REGISTRY: dict[str, MergeMethod] = {}


def _is_per_model(annotation: Any) -> bool:
    return get_origin(annotation) is Annotated and any(
        m is PER_MODEL for m in get_args(annotation)[1:]
    )


def merge_method(
    name: str,
    *,
    description: str = "",
    reference: str = "",
    search_space: dict[str, Iterable[Any]] | None = None,
    n_models: tuple[int, int | None] = (1, None),
    statistics: Iterable[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func`` as merge method ``name`` (see the module docstring)."""
    statistics = tuple(statistics)
    for kind in statistics:
        if kind not in STATISTICS:
            raise ValueError(f"statistics kind {kind!r}; known: {', '.join(STATISTICS)}")

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method '{name}' is already registered")
        hints = typing.get_type_hints(func, include_extras=True)
        sig = inspect.signature(func)
        params: list[ParamSpec] = []
        base, seeded = "none", False
        for i, (pname, p) in enumerate(sig.parameters.items()):
            if i == 0:
                continue  # the tensors
            if pname == "base":
                base = "optional" if p.default is None else "required"
                continue
            if pname == "generator":
                seeded = True
                continue
            if pname == "statistics" and statistics:
                continue
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"{func.__name__}: parameter '{pname}' must be keyword-only")
            ann = hints[pname]
            public = pname[:-1] if pname.endswith("_") else pname
            params.append(
                ParamSpec(public, pname, _is_per_model(ann), ann, p.default, TypeAdapter(ann))
            )
        doc = inspect.getdoc(func) or ""
        method = MergeMethod(
            name=name,
            func=func,
            base=base,
            seeded=seeded,
            params=tuple(params),
            description=description or doc.split("\n\n")[0].replace("\n", " "),
            reference=reference,
            search_space={k: list(v) for k, v in (search_space or {}).items()},
            n_models=n_models,
            statistics=statistics,
        )
        for k in method.search_space:
            method.param(k)  # unknown names in the search space are a bug
        _REGISTRY[name] = method
        return func

    return register


#: Kinds of statistics the collector (``brickwork.stats``) measures.
STATISTICS = ("gram", "fisher")
#: Arguments of a module-level method that callers pass at run time, not recipe parameters.
_RUNTIME = ("logits_fn", "heads", "seed", "progress")


def _module_params(func: Callable[..., Any]) -> tuple[ParamSpec, ...]:
    hints = typing.get_type_hints(func, include_extras=True)
    params = []
    for pname, p in inspect.signature(func).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or pname in _RUNTIME:
            continue
        ann = hints[pname]
        public = pname[:-1] if pname.endswith("_") else pname
        params.append(ParamSpec(public, pname, False, ann, p.default, TypeAdapter(ann)))
    return tuple(params)


def _module_method(
    name: str,
    func: Callable[..., Any] | None,
    *,
    base: str,
    description: str,
    reference: str,
    statistics: tuple[str, ...],
    target: str | None,
) -> MergeMethod:
    doc = (inspect.getdoc(func) or "") if func is not None else ""
    return MergeMethod(
        name=name,
        func=func,  # type: ignore[arg-type]
        base=base,
        seeded=False,
        params=_module_params(func) if func is not None else (),
        description=description or doc.split("\n\n")[0].replace("\n", " "),
        reference=reference,
        search_space={},
        statistics=statistics,
        level="module",
        target=target,
    )


def module_merge_method(
    name: str,
    *,
    base: str = "optional",
    description: str = "",
    reference: str = "",
    statistics: Iterable[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a module-level method ``func(base, models, data, *, params..., seed,
    progress) -> (nn.Module, info dict)``; ``base``: "required", "optional" or "none"."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method '{name}' is already registered")
        _REGISTRY[name] = _module_method(
            name,
            func,
            base=base,
            description=description,
            reference=reference,
            statistics=tuple(statistics),
            target=None,
        )
        return func

    return register


def register_lazy_method(
    name: str, target: str, *, base: str = "required", description: str, reference: str
) -> None:
    """Register module-level method ``name`` whose function ``target``
    ("package.module:function") is imported the first time the method is looked up."""
    if name in _REGISTRY:
        raise ValueError(f"merge method '{name}' is already registered")
    _REGISTRY[name] = _module_method(
        name, None, base=base, description=description, reference=reference,
        statistics=(), target=target,
    )  # fmt: skip


def _resolve(method: MergeMethod) -> MergeMethod:
    """A lazily registered method with its function imported and its signature read; if the
    import fails the method stays listed, and using it is an error that says why."""
    if method.target is None or method.func is not None:
        return method
    import importlib

    mod, _, attr = method.target.partition(":")
    try:
        func = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        from ..errors import BrickworkError

        raise BrickworkError(
            f"merge method '{method.name}' is registered but its implementation "
            f"{method.target} cannot be imported ({e}); this install of brickwork lacks it."
        ) from None
    resolved = _module_method(
        method.name, func, base=method.base, description=method.description,
        reference=method.reference, statistics=method.statistics, target=method.target,
    )  # fmt: skip
    _REGISTRY[method.name] = resolved
    return resolved


def _ensure_loaded() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)


def get_method(name: str) -> MergeMethod:
    _ensure_loaded()
    try:
        return _resolve(_REGISTRY[name])
    except KeyError:
        shown = name if isinstance(name, str) and name.isprintable() else repr(name)[1:-1]
        raise unknown_name("merge method", shown, _REGISTRY) from None


def list_methods(*, data_aware: bool = False) -> list[str]:
    """Names of the registered methods: the data-free tensor-level ones, which merge any
    checkpoints without data; ``data_aware=True`` adds those that need calibration data
    (statistics such as RegMean's Gram matrices, or module-level methods)."""
    _ensure_loaded()
    return sorted(n for n, m in _REGISTRY.items() if data_aware or not m.needs_data)
