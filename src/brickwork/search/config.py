"""The configuration of ``brickwork search CONFIG OUT`` (issue 13).

brickwork's own form::

    genome:
      merge_method: ties
      base_model: ./base
      models: [./math, ./code, ./chat]
      layer_granularity: 2            # parameters per group of 2 layers (0: one group)
      parameters: [weight, density]   # searched; the others fixed by `fixed:`
      fixed: {lambda: 1.0}
      bounds: {weight: [0, 1]}        # optional: defaults per parameter
    evaluator:
      callable: mypkg.score:score     # or {bench_task: NAME} or {perplexity: [FILE, ...]}
    optimizer: {name: cma, seed: 0}   # cma | random | tpe
    max_evals: 100

mergekit-evolve's configuration (Goddard et al., ``mergekit-evolve``) is accepted as it is:
its ``genome:`` keys (``models``, ``merge_method``, ``base_model``, ``layer_granularity``,
``normalize``, ``allow_negative_weights``, ``smooth``, ``filters``, ``tokenizer_source``) and
its ``tasks:`` list, mapped onto brickwork's evaluators: a task named after a benchmark task
(``bench_task``) is scored on that task's validation split; any other name is an
lm-eval-harness task, which needs ``lm-eval`` installed (a clear error otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _model_path(v: Any) -> str:
    """A model reference: a path, or mergekit's ``{model: PATH}`` / ``{model: {path: ...}}``."""
    if isinstance(v, dict) and "model" in v:
        v = v["model"]
        if isinstance(v, dict) and "path" in v:
            v = v["path"]
    if not isinstance(v, str) or not v:
        raise ValueError(f"a model is a path (a non-empty string), got {v!r}")
    return v


class GenomeSpec(_Strict):
    """What is searched: the merge method, its models and which parameters vary per group
    of layers. ``parameters`` (searched) default to mergekit-evolve's choice for its five
    methods (``weight``; ``weight, density`` for ties / dare_ties; ``t`` for slerp)."""

    merge_method: str
    models: Annotated[list[str], Field(min_length=1)]
    base_model: str | None = None
    layer_granularity: Annotated[int, Field(ge=0)] = 0
    parameters: list[str] | None = None
    fixed: dict[str, Any] = Field(default_factory=dict)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    initial: dict[str, float] = Field(default_factory=dict)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    smooth: bool = False
    filters: list[str] | None = None
    tokenizer_source: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("models"), list):
                data["models"] = [_model_path(m) for m in data["models"]]
            if data.get("base_model") is not None:
                data["base_model"] = _model_path(data["base_model"])
        return data

    @model_validator(mode="after")
    def _check(self) -> GenomeSpec:
        for name, (lo, hi) in self.bounds.items():
            if not lo < hi:
                raise ValueError(
                    f"bounds.{name} = [{lo}, {hi}]: the lower bound must be below the upper "
                    f"one (write [{min(lo, hi)}, {max(lo, hi)}])"
                )
        both = set(self.parameters or []) & set(self.fixed)
        if both:
            raise ValueError(
                f"{sorted(both)} are both searched (parameters:) and fixed (fixed:); keep each "
                "in one of them"
            )
        return self


class EvaluatorSpec(_Strict):
    """Exactly one of ``callable`` (``package.module:function``, called with the merged
    model, returns a float, higher is better), ``bench_task`` (a benchmark task's name, a
    list of them, or ``all``: mean normalized validation accuracy over the genome's tasks)
    or ``perplexity`` (text files, tokenised with the model's tokenizer; the score is minus
    the mean token loss)."""

    callable: str | None = None
    bench_task: str | list[str] | None = None
    perplexity: list[str] | None = None
    lm_eval: list[dict[str, Any]] | None = None  # mergekit-evolve `tasks:` not on the bench
    suite: Literal["text", "digits", "lm"] = "text"  # the bench suite of `bench_task`
    quick: bool = False  # the bench's --quick configuration (tests)
    train_seed: int = 0
    n_examples: Annotated[int, Field(gt=0)] = 256
    max_length: Annotated[int, Field(gt=0)] = 128
    batch_size: Annotated[int, Field(gt=0)] = 8
    options: dict[str, Any] = Field(default_factory=dict)  # lm-eval: limit, num_fewshot, ...

    @model_validator(mode="after")
    def _one(self) -> EvaluatorSpec:
        given = [k for k in ("callable", "bench_task", "perplexity", "lm_eval") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of evaluator.callable (package.module:function), "
                "evaluator.bench_task (NAME) or evaluator.perplexity ([FILE, ...]); got "
                f"{given or 'none'}"
            )
        if self.callable is not None and ":" not in self.callable:
            raise ValueError(
                f"evaluator.callable = {self.callable!r}: write it as package.module:function"
            )
        return self


class OptimizerSpec(_Strict):
    """``cma`` (CMA-ES, Hansen & Ostermeier 2001; the ``cma`` package), ``random`` (uniform
    in the bounds, the baseline) or ``tpe`` (Optuna's tree-structured Parzen estimator,
    Bergstra et al. 2011). ``batch``: candidates proposed before any of their scores is
    told (CMA-ES: its population size, default 4 + 3 ln(dimensions)); the search result
    depends on it, not on the number of workers."""

    name: Literal["cma", "random", "tpe"] = "cma"
    seed: int = 0
    sigma0: Annotated[float, Field(gt=0, le=1)] = 0.2  # in units of each parameter's range
    batch: Annotated[int, Field(gt=0)] | None = None


class RaySpec(_Strict):
    """Where candidates run: ``address`` of a running cluster (``ray start --head``) or
    ``None`` for a local one of ``workers`` processes. ``memory_per_worker`` (bytes, or
    ``2GB``) bounds each worker twice: Ray reserves that much memory per worker (so a node
    runs no more workers than its memory holds), and the worker's data segment (heap and
    private memory, ``RLIMIT_DATA``; the shared object store is not counted) is limited to
    it, so a candidate that needs more fails alone (logged as failed, told to the optimiser
    as the worst score) instead of the machine running out of memory."""

    address: str | None = None
    workers: Annotated[int, Field(gt=0)] | None = None
    memory_per_worker: int | str | None = None
    max_retries: Annotated[int, Field(ge=0)] = 3


class SearchConfig(_Strict):
    genome: GenomeSpec
    evaluator: EvaluatorSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    max_evals: Annotated[int, Field(gt=0)] = 100
    ray: RaySpec = RaySpec()
    seed: int = 0  # the merge seed (DARE's random drops), fixed for every candidate
    #: where candidates are merged: ``memory`` (the models in Ray's object store, each
    #: candidate merged in memory), ``disk`` (each worker merges from the checkpoints into
    #: a temporary directory, reads the result and deletes it: one merged copy per worker,
    #: the sources never held), ``auto``: memory when the models plus one merged copy per
    #: worker take at most half the memory available, disk otherwise.
    merge_in: Literal["auto", "memory", "disk"] = "auto"


#: mergekit-evolve's top-level keys besides genome/tasks, passed to lm-eval.
_LM_EVAL_KEYS = ("limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
                 "fewshot_as_multiturn")  # fmt: skip


def _from_mergekit_evolve(data: dict[str, Any]) -> dict[str, Any]:
    """mergekit-evolve's ``{genome, tasks, limit, ...}`` as brickwork's form."""
    from ..bench import lm_data, text_tasks

    data = dict(data)
    tasks = data.pop("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise RecipeError("tasks: a list of task names (or {name, weight, metric}) is expected")
    entries = [{"name": t} if isinstance(t, str) else dict(t) for t in tasks]
    options = {k: data.pop(k) for k in _LM_EVAL_KEYS if k in data}
    bench_names = {n: "text" for n in text_tasks.TASKS} | {n: "lm" for n in lm_data.DOMAINS}
    names = [e.get("name") for e in entries]
    if all(n in bench_names for n in names):
        suites = {bench_names[n] for n in names}
        if len(suites) > 1:
            raise RecipeError(f"tasks {names} come from different bench suites {sorted(suites)}")
        evaluator = {"bench_task": names, "suite": suites.pop()}
    elif any(n in bench_names for n in names):
        raise RecipeError(
            f"tasks {names} mix benchmark tasks ({[n for n in names if n in bench_names]}) and "
            "lm-eval tasks; search one kind at a time"
        )
    else:
        evaluator = {"lm_eval": entries, "options": options}
    return {**data, "evaluator": evaluator}


def parse_search_config(data: Any, *, source: str = "<search config>") -> SearchConfig:
    """A :class:`SearchConfig` from a mapping (brickwork's or mergekit-evolve's form);
    :class:`RecipeError` naming the field otherwise."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a search config is a mapping with genome: and evaluator:")
    if "tasks" in data and "evaluator" not in data:
        data = _from_mergekit_evolve(data)
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {msg}")
        raise RecipeError(f"{source}: invalid search config\n" + "\n".join(lines)) from None


def load_search_config(path: str | Path) -> SearchConfig:
    from ..recipe import read_yaml

    return parse_search_config(read_yaml(path), source=str(path))
