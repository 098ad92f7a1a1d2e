"""``brickwork route moefy RECIPE OUT``: MoEfy a Hugging Face model directory from a recipe.

Recipe (strict: a misspelt key is an error naming the nearest valid one)::

    model: ./bert-base            # HF directory: config.json, weights, tokenizer files
    n_experts: 8                  # experts per FFN (must divide its d_ff)
    top_k: 2                      # experts run per token
    clustering: kmeans            # kmeans (weights) | coactivation (calibration activations)
    router: linear                # linear | mlp
    router_hidden: null           # mlp width (default: hidden size)
    steps: 300                    # Adam steps per router
    lr: null                      # default 1e-2 (linear), 3e-3 (mlp)
    max_tokens: 8192              # calibration tokens kept per FFN
    ffns: null                    # module paths to MoEfy (default: every FFN found)
    calibration:
      text: ./calib.txt           # one example per line (blank lines skipped)
      lines: 256                  # the first N examples
      max_length: 128             # tokens per example (truncated)
      batch_size: 16
    seed: 0
    force: false                  # replace OUT if it exists

Relative paths are tried as given, then relative to the recipe's folder. The output is
brickwork's MoE format (``brickwork.load(OUT)``), written atomically, with the recipe, the
inputs' checksums and the per-layer router report in ``brickwork.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..errors import CheckpointError, OutputExistsError, RecipeError
from ..recipe import ModelPath, _Strict, format_validation_error, read_yaml


class Calibration(_Strict):
    text: ModelPath
    lines: int = Field(default=256, ge=1)
    max_length: int = Field(default=128, ge=2)
    batch_size: int = Field(default=16, ge=1)


class MoefyRecipe(_Strict):
    """What ``brickwork route moefy`` needs, as a strict recipe."""

    model: ModelPath
    n_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    clustering: Literal["kmeans", "coactivation"] = "kmeans"
    router: Literal["linear", "mlp"] = "linear"
    router_hidden: int | None = Field(default=None, ge=1)
    steps: int = Field(default=300, ge=1)
    lr: float | None = Field(default=None, gt=0)
    max_tokens: int = Field(default=8192, ge=16)
    ffns: list[str] | None = None
    calibration: Calibration
    seed: int = 0
    force: bool = False

    @model_validator(mode="after")
    def _check(self) -> MoefyRecipe:
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k must be at most n_experts ({self.n_experts}), got {self.top_k}"
            )
        if self.router_hidden is not None and self.router != "mlp":
            raise ValueError("router_hidden only applies to router: mlp")
        return self


_KNOWN_KEYS = sorted({*MoefyRecipe.model_fields, *Calibration.model_fields})


def parse_moefy_recipe(data: Any, *, source: str = "<recipe>") -> MoefyRecipe:
    if isinstance(data, MoefyRecipe):
        return data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a moefy recipe is a mapping with 'model', 'n_experts', 'top_k' and "
            f"'calibration' keys, got {type(data).__name__}."
        )
    try:
        return MoefyRecipe.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(
            e, source, known_keys=_KNOWN_KEYS, kind="moefy recipe"
        ) from None


def load_moefy_recipe(path: str | Path) -> MoefyRecipe:
    """Read and validate a YAML moefy recipe; errors name the file and the field."""
    return parse_moefy_recipe(read_yaml(path), source=str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _read_lines(path: Path, n: int, where: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = []
            for line in f:
                if line.strip():
                    lines.append(line.strip())
                if len(lines) == n:
                    break
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{where} '{path}': cannot read it as UTF-8 text ({e}).") from None
    if not lines:
        raise RecipeError(f"{where} '{path}': no non-empty line; give one example per line.")
    return lines


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _load_tokenizer(model_dir: Path, where: str) -> Any:
    import transformers

    hint = (
        "the calibration text is tokenized with the model's own tokenizer: put its files "
        f"({', '.join(_TOKENIZER_FILES[:3])}, ...) in the directory."
    )
    # transformers 5 builds an *empty* tokenizer (every word unknown) for a directory
    # without tokenizer files, so their absence is checked here rather than trusted to it.
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{where} '{model_dir}': no usable tokenizer (no vocabulary file); {hint}"
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{where} '{model_dir}': no usable tokenizer ({type(e).__name__}: {e}); {hint}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _load_model(model_dir: Path, where: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    try:
        return cls.from_pretrained(str(model_dir), local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{where} '{model_dir}': transformers cannot load it ({e})."
        ) from None


def _check_unknown(batches: list[dict], tok: Any, where: str) -> None:
    """Refuse calibration text the tokenizer mostly cannot read (wrong tokenizer or text)."""
    import torch

    if tok.unk_token_id is None:
        return
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    share = float((ids == tok.unk_token_id).float().mean()) if ids.numel() else 0.0
    if share > 0.5:
        raise RecipeError(
            f"{where}: the model's tokenizer maps {share:.0%} of the calibration tokens to "
            f"{tok.unk_token}; is it the model's tokenizer, and text in its language?"
        )


def run_moefy(
    recipe_path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    seed: int | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Run a moefy recipe; returns the output path and the report. Nothing is written on error."""
    from .recipe import resolve_model_path

    recipe_path, out = Path(recipe_path), Path(out)
    r = load_moefy_recipe(recipe_path)
    where = recipe_path.parent
    model_dir = resolve_model_path(r.model, where, where=f"{recipe_path}: model")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"{recipe_path}: model '{r.model}': no config.json; give a Hugging Face model "
            "directory (config.json, safetensors weights, tokenizer files)."
        )
    text = resolve_model_path(r.calibration.text, where, where=f"{recipe_path}: calibration.text")
    force = force or r.force
    for src in (model_dir, text):
        o, p = out.expanduser().resolve(), src.resolve()
        if o == p or o in p.parents or p in o.parents:
            raise OutputExistsError(
                f"output {out} overlaps the input {p}; brickwork never writes over its inputs. "
                "Choose another output path."
            )
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out}: already exists. Choose another output path or pass --force to replace it."
        )
    lines = _read_lines(text, r.calibration.lines, f"{recipe_path}: calibration.text")
    seed = r.seed if seed is None else seed
    tok = _load_tokenizer(model_dir, f"{recipe_path}: model")
    c = r.calibration
    batches = []
    for i in range(0, len(lines), c.batch_size):
        enc = tok(lines[i : i + c.batch_size], padding=True, truncation=True,
                  max_length=c.max_length, return_tensors="pt")  # fmt: skip
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    _check_unknown(batches, tok, f"{recipe_path}: calibration.text '{text}'")
    model = _load_model(model_dir, f"{recipe_path}: model")
    from ..checkpoint.reader import open_checkpoint
    from .format import save_moe
    from .moefy import moefy, report_dict

    result = moefy(
        model, n_experts=r.n_experts, top_k=r.top_k, calibration=batches, ffns=r.ffns,
        clustering=r.clustering, router=r.router, router_hidden=r.router_hidden,
        steps=r.steps, lr=r.lr, max_tokens=r.max_tokens, seed=seed, progress=progress,
    )  # fmt: skip
    report = report_dict(result)
    settings = {**r.model_dump(), "seed": seed, "force": force}
    inputs = {
        "model": {"path": str(model_dir), "sha256": open_checkpoint(model_dir).checksum()},
        "calibration": {"path": str(text), "sha256": _sha256(text), "lines": len(lines)},
    }
    provenance = {"kind": "route.moefy", "settings": settings, "inputs": inputs, "report": report}
    save_moe(
        result.model, out, copy_from=model_dir, inputs=[model_dir, text],
        provenance=provenance, model_card=_card(settings, inputs, report), force=force,
    )  # fmt: skip
    return out, report


def _card(settings: dict[str, Any], inputs: dict[str, Any], report: dict[str, Any]) -> str:
    m = report["mean"]
    lines = [
        "---",
        "tags: [moe, moefication, brickwork]",
        "---",
        "# MoEfied model (brickwork MoE format)",
        "",
        f"Every FFN of `{inputs['model']['path']}` (sha256 `{inputs['model']['sha256']}`) split "
        f"into {settings['n_experts']} experts by {settings['clustering']} clustering; a "
        f"{settings['router']} router picks the top {settings['top_k']} per token and their "
        "outputs are summed (MoEfication, Zhang et al., Findings of ACL 2022).",
        "",
        f"Calibration: {inputs['calibration']['lines']} lines of "
        f"`{inputs['calibration']['path']}`; seed {settings['seed']}.",
        "",
        "| FFN | router recall | kept activation mass | oracle | random | output rel. error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for x in report["layers"]:
        lines.append(
            f"| `{x['path']}` | {x['router_recall']:.3f} | {x['kept_mass']:.3f} | "
            f"{x['oracle_kept_mass']:.3f} | {x['random_kept_mass']:.3f} | "
            f"{x['output_rel_error']:.3f} |"
        )
    lines += [
        "",
        f"Mean: recall {m['router_recall']:.3f}, kept mass {m['kept_mass']:.3f}, "
        f"output rel. error {m['output_rel_error']:.3f}.",
        "",
        "```python\nimport brickwork\nmodel = brickwork.load(PATH)\n```",
    ]
    return "\n".join(lines) + "\n"
