"""Merge recipes: brickwork's own YAML and mergekit's YAML, as strict pydantic models.

brickwork recipe (``method:`` key)::

    method: ties                 # any name from `brickwork methods`
    base: ./base                 # needed by methods that use a base model
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
    parameters:                  # global; per-model ones here apply to every model
      lambda: 0.8
      density: [0.2, 0.5, 0.8]   # a gradient, interpolated over layers
      weight:                    # conditional on tensor names (first match wins)
        - {filter: self_attn, value: 0.7}
        - {value: 1.0}
    dtype: bfloat16              # output dtype (default: each tensor's dtype in the base)
    compute_dtype: float32       # the dtype methods compute in: float32 (default), float64,
                                 # bfloat16, float16, or input (each tensor's own dtype)
    seed: 0                      # for seeded methods (dare_*, della*)
    on_missing: error            # a tensor absent from some models: error | base | skip
    align:                       # optional: permute every other model's units onto ./math
      to: ./math                 # first (models trained from different initialisations)
      method: weight             # weight (data-free) | activation (needs data:)
      residual: false            # also permute the residual stream (transformers)

``slices:`` (layer ranges of several models stacked, as mergekit) replaces ``models:``.

A mergekit recipe (``merge_method:`` key) is read as it is and converted: ``base_model``
→ ``base``, ``out_dtype`` (else ``dtype``) → ``dtype``, and it keeps mergekit's arithmetic:
mergekit's ``dtype`` (if absent: each tensor's own dtype) → ``compute_dtype``, so
task arithmetic, TIES and model stock compute in bfloat16 for ``dtype: bfloat16`` as mergekit
does (linear and slerp accumulate in float32 whatever the compute dtype, as in mergekit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    model_validator,
)

from .errors import RecipeError, did_you_mean
from .merge.registry import MergeMethod, brief, get_method


def _scalar(v: Any) -> bool | int | float | str:
    if isinstance(v, bool | int | float | str):
        return v
    kind = {type(None): "null", dict: "a mapping", list: "a list"}.get(type(v), type(v).__name__)
    raise ValueError(f"expected a number, a string or true/false, got {kind}")


# One validator, not a union of four: a wrong value gets one error, not one per type.
Scalar = Annotated[Union[bool, int, float, str], PlainValidator(_scalar)]
DType = Literal["float32", "float16", "bfloat16", "float64"]
#: The dtype merge methods receive their tensors in; "input": each tensor's own dtype
#: (promoted across the models), which is what mergekit does without ``dtype:``.
ComputeDType = Literal["float32", "float64", "bfloat16", "float16", "input"]
Gradient = Annotated[list[Scalar], Field(min_length=1)]  # values interpolated over layers
#: A path in a recipe (a model directory or file, a text file): never empty.
ModelPath = Annotated[str, Field(min_length=1)]


def _setting_kind(v: Any) -> str:
    """Which form of a parameter setting ``v`` is, from its shape, so that pydantic reports
    the errors of that form only."""
    if isinstance(v, dict | Condition):
        return "condition"
    if isinstance(v, list):
        return "conditions" if v and isinstance(v[0], dict | Condition) else "gradient"
    return "scalar"


class _Strict(BaseModel):
    """Strict recipe models. Their string fields are names, paths and dtypes: one line each.
    A control character there is a mistake (a YAML block scalar, a pasted newline) and would
    break the error messages that quote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _printable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, str) and not v.isprintable():
                    raise ValueError(
                        f"{brief(k)} = {brief(v)} holds a non-printable character (newline, "
                        "tab, ...); names and paths are one line"
                    )
        return data


class Condition(_Strict):
    filter: str | None = None
    value: Annotated[
        Union[Annotated[Scalar, Tag("scalar")], Annotated[Gradient, Tag("gradient")]],
        Discriminator(lambda v: "gradient" if isinstance(v, list) else "scalar"),
    ]


ParamSetting = Annotated[
    Union[
        Annotated[Scalar, Tag("scalar")],
        Annotated[Gradient, Tag("gradient")],
        Annotated[Condition, Tag("condition")],
        Annotated[list[Condition], Tag("conditions")],
    ],
    Discriminator(_setting_kind),
]
Params = dict[str, ParamSetting]


class DataSpec(_Strict):
    """Calibration data of one model, for data-aware methods (``brickwork.stats.data``)::

        data: {path: calib.txt, n_examples: 256, batch_size: 8, max_length: 128}

    ``path``: a ``.txt`` file (one example per non-empty line) or a folder of them, or a
    ``.jsonl`` (text under ``field``), tokenised with the model's own tokenizer; or a
    ``.safetensors`` file of input tensors (``input_ids``, ...). ``fisher_estimate``: the
    Fisher's labels, ``sampled`` from the model (the true Fisher), ``exact`` (classifiers)
    or ``empirical`` (``labels`` of the data; ``label_field`` of a JSONL)."""

    path: ModelPath
    format: Literal["text", "jsonl", "safetensors"] | None = None
    field: str = "text"
    label_field: str | None = None
    n_examples: Annotated[int, Field(gt=0)] = 256
    batch_size: Annotated[int, Field(gt=0)] = 8
    max_length: Annotated[int, Field(gt=0)] = 128
    fisher_estimate: Literal["sampled", "exact", "empirical"] = "sampled"


class ModelEntry(_Strict):
    model: ModelPath
    parameters: Params = Field(default_factory=dict)
    data: DataSpec | None = None  # calibration data, for data-aware methods


class SliceSource(_Strict):
    model: ModelPath
    layer_range: tuple[int, int]
    parameters: Params = Field(default_factory=dict)


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelPath | None = None
    parameters: Params = Field(default_factory=dict)


class AlignSpec(_Strict):
    """``align:``: before merging, permute every model except ``to`` onto ``to``'s units
    (Git Re-Basin; see :mod:`brickwork.align`). Weight matching needs no data; activation
    matching reads ``data`` (tokenised with each model's tokenizer)."""

    to: ModelPath
    method: Literal["weight", "activation"] = "weight"
    heads: bool = True  # transformers: permute attention heads as whole blocks
    within_head: bool = True  # ... and dimensions inside a head where positions allow it
    residual: bool = False  # ... and the residual stream (couples every layer)
    seed: int = 0
    max_iter: Annotated[int, Field(gt=0)] = 100
    data: DataSpec | None = None


class MergeRecipe(_Strict):
    method: str
    base: ModelPath | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Params = Field(default_factory=dict)
    dtype: DType | None = None
    compute_dtype: ComputeDType = "float32"
    seed: int = 0
    on_missing: Literal["error", "base", "skip"] = "error"
    align: AlignSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> MergeRecipe:
        m = get_method(self.method)
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty; list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty; list at least one slice")
        _check_params(m, self.parameters, "parameters", per_model_ok=True)
        for i, e in enumerate(self.models or []):
            _check_params(
                m, e.parameters, f"models[{i}].parameters", per_model_ok=True, global_ok=False
            )
        for i, s in enumerate(self.slices or []):
            _check_params(m, s.parameters, f"slices[{i}].parameters", per_model_ok=True)
            lengths = set()
            for j, src in enumerate(s.sources):
                a, b = src.layer_range
                if not 0 <= a < b:
                    raise ValueError(
                        f"slices[{i}].sources[{j}].layer_range must be [start, end) with 0 <= start < end, got [{a}, {b}]"
                    )
                lengths.add(b - a)
                _check_params(
                    m,
                    src.parameters,
                    f"slices[{i}].sources[{j}].parameters",
                    per_model_ok=True,
                    global_ok=False,
                )
            if len(lengths) > 1:
                raise ValueError(
                    f"slices[{i}]: every source must span the same number of layers, got {sorted(lengths)}"
                )
        if m.needs_base and self.models is not None and self.base is None:
            raise ValueError(
                f"method '{m.name}' needs a base model: add 'base: PATH' to the recipe"
            )
        for i, s in enumerate(self.slices or []):
            if m.needs_base and (s.base_model or self.base) is None:
                raise ValueError(
                    f"method '{m.name}' needs a base model but slices[{i}] has none: add "
                    "'base: PATH' ('base_model:' in a mergekit recipe) and list the base "
                    "among the slice's sources"
                )
        self._check_model_count(m)
        if self.align is not None and self.align.method == "activation" and not self.align.data:
            raise ValueError(
                "align.method 'activation' needs calibration data: add align.data "
                "(e.g. data: {path: calibration.txt, n_examples: 256}), or use method 'weight'"
            )
        return self

    def _check_model_count(self, m: MergeMethod) -> None:
        """Non-base models per merge (per slice) within the method's ``n_models``."""
        lo, hi = m.n_models
        if (lo, hi) == (1, None):
            return
        groups = [("models", [e.model for e in self.models], self.base)] if self.models else []
        for i, s in enumerate(self.slices or []):
            groups.append(
                (f"slices[{i}].sources", [x.model for x in s.sources], s.base_model or self.base)
            )
        for where, paths, base in groups:
            others = [p for p in paths if m.base == "none" or p != base]
            if lo <= len(others) and (hi is None or len(others) <= hi):
                continue
            want = (
                f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            )
            role = " besides the base" if base is not None or m.needs_base else ""
            hint = {
                "required": ", and the base as 'base:' ('base_model:')",
                "optional": " (a base, 'base:' / 'base_model:', is optional)",
            }.get(m.base, "")
            raise RecipeError(
                f"{where}: method '{m.name}' merges {want} model(s){role}; got {len(others)}"
                f" ({', '.join(others) or 'none'}). List {want}{hint}."
            )

    def model_paths(self) -> list[str]:
        """Every referenced model, base first, without repeats."""
        paths = [self.base] if self.base else []
        for e in self.models or []:
            paths.append(e.model)
        for s in self.slices or []:
            paths += [s.base_model] if s.base_model else []
            paths += [src.model for src in s.sources]
        return list(dict.fromkeys(paths))


class MergekitRecipe(_Strict):
    """The subset of mergekit's configuration that brickwork reproduces."""

    merge_method: str
    base_model: ModelPath | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Params = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    modules: Any = None
    tokenizer: Any = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MergekitRecipe:
        for key in ("modules", "tokenizer", "chat_template"):
            if getattr(self, key) is not None:
                raise ValueError(f"mergekit's '{key}' is not supported by brickwork yet; remove it")
        if self.tokenizer_source not in (None, "base") and self.tokenizer_source != self.base_model:
            raise ValueError(
                f"tokenizer_source '{self.tokenizer_source}' is not supported (vocabularies are not merged); "
                "use models with one vocabulary and drop tokenizer_source, or set it to 'base'"
            )
        return self

    def to_native(self) -> MergeRecipe:
        out = self.out_dtype or self.dtype
        dtypes = {"float32", "float16", "bfloat16", "float64"}
        aliases = {
            "fp32": "float32",
            "fp16": "float16",
            "bf16": "bfloat16",
            "half": "float16",
            "float": "float32",
        }
        if out is not None:
            out = out.removeprefix("torch.")
            out = aliases.get(out, out)
            if out not in dtypes:
                raise RecipeError(
                    f"dtype '{out}' is not one of float32, float16, bfloat16, float64 (or fp32, fp16, bf16)"
                )
        return MergeRecipe(
            method=self.merge_method,
            base=self.base_model,
            models=self.models,
            slices=self.slices,
            parameters=self.parameters,
            dtype=out,
            compute_dtype=self._compute_dtype(aliases, dtypes),
        )

    def _compute_dtype(self, aliases: dict[str, str], dtypes: set[str]) -> str:
        """mergekit converts every input to ``dtype`` as it loads it (keeps its own dtype
        without one) and computes in it; its linear and slerp upcast to float32 inside."""
        if self.dtype is None:
            return "input"
        name = self.dtype.removeprefix("torch.")
        name = aliases.get(name, name)
        if name not in dtypes:
            raise RecipeError(
                f"dtype '{self.dtype}' is not one of float32, float16, bfloat16, float64 (or fp32, fp16, bf16)"
            )
        return name


def _leaves(setting: Any) -> list[Any]:
    if isinstance(setting, Condition):
        return _leaves(setting.value)
    if isinstance(setting, list):
        return [x for s in setting for x in _leaves(s)]
    return [setting]


def _check_params(
    m: MergeMethod,
    params: dict[str, Any],
    where: str,
    *,
    per_model_ok: bool,
    global_ok: bool = True,
) -> None:
    names = [p.name for p in m.params]
    for key, setting in params.items():
        if key not in names:
            known = ", ".join(names) or "none"
            raise RecipeError(
                f"{where}: {brief(key)} is not a parameter of method '{m.name}' (its parameters: {known}).{did_you_mean(key, names)}"
            )
        spec = m.param(key)
        if not spec.per_model and not global_ok:
            raise RecipeError(
                f"{where}: '{key}' is a global parameter of '{m.name}'; move it to the top-level 'parameters'."
            )
        for leaf in _leaves(setting):
            spec.validate(leaf, where=where)


_KNOWN_KEYS = sorted(
    {
        k
        for cls in (
            MergeRecipe,
            MergekitRecipe,
            ModelEntry,
            SliceSource,
            Slice,
            Condition,
            DataSpec,
        )
        for k in cls.model_fields
    }
)


#: Tags of the forms of a parameter setting (see ``_setting_kind``): left out of locations,
#: except where they are a key of a parameters mapping.
_FORM_TAGS = ("scalar", "gradient", "condition", "conditions")
_PARAM_KEYS = ("parameters", "merge_parameters")


def _loc(parts: list[Any]) -> str:
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in parts).removeprefix(".")


def format_validation_error(
    e: ValidationError, source: str, *, known_keys: list[str], kind: str = "recipe"
) -> RecipeError:
    """One short error for every problem pydantic found: location, what is wrong, and for a
    misspelt key the nearest of ``known_keys``. Unknown keys are listed first."""
    lines = []
    for err in e.errors():
        loc_in = err["loc"]
        parts = [
            x if isinstance(x, int) or x.isprintable() else brief(x)
            for i, x in enumerate(loc_in)
            if not str(x).startswith(("function-", "tagged-union"))
            and not (x in _FORM_TAGS and i and loc_in[i - 1] not in _PARAM_KEYS)
        ]
        if err["type"] == "extra_forbidden":
            key = str(loc_in[-1])
            where = _loc(parts[:-1])  # the mapping that holds the key
            hint = (
                " It belongs to another part of the recipe."
                if key in known_keys
                else did_you_mean(key, known_keys)
            )
            lines.append(f"{where + ': ' if where else ''}unknown key {brief(key)}.{hint}")
            continue
        loc = _loc(parts)
        if err["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f" (got {brief(got)})"
            lines.append(f"{loc + ': ' if loc else ''}{msg}{shown}")
    uniq = sorted(dict.fromkeys(lines), key=lambda line: "unknown key" not in line)
    return RecipeError(f"{source}: invalid {kind}:\n  " + "\n  ".join(uniq[:8]))


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; unreadable files and syntax errors name the file and the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e.strerror}).") from None
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{p}: not a YAML recipe: byte {e.object[e.start]:#04x} at offset {e.start} is not "
            "UTF-8 text (is it a binary file?)."
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}.") from None


def parse_recipe(data: Any, *, source: str = "<recipe>") -> MergeRecipe:
    """Validate a recipe given as a dict (brickwork or mergekit form)."""
    if isinstance(data, MergeRecipe):
        return data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe is a mapping with a 'method' (or mergekit 'merge_method') key, got {type(data).__name__}."
        )
    if "merge_method" not in data and "method" not in data:
        hints = (did_you_mean(k, ["method", "merge_method"]) for k in data if isinstance(k, str))
        raise RecipeError(
            f"{source}: the recipe has no 'method' key (or 'merge_method' for a mergekit "
            f"recipe).{next((h for h in hints if h), '')}"
        )
    try:
        if "merge_method" in data:
            return MergekitRecipe.model_validate(data).to_native()
        return MergeRecipe.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, source, known_keys=_KNOWN_KEYS) from None
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a YAML recipe file; errors name the file and the field."""
    return parse_recipe(read_yaml(path), source=str(path))
