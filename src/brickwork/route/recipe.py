"""Upcycling recipes for ``brickwork route upcycle``: brickwork's own YAML and mergekit-moe's.

brickwork recipe::

    base: ./base                  # attention, norms, embeddings come from here ...
    experts:                      # ... each fine-tune's FFN becomes one expert
      - model: ./math
      - model: ./code
    top_k: 2                      # experts per token
    merge_method: linear          # optional: merge the non-FFN tensors of the experts
    merge_parameters: {}          # the method's global parameters
    router_init: random           # random | hidden (hidden: Python API only, for now)
    router_std: 0.02              # default: the config's initializer_range
    seed: 0
    dtype: bfloat16               # optional output dtype (default: the base's)

A mergekit-moe recipe (``base_model:``, ``gate_mode:``, ``experts: [{source_model: ...}]``)
is read as it is and converted: ``experts_per_token`` → ``top_k``. Only ``gate_mode:
random`` is supported (its prompts are ignored; no tokenizer is needed); the router is
N(0, ``initializer_range``), not mergekit's exact random draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import CheckpointError, RecipeError, did_you_mean
from ..merge.registry import get_method
from ..recipe import _check_params, format_validation_error, read_yaml

DType = Literal["float32", "float16", "bfloat16"]
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
_GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
_MERGEKIT_ONLY = ("base_model", "gate_mode", "experts_per_token", "shared_experts", "architecture")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertEntry(_Strict):
    model: str


class UpcycleRecipe(_Strict):
    """What ``upcycle_to_mixtral`` needs, as a strict recipe."""

    base: str
    experts: list[ExpertEntry] = Field(min_length=2)
    top_k: int = Field(default=2, ge=1)
    merge_method: str | None = None
    merge_parameters: dict[str, Any] = Field(default_factory=dict)
    router_init: Literal["random", "hidden"] = "random"
    router_std: float | None = Field(default=None, gt=0)
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
        if self.router_init == "hidden" and self.router_std is not None:
            raise ValueError("router_std only applies to router_init: random")
        return self


class MergekitExpert(_Strict):
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MergekitMoERecipe(_Strict):
    """mergekit-moe's configuration, as mergekit reads it (its defaults included)."""

    base_model: str
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
        if self.gate_mode != "random":
            absent = "gate_mode" not in self.model_fields_set
            raise ValueError(
                ("no gate_mode given, and mergekit's default " if absent else "")
                + f"gate_mode '{self.gate_mode}' is not supported yet"
                + (
                    " (it runs the experts' prompts through the base model)"
                    if self.gate_mode in ("hidden", "cheap_embed")
                    else ""
                )
                + "; use gate_mode: random (the prompts are then ignored)"
            )
        if self.shared_experts is not None:
            raise ValueError(
                "shared_experts is not supported yet (Mixtral has no shared expert); remove it"
            )
        if self.architecture not in (None, "mixtral"):
            raise ValueError(
                f"architecture '{self.architecture}' is not supported yet; brickwork writes "
                "Mixtral checkpoints: remove it or set it to mixtral"
            )
        for i, e in enumerate(self.experts):
            for key in ("noise_scale", "residual_scale"):
                if getattr(e, key) is not None:
                    raise ValueError(f"experts[{i}].{key} is not supported yet; remove it")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype '{self.dtype}' is not one of float32, float16, bfloat16 (or fp32, fp16, bf16)"
            )
        return self

    def to_native(self) -> UpcycleRecipe:
        return UpcycleRecipe(
            base=self.base_model,
            experts=[ExpertEntry(model=e.source_model) for e in self.experts],
            top_k=self.experts_per_token,
            router_init="random",
            dtype=_DTYPE_ALIASES.get(self.dtype, self.dtype),
        )


_KNOWN_KEYS = sorted(
    {
        k
        for cls in (UpcycleRecipe, ExpertEntry, MergekitMoERecipe, MergekitExpert)
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
