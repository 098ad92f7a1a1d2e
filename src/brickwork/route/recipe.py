"""Upcycling recipes for ``brickwork route upcycle``: brickwork's own YAML and mergekit-moe's.

brickwork recipe::

    base: ./base                  # attention, norms, embeddings come from here ...
    experts:                      # ... each fine-tune's FFN becomes one expert
      - model: ./math
        positive_prompts: ["Solve 3x + 1 = 7"]   # router_init hidden / cheap_embed
        negative_prompts: []                     # optional
        examples_file: math.txt                  # router_init task / train: one text a line
      - model: ./code
        examples: ["def f(x):", "for i in range(3):"]
    shared_expert: {model: ./base}  # optional: every token also passes its FFN -> Qwen2-MoE
    format: auto                  # auto | mixtral | qwen2_moe | brickwork (auto: qwen2_moe
                                  #   for Qwen2 inputs or a shared expert, mixtral for
                                  #   Llama / Mistral, brickwork's own MoE format (see
                                  #   route.upcycle_modules; random / task routers) else)
    top_k: 2                      # experts per token
    merge_method: linear          # optional: merge the non-FFN tensors of the experts
    merge_parameters: {}          # the method's global parameters
    router_init: random           # random | hidden | cheap_embed | task | train
    router_std: 0.02              # random: default the config's initializer_range
    router_scale: 1.0             # task: std of the router logits across experts
    router_train:                 # train: router-only training on unlabelled mixed text
      init: task                  #   task | random
      steps: 30
      lr: 0.01
      batch_size: 4
      aux_loss_coef: 0.01         #   weight of the load-balancing loss
      texts_file: mixed.txt       #   or texts: [...]; default: every expert's examples
    tokenizer: ./base             # default: the base's directory
    max_length: 256               # tokens per prompt / example
    device: cpu                   # default: cuda if available
    seed: 0
    dtype: bfloat16               # optional output dtype (default: the base's)

A mergekit-moe recipe (``base_model:``, ``gate_mode:``, ``experts: [{source_model: ...,
positive_prompts: [...], negative_prompts: [...]}]``, ``shared_experts:``) is read as it is
and converted: ``experts_per_token`` → ``top_k``, ``gate_mode`` (``hidden``, mergekit's
default, ``cheap_embed`` or ``random``) → ``router_init``, one shared expert →
``shared_expert`` (its prompts give its gate, as mergekit), ``architecture: qwen`` →
``format: qwen2_moe``. ``random`` draws N(0, ``initializer_range``), not mergekit's draw.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..errors import BrickworkError, CheckpointError, RecipeError, did_you_mean
from ..merge.registry import get_method
from ..recipe import ModelPath, _check_params, _Strict, format_validation_error, read_yaml

if TYPE_CHECKING:
    from .routers import RouterData

DType = Literal["float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
_GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
_MERGEKIT_ONLY = ("base_model", "gate_mode", "experts_per_token", "shared_experts", "architecture")
_ARCHITECTURES = {None: "auto", "mixtral": "mixtral", "qwen": "qwen2_moe"}


class ExpertEntry(_Strict):
    model: ModelPath
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    examples: list[str] | None = None
    examples_file: ModelPath | None = None

    @model_validator(mode="after")
    def _check(self) -> ExpertEntry:
        if self.examples is not None and self.examples_file is not None:
            raise ValueError("give examples or examples_file, not both")
        return self


class SharedExpertEntry(_Strict):
    model: ModelPath
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None


class RouterTrain(_Strict):
    init: Literal["task", "random"] = "task"
    steps: int = Field(default=30, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=4, ge=1)
    aux_loss_coef: float = Field(default=0.01, ge=0)
    texts: list[str] | None = None
    texts_file: ModelPath | None = None

    @model_validator(mode="after")
    def _check(self) -> RouterTrain:
        if self.texts is not None and self.texts_file is not None:
            raise ValueError("give texts or texts_file, not both")
        return self


class UpcycleRecipe(_Strict):
    """What ``upcycle_moe`` needs, as a strict recipe."""

    base: ModelPath
    experts: list[ExpertEntry] = Field(min_length=2)
    shared_expert: SharedExpertEntry | None = None
    format: Literal["auto", "mixtral", "qwen2_moe", "brickwork"] = "auto"
    top_k: int = Field(default=2, ge=1)
    merge_method: str | None = None
    merge_parameters: dict[str, Any] = Field(default_factory=dict)
    router_init: Literal["random", "hidden", "cheap_embed", "task", "train"] = "random"
    router_std: float | None = Field(default=None, gt=0)
    router_scale: float | None = Field(default=None, gt=0)
    router_train: RouterTrain | None = None
    tokenizer: ModelPath | None = None
    max_length: int = Field(default=256, ge=1)
    device: str | None = None
    seed: int = 0
    dtype: DType | None = None

    @model_validator(mode="after")
    def _check(self) -> UpcycleRecipe:
        if self.top_k > len(self.experts):
            raise ValueError(
                f"top_k must be at most the number of experts ({len(self.experts)}), "
                f"got {self.top_k}"
            )
        if self.merge_method is None:
            if self.merge_parameters:
                raise ValueError("merge_parameters is given without merge_method; add one")
        else:
            m = get_method(self.merge_method)  # unknown names: UnknownNameError with the known
            _check_params(m, self.merge_parameters, "merge_parameters", per_model_ok=True)
        if self.format == "mixtral" and self.shared_expert is not None:
            raise ValueError(
                "shared_expert: Mixtral has no shared expert; use format qwen2_moe (or auto)"
            )
        self._check_router()
        return self

    def _check_router(self) -> None:
        init = self.router_init
        train = self.router_train if init == "train" else None
        random_rows = init == "random" or (train is not None and train.init == "random")
        if self.router_std is not None and not random_rows:
            raise ValueError("router_std only applies to random router rows (router_init: random)")
        task_rows = init == "task" or (init == "train" and (train is None or train.init == "task"))
        if self.router_scale is not None and not task_rows:
            raise ValueError("router_scale only applies to router_init: task (or train from task)")
        if self.router_train is not None and init != "train":
            raise ValueError(f"router_train only applies to router_init: train, not {init}")
        for i, e in enumerate(self.experts):
            if init in ("hidden", "cheap_embed") and not _texts(e.positive_prompts):
                raise ValueError(
                    f"experts[{i}].positive_prompts: router_init (gate_mode) {init} needs at least one "
                    "prompt per expert (negative_prompts are optional)"
                )
            if task_rows and not _texts(e.examples) and e.examples_file is None:
                raise ValueError(
                    f"experts[{i}].examples: router_init {init} needs unlabelled examples of "
                    "each expert's domain: examples: [...] or examples_file: a text file, one "
                    "example a line"
                )
        if (
            init == "train"
            and (train is None or (train.texts is None and train.texts_file is None))
            and not any(_texts(e.examples) or e.examples_file for e in self.experts)
        ):
            raise ValueError(
                "router_train.texts: router_init train needs unlabelled texts: "
                "router_train.texts or texts_file, or the experts' examples"
            )


def _texts(xs: Sequence[str] | None) -> list[str]:
    return [x for x in xs or [] if x.strip()]


class MergekitExpert(_Strict):
    source_model: ModelPath
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MergekitMoERecipe(_Strict):
    """mergekit-moe's configuration, as mergekit reads it (its defaults included)."""

    base_model: ModelPath
    experts: list[MergekitExpert] = Field(min_length=2)
    gate_mode: str = "hidden"  # mergekit's default
    dtype: str | None = None
    experts_per_token: int = Field(default=2, ge=1)
    shared_experts: list[MergekitExpert] | None = None
    architecture: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MergekitMoERecipe:
        if self.gate_mode not in _GATE_MODES:
            raise ValueError(
                f"gate_mode '{self.gate_mode}' is not one of {', '.join(_GATE_MODES)}."
                f"{did_you_mean(self.gate_mode, _GATE_MODES)}"
            )
        if self.gate_mode == "uniform_random":
            raise ValueError(
                "gate_mode 'uniform_random' is not supported; use gate_mode: random (normal "
                "rows) or hidden"
            )
        if self.shared_experts is not None and len(self.shared_experts) != 1:
            raise ValueError(
                f"shared_experts: exactly one shared expert is supported (Qwen2-MoE has one), "
                f"got {len(self.shared_experts)}"
            )
        if self.architecture not in _ARCHITECTURES:
            raise ValueError(
                f"architecture '{self.architecture}' is not supported; brickwork writes "
                "mixtral or qwen (Qwen2-MoE): remove it or set it to one of these"
            )
        for i, e in enumerate([*self.experts, *(self.shared_experts or [])]):
            where = f"experts[{i}]" if i < len(self.experts) else "shared_experts[0]"
            for key in ("noise_scale", "residual_scale"):
                if getattr(e, key) is not None:
                    raise ValueError(f"{where}.{key} is not supported yet; remove it")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype '{self.dtype}' is not one of float32, float16, bfloat16 (or fp32, fp16, bf16)"
            )
        return self

    def to_native(self) -> UpcycleRecipe:
        prompts = self.gate_mode != "random"
        shared = self.shared_experts[0] if self.shared_experts else None
        return UpcycleRecipe(
            base=self.base_model,
            experts=[
                ExpertEntry(
                    model=e.source_model,
                    positive_prompts=e.positive_prompts if prompts else None,
                    negative_prompts=e.negative_prompts if prompts else None,
                )
                for e in self.experts
            ],
            shared_expert=None
            if shared is None
            else SharedExpertEntry(
                model=shared.source_model,
                positive_prompts=shared.positive_prompts if prompts else None,
                negative_prompts=shared.negative_prompts if prompts else None,
            ),
            format=_ARCHITECTURES[self.architecture],
            top_k=self.experts_per_token,
            router_init=self.gate_mode,
            dtype=_DTYPE_ALIASES.get(self.dtype, self.dtype),
        )


_KNOWN_KEYS = sorted(
    {
        k
        for cls in (
            UpcycleRecipe,
            ExpertEntry,
            SharedExpertEntry,
            RouterTrain,
            MergekitMoERecipe,
            MergekitExpert,
        )
        for k in cls.model_fields
    }
)


def _is_mergekit(data: dict[str, Any]) -> bool:
    if any(k in data for k in _MERGEKIT_ONLY):
        return True
    experts = data.get("experts")
    return isinstance(experts, list) and any(
        isinstance(e, dict) and "source_model" in e for e in experts
    )


def parse_upcycle_recipe(data: Any, *, source: str = "<recipe>") -> UpcycleRecipe:
    """Validate an upcycle recipe given as a dict (brickwork or mergekit-moe form)."""
    if isinstance(data, UpcycleRecipe):
        return data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: an upcycle recipe is a mapping with 'base' and 'experts' keys (or "
            f"mergekit-moe's 'base_model'), got {type(data).__name__}."
        )
    try:
        if _is_mergekit(data):
            return MergekitMoERecipe.model_validate(data).to_native()
        return UpcycleRecipe.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(
            e, source, known_keys=_KNOWN_KEYS, kind="upcycle recipe"
        ) from None
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def load_upcycle_recipe(path: str | Path) -> UpcycleRecipe:
    """Read and validate a YAML upcycle recipe; errors name the file and the field."""
    return parse_upcycle_recipe(read_yaml(path), source=str(path))


def resolve_model_path(path: str, recipe_dir: Path | None, *, where: str) -> Path:
    """``path`` as given, else relative to the recipe's folder (as ``brickwork merge``).

    ``where`` names the path in errors, e.g. ``"moe.yaml: experts[1]"``.
    """
    p = Path(path).expanduser()
    if not p.exists() and recipe_dir is not None and (recipe_dir / p).exists():
        return recipe_dir / p
    if not p.exists():
        hint = (
            " It looks like a Hugging Face hub id: brickwork never downloads; download it "
            "first (e.g. `huggingface-cli download ID --local-dir DIR`) and give DIR."
            if path.count("/") == 1 and not path.startswith((".", "/", "~"))
            else ""
        )
        raise CheckpointError(f"{where} '{path}': no such file or directory.{hint}")
    return p


def _read_lines(path: str, recipe_dir: Path | None, where: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.exists() and recipe_dir is not None:
        p = recipe_dir / p
    try:
        lines = [x.strip() for x in p.read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise RecipeError(f"{where} '{path}': cannot read it ({e.strerror}).") from None
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{where} '{path}': not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); give a text file, one example a line."
        ) from None
    lines = [x for x in lines if x]
    if not lines:
        raise RecipeError(f"{where} '{path}': no non-empty line; give one example a line.")
    return lines


def router_data(
    r: UpcycleRecipe, recipe_dir: Path | None = None, *, source: str = "<recipe>"
) -> RouterData | None:
    """The prompts / examples / training settings of ``r`` (files read, relative to the
    recipe's folder); ``None`` for ``router_init: random``."""
    from .routers import RouterData

    if r.router_init == "random":
        return None
    examples = []
    for i, e in enumerate(r.experts):
        if e.examples_file is not None:
            examples.append(
                _read_lines(e.examples_file, recipe_dir, f"{source}: experts[{i}].examples_file")
            )
        else:
            examples.append(_texts(e.examples))
    t = r.router_train or RouterTrain()
    texts = t.texts or []
    if t.texts_file is not None:
        texts = _read_lines(t.texts_file, recipe_dir, f"{source}: router_train.texts_file")
    tokenizer = r.tokenizer
    if tokenizer is not None and recipe_dir is not None and not Path(tokenizer).exists():
        tokenizer = str(recipe_dir / tokenizer)
    return RouterData(
        positive_prompts=[_texts(e.positive_prompts) for e in r.experts],
        negative_prompts=[_texts(e.negative_prompts) for e in r.experts],
        examples=examples,
        shared_positive=_texts(r.shared_expert.positive_prompts) if r.shared_expert else [],
        shared_negative=_texts(r.shared_expert.negative_prompts) if r.shared_expert else [],
        train_texts=texts,
        tokenizer=tokenizer,
        max_length=r.max_length,
        task_scale=r.router_scale or 1.0,
        train_init=t.init,
        train_steps=t.steps,
        train_lr=t.lr,
        train_batch_size=t.batch_size,
        aux_loss_coef=t.aux_loss_coef,
        device=r.device,
    )


def upcycle_from_recipe(
    recipe: UpcycleRecipe | str | Path,
    out: str | Path,
    *,
    recipe_dir: Path | None = None,
    seed: int | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Run an upcycle recipe (a parsed one, or a YAML path); paths resolve against
    ``recipe_dir`` (default: the YAML's folder). ``seed`` overrides the recipe's."""
    source = "<recipe>"
    if not isinstance(recipe, UpcycleRecipe):
        source = str(recipe)
        recipe_dir = Path(recipe).parent if recipe_dir is None else recipe_dir
        recipe = load_upcycle_recipe(recipe)
    try:
        return _run(recipe, out, recipe_dir, source, seed, shard_size, force, progress)
    except BrickworkError as e:  # name the recipe in errors found while running it
        if source in str(e):
            raise
        raise type(e)(f"{source}: {e}") from None


def _run(
    r: UpcycleRecipe,
    out: str | Path,
    where: Path | None,
    source: str,
    seed: int | None,
    shard_size: str | int,
    force: bool,
    progress: bool,
) -> Path:
    from .upcycle import SUPPORTED, upcycle_moe

    data = router_data(r, where, source=source)
    base = resolve_model_path(r.base, where, where=f"{source}: base")
    experts = [
        resolve_model_path(e.model, where, where=f"{source}: experts[{i}]")
        for i, e in enumerate(r.experts)
    ]
    fmt = r.format
    if fmt == "auto" and (base / "config.json").is_file():
        try:
            model_type = json.loads((base / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # upcycle_moe reports the unreadable config
        if model_type is not None and model_type not in SUPPORTED:
            fmt = "brickwork"
    if fmt == "brickwork":
        return _run_modules(r, base, experts, out, data, seed, force)
    return upcycle_moe(
        base,
        experts,
        out,
        shared_expert=None
        if r.shared_expert is None
        else resolve_model_path(r.shared_expert.model, where, where=f"{source}: shared_expert"),
        format=fmt,
        top_k=r.top_k,
        merge_method=r.merge_method,
        merge_parameters=r.merge_parameters,
        router_init=r.router_init,
        router_std=r.router_std,
        router_data=data,
        seed=r.seed if seed is None else seed,
        shard_size=shard_size,
        dtype=r.dtype,
        force=force,
        progress=progress,
    )


def _run_modules(
    r: UpcycleRecipe,
    base: Path,
    experts: list[Path],
    out: str | Path,
    data: RouterData | None,
    seed: int | None,
    force: bool,
) -> Path:
    """Non-decoder bases (BERT, ...): brickwork's own MoE format, module level."""
    from .upcycle_modules import upcycle_hf_models

    unsupported = {
        "shared_expert": r.shared_expert is not None,
        "dtype": r.dtype is not None,
        "router_train": r.router_train is not None,
    }
    for key, given in unsupported.items():
        if given:
            raise RecipeError(
                f"{key}: not available for brickwork-format upcycling (bases other than "
                "Llama / Mistral / Qwen2); remove it."
            )
    if r.router_init not in ("random", "task"):
        raise RecipeError(
            f"router_init: '{r.router_init}' is not available for brickwork-format upcycling "
            "(bases other than Llama / Mistral / Qwen2); use random or task."
        )
    return upcycle_hf_models(
        base,
        experts,
        out,
        examples=data.examples if data is not None else None,
        tokenizer=data.tokenizer if data is not None else r.tokenizer,
        max_length=r.max_length,
        force=force,
        top_k=r.top_k,
        merge_method=r.merge_method,
        merge_parameters=r.merge_parameters or None,
        router_init=r.router_init,
        router_std=r.router_std if r.router_std is not None else 0.02,
        router_scale=r.router_scale or 1.0,
        seed=r.seed if seed is None else seed,
    )
