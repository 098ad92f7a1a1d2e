"""PEFT LoRA adapters as merge inputs, and merging adapters into one adapter.

* :class:`Adapter` reads a PEFT LoRA adapter directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) lazily.
* :class:`AdapterCheckpoint` is a :class:`~brickwork.checkpoint.reader.Checkpoint` view of
  ``base + adapter``: ``get(name)`` returns ``W_base + scale * B @ A`` for adapted modules
  (transposed for ``fan_in_fan_out`` / GPT-2 Conv1D and for embeddings, as PEFT's
  ``get_delta_weight`` does), the adapter's own tensor for ``modules_to_save``, and the base
  tensor otherwise. One module at a time: nothing is merged up front.
* :func:`merge_adapters` combines adapters into one adapter with the semantics of PEFT's
  ``LoraModel.add_weighted_adapter`` (peft/tuners/lora/model.py and peft/utils/merge_utils.py,
  PEFT 0.21), re-written here from what that code does:

  - the new adapter has ``r = lora_alpha = new_rank`` (scale 1), no rank/alpha patterns and
    the union of the target modules;
  - ``cat``: ``A = concat_i(w_i s_i A_i)`` along the rank, ``B = concat_i(B_i)``; new rank
    is the sum of the adapters' (largest) ranks, zero-padded where a module's is smaller;
  - ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (equal ranks
    required): the A's and the B's are combined *separately*, A with weights
    ``sign(w_i s_i) sqrt(|w_i s_i|)``, B with ``sqrt(|w_i s_i|)`` (so ``linear`` is not the
    sum of the deltas: PEFT calls it "a very rough approximation");
  - ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``:
    the deltas ``s_i B_i A_i`` are combined, then re-factored by a truncated SVD at
    ``svd_rank`` (default: the largest input rank), ``B = U_r S_r``, ``A = Vh_r``, optionally
    clamped at the ``svd_clamp`` quantile;
  - TIES (Yadav et al. 2023, arXiv:2306.01708): magnitude trim of each input, sign elected on
    the *unweighted* trimmed inputs ("total": sign of the sum; "frequency": sign of the sum of
    signs), weighted sum of the agreeing entries divided by their count; DARE (Yu et al. 2024,
    arXiv:2311.03099): drop with probability ``1 - density``, rescale by ``1/density``.

  Trimming and dropping reuse :mod:`brickwork.merge.sparsify`. Differences from PEFT: a
  magnitude trim keeps at least one entry when ``density * numel < 1`` (PEFT keeps none),
  exact ties at the threshold keep the first entries (PEFT: whatever ``topk`` returns); the
  merged adapter's config has ``use_rslora: false`` (PEFT copies the first adapter's flag,
  which with rslora would scale the merged delta by ``sqrt(r)``); ``modules_to_save`` of one
  adapter are carried over (PEFT's merged adapter gets fresh copies of the base modules).
  DARE draws come from a CPU generator seeded with ``seed``, one ``rand < density`` per
  tensor in PEFT's order (per module: the A's of every adapter, then the B's), so with
  ``module_order`` = the model's ``named_modules()`` order and PEFT run after
  ``torch.manual_seed(seed)`` the masks are the same.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint.reader import WEIGHT_FILES, Checkpoint, TensorInfo, open_checkpoint
from ..errors import CheckpointError, MergeComputationError

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

CombinationType = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
_FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *_FACTOR_WISE, *_SVD)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A directory with ``adapter_config.json`` and no model weights."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / CONFIG_FILE).is_file()
        and not any((p / w).is_file() for w in WEIGHT_FILES)
    )


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of an adapter: its factors' keys in the adapter file."""

    module: str  # path in the base model, e.g. model.layers.0.self_attn.q_proj
    a: str  # (r, in) key of lora_A (lora_embedding_A: (r, num_embeddings))
    b: str  # (out, r) key of lora_B (lora_embedding_B: (embedding_dim, r))
    embedding: bool
    rank: int
    alpha: float

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the end
    of the module path at a dot boundary (``get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class Adapter:
    """A PEFT LoRA adapter directory, read lazily (factors are read when asked for)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        cfg_file = self.path / CONFIG_FILE
        if not cfg_file.is_file():
            raise CheckpointError(
                f"{self.path}: no {CONFIG_FILE}: not a PEFT adapter directory. Give the folder "
                "that peft's save_pretrained wrote."
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e}).") from None
        self._check_config()
        files = [self.path / f for f in ADAPTER_FILES if (self.path / f).is_file()]
        if not files:
            raise CheckpointError(
                f"{self.path}: no adapter weights (expected {ADAPTER_FILES[0]} next to "
                f"{CONFIG_FILE})."
            )
        self.tensors = open_checkpoint(files[0])
        self.modules: dict[str, LoraModule] = {}
        self.replaced: dict[str, str] = {}  # base tensor name -> adapter key (full tensor)
        self.base_copies: set[str] = set()  # of those, embedding base weights PEFT saves too
        self._index()

    # -- config ---------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        where = self.path / CONFIG_FILE
        if c.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(
                f"{where}: peft_type is {c.get('peft_type')!r}; brickwork reads LoRA adapters "
                "only (peft_type LORA)."
            )
        for key, bad in (("use_dora", True), ("lora_bias", True)):
            if c.get(key) == bad:
                raise CheckpointError(
                    f"{where}: {key}: true is not supported (plain LoRA only); merge the adapter "
                    "with peft's merge_and_unload and give the merged model instead."
                )
        for key in ("r", "lora_alpha"):
            if not isinstance(c.get(key), int | float) or c[key] <= 0:
                raise CheckpointError(
                    f"{where}: {key} must be a positive number, got {c.get(key)!r}."
                )

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def scale(self, m: LoraModule) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
        if self.config.get("use_rslora", False):
            return m.alpha / math.sqrt(m.rank)
        return m.alpha / m.rank

    # -- keys -----------------------------------------------------------------------------
    def _index(self) -> None:
        c = self.config
        factors: dict[str, dict[str, str]] = {}
        for key in self.tensors.names:
            if not key.startswith(PREFIX):
                raise CheckpointError(
                    f"{self.tensors.label}: tensor '{key}' does not start with '{PREFIX}'; "
                    "not a PEFT LoRA adapter file."
                )
            rest = key.removeprefix(PREFIX)
            hit = re.fullmatch(
                r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?",
                rest,
            )
            if hit is None:  # modules_to_save, a saved (resized) embedding, trained biases
                name = rest.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                self.replaced[name] = key
                if ".base_layer." in rest:
                    self.base_copies.add(name)
                continue
            module = hit.group(1) or hit.group(3)
            kind = (hit.group(2) or hit.group(4))[-1]
            factors.setdefault(module, {})[kind] = key
        for module, fk in factors.items():
            if set(fk) != {"A", "B"}:
                raise CheckpointError(
                    f"{self.tensors.label}: module '{module}' has lora_{next(iter(fk))} but no "
                    "matching factor (corrupt adapter file)."
                )
            a, b = self.tensors.info(fk["A"]), self.tensors.info(fk["B"])
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise CheckpointError(
                    f"{self.tensors.label}: module '{module}': lora factors of shapes {a.shape} "
                    f"and {b.shape}; only Linear, Conv1D and Embedding LoRA are supported "
                    "(convolution LoRA is not)."
                )
            rank = int(_pattern_value(c.get("rank_pattern") or {}, module, c["r"]))
            alpha = float(_pattern_value(c.get("alpha_pattern") or {}, module, c["lora_alpha"]))
            if a.shape[0] != rank or b.shape[1] != rank:
                raise CheckpointError(
                    f"{self.tensors.label}: module '{module}' has factors of rank "
                    f"{a.shape[0]}/{b.shape[1]} but {CONFIG_FILE} (r / rank_pattern) says {rank}."
                )
            emb = "lora_embedding_A" in fk["A"]
            self.modules[module] = LoraModule(module, fk["A"], fk["B"], emb, rank, alpha)

    def factors(self, m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of module ``m`` as stored: A (r, in), B (out, r)."""
        return self.tensors.get(m.a), self.tensors.get(m.b)

    def delta_shape(self, m: LoraModule) -> tuple[int, int]:
        """The shape of ``m``'s base weight: (out, in), transposed for fan_in_fan_out or an
        embedding (num_embeddings, embedding_dim)."""
        a, b = self.tensors.info(m.a).shape, self.tensors.info(m.b).shape
        if m.embedding or self.fan_in_fan_out:
            return (a[1], b[0])
        return (b[0], a[1])

    def delta(self, m: LoraModule) -> torch.Tensor:
        """``scale * B @ A`` in the layout of the base weight (float32)."""
        a, b = self.factors(m)
        d = (b.float() @ a.float()) * self.scale(m)  # (out, in)
        return d.T if (m.embedding or self.fan_in_fan_out) else d


class AdapterCheckpoint(Checkpoint):
    """``base`` with a PEFT LoRA adapter applied, tensor by tensor, when read.

    Config, tokenizer and other side files are the base's (``model_dir``); the checksum
    combines the base's and the adapter file's digests.
    """

    derived = True

    def __init__(self, base: Checkpoint, adapter: Adapter | str | os.PathLike) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter if isinstance(adapter, Adapter) else Adapter(adapter)
        self.path = base.path
        self.label = f"{base.label}+{self.adapter.path}"
        self._infos = dict(base._infos)
        self._deltas = {m.weight: m for m in self.adapter.modules.values()}
        self._check()

    def _check(self) -> None:
        ad = self.adapter
        problems = []
        for name, m in self._deltas.items():
            if name not in self._infos:
                problems.append(f"module '{m.module}' has no tensor '{name}' in the base")
            elif self._infos[name].shape != ad.delta_shape(m):
                problems.append(
                    f"'{name}': base shape {self._infos[name].shape}, adapter's B@A gives "
                    f"{ad.delta_shape(m)}"
                )
        for name, key in ad.replaced.items():
            if name not in self._infos:
                problems.append(f"saved tensor '{key}' has no tensor '{name}' in the base")
            elif self._infos[name].shape != ad.tensors.info(key).shape:
                problems.append(
                    f"'{name}': base shape {self._infos[name].shape}, adapter's "
                    f"{ad.tensors.info(key).shape}"
                )
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointError(
                f"adapter {ad.path} does not fit base {self.base.label} "
                f"(adapter_config.json names base {ad.base_name!r}): "
                + "; ".join(problems[:5])
                + more
                + ". Give the base model the adapter was trained on ('model: BASE+ADAPTER')."
            )

    def get(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        ad = self.adapter
        if name in ad.replaced:
            t = ad.tensors.get(ad.replaced[name]).to(self._infos[name].dtype)  # base's dtype
        else:
            t = self.base.get(name, buffer=buffer)
        m = self._deltas.get(name)
        if m is None:
            return t
        return (t.float() + ad.delta(m)).to(t.dtype)

    def files(self) -> list[Path]:
        return [*self.base.files(), *self.adapter.tensors.files()]

    def checksum(self) -> str:
        return f"{self.base.checksum()}+lora:{self.adapter.tensors.checksum()}"


def resolve_adapter_base(adapter_dir: Path, recipe_dir: Path | None = None) -> Path:
    """The local base model an adapter names in ``base_model_name_or_path`` (as given, then
    relative to the adapter, then to the recipe); a clear error when it is not local."""
    ad = Adapter(adapter_dir)
    name = ad.base_name
    if not name:
        raise CheckpointError(
            f"adapter {adapter_dir}: adapter_config.json has no base_model_name_or_path; "
            "name the base in the recipe as 'model: BASE+ADAPTER'."
        )
    for cand in (Path(name).expanduser(), adapter_dir / name, (recipe_dir or Path()) / name):
        if cand.exists():
            return cand
    raise CheckpointError(
        f"adapter {adapter_dir}: its base '{name}' (base_model_name_or_path) is not a local "
        "path; brickwork never downloads. Name a local base in the recipe as "
        f"'model: BASE+{adapter_dir}'."
    )


# -- merging adapters into one adapter ---------------------------------------------------


@dataclass
class MergedAdapter:
    """A merged LoRA adapter: PEFT-named tensors and its ``adapter_config.json`` content."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    inputs: list[Adapter] = field(default_factory=list)

    def save(self, out: str | os.PathLike, *, force: bool = False) -> Path:
        """Write a PEFT adapter directory (atomically, through the shared writer); an output
        that is or lies inside an input adapter is refused."""
        from ..merge.api import check_output_is_not_input

        check_output_is_not_input(Path(out), {str(a.path): a.tensors for a in self.inputs})
        return write_adapter(out, self.tensors, self.config, force=force, extra=self.provenance)


def _sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    from ..merge.sparsify import sign_consensus

    if method == "total":
        return sign_consensus(stacked)
    elected = torch.where(stacked.sign().sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == elected


def _combine(
    tensors: list[torch.Tensor],
    weights: list[float],
    kind: str,
    density: float | None,
    majority_sign_method: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """Weighted combination of same-shaped tensors; ``kind`` without its ``_svd`` suffix."""
    from ..merge import sparsify

    if kind.startswith(("dare", "ties", "magnitude")):
        if kind.startswith("dare"):
            tensors = [
                sparsify.random_drop(t, density, rescale=True, generator=generator) for t in tensors
            ]
        else:
            tensors = [sparsify.magnitude(t, density) for t in tensors]
    stacked = torch.stack(tensors)  # (adapters, ...)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *[1] * (stacked.ndim - 1))
    if kind in ("ties", "dare_ties"):
        mask = _sign_mask(stacked, majority_sign_method)
        return (stacked * w * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)
    return (stacked * w).sum(dim=0)


def merge_adapters(
    adapters: Sequence[str | os.PathLike | Adapter],
    weights: Sequence[float],
    combination_type: CombinationType = "svd",
    *,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    seed: int = 0,
    module_order: Sequence[str] | None = None,
) -> MergedAdapter:
    """Merge PEFT LoRA adapters of one base into one adapter, as PEFT's
    ``add_weighted_adapter`` does (see the module docstring for the exact semantics and the
    few differences). Returns a :class:`MergedAdapter` (``.tensors``, ``.config``, ``.save``).

    ``module_order``: module paths in the order they are processed (matters only for DARE's
    random draws); default: the order of the first adapter's file, then the others'.
    Inputs are never modified.
    """
    ads = [a if isinstance(a, Adapter) else Adapter(a) for a in adapters]
    weights = [float(w) for w in weights]
    if not ads:
        raise MergeComputationError("merge_adapters: no adapters given.")
    if len(weights) != len(ads):
        raise MergeComputationError(
            f"merge_adapters: {len(weights)} weights for {len(ads)} adapters; give one each."
        )
    if combination_type not in COMBINATION_TYPES:
        import difflib

        near = difflib.get_close_matches(str(combination_type), COMBINATION_TYPES, n=1)
        raise MergeComputationError(
            f"unknown combination_type {combination_type!r}. Known: "
            f"{', '.join(sorted(COMBINATION_TYPES))}."
            + (f" Did you mean {near[0]!r}?" if near else "")
        )
    kind = "linear" if len(ads) == 1 else combination_type  # as PEFT: one adapter -> linear
    base_kind = kind.removesuffix("_svd") if kind != "svd" else "linear"
    needs_density = base_kind != "linear" and kind != "cat"
    if needs_density and (density is None or not 0 <= density <= 1):
        raise MergeComputationError(
            f"combination_type '{kind}' needs density in [0, 1], got {density!r}."
        )
    if majority_sign_method not in ("total", "frequency"):
        raise MergeComputationError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}."
        )
    ranks = [max([a.config["r"], *(a.config.get("rank_pattern") or {}).values()]) for a in ads]
    if kind in _FACTOR_WISE and len(set(ranks)) != 1:
        raise MergeComputationError(
            f"combination_type '{kind}' needs adapters of equal rank, got ranks "
            f"{dict(zip([str(a.path) for a in ads], ranks, strict=True))}; use 'cat' or an "
            "'_svd' type (svd, ties_svd, ...)."
        )
    new_rank = (
        sum(ranks) if kind == "cat" else (svd_rank or max(ranks)) if kind in _SVD else ranks[0]
    )
    saved: dict[str, tuple[str, Adapter]] = {}
    for a in ads:
        for name, key in a.replaced.items():
            if name in saved and name in a.base_copies:
                continue  # a targeted embedding's base weight, saved by every such adapter
            if name in saved:
                raise MergeComputationError(
                    f"adapters {saved[name][1].path} and {a.path} both save '{name}' "
                    "(modules_to_save); such modules cannot be merged (PEFT refuses too)."
                )
            saved[name] = (key, a)
    modules = list(dict.fromkeys(m for a in ads for m in a.modules))
    if module_order is not None:
        pos = {m: i for i, m in enumerate(module_order)}
        modules.sort(key=lambda m: pos.get(m, len(pos)))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        present = [(a, w) for a, w in zip(ads, weights, strict=True) if module in a.modules]
        m0 = present[0][0].modules[module]
        a_new, b_new = _merge_module(
            module, present, kind, base_kind, new_rank, density, majority_sign_method, gen,
            svd_clamp, svd_full_matrices,
        )  # fmt: skip
        out[m0.a] = a_new
        out[m0.b] = b_new
    for _name, (key, a) in saved.items():
        out[key] = a.tensors.get(key).clone()
    config = _merged_config(ads, new_rank, saved)
    prov = {
        "kind": "merge_adapters",
        "combination_type": combination_type,
        "weights": weights,
        "density": density,
        "majority_sign_method": majority_sign_method,
        "svd_rank": svd_rank,
        "svd_clamp": svd_clamp,
        "seed": seed,
        "inputs": {str(a.path): a.tensors.checksum() for a in ads},
    }
    return MergedAdapter(out, config, prov, ads)


def _merge_module(
    module: str,
    present: list[tuple[Adapter, float]],
    kind: str,
    base_kind: str,
    new_rank: int,
    density: float | None,
    msm: str,
    gen: torch.Generator,
    svd_clamp: float | None,
    full_matrices: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the merged adapter for one module (in the first adapter's dtype)."""
    mods = [(a, a.modules[module], w) for a, w in present]
    dtype = mods[0][0].tensors.info(mods[0][1].a).dtype
    if kind == "cat":
        fa = [(a.factors(m), w * a.scale(m)) for a, m, w in mods]
        A = torch.cat([f[0].float() * s for f, s in fa], dim=0)  # (sum r_i, in)
        B = torch.cat([f[1].float() for f, _ in fa], dim=1)  # (out, sum r_i)
        A = torch.cat([A, A.new_zeros(new_rank - A.shape[0], A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], new_rank - B.shape[1])], dim=1)
        return A.to(dtype), B.to(dtype)
    if kind in _FACTOR_WISE:
        rks = {m.rank for _, m, _ in mods}
        if len(rks) != 1:
            raise MergeComputationError(
                f"module '{module}': the adapters have ranks {sorted(rks)} here (rank_pattern); "
                f"'{kind}' needs equal ranks. Use 'cat' or an '_svd' combination type."
            )
        ws = [w * a.scale(m) for a, m, w in mods]
        wa = [math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in ws]
        wb = [math.sqrt(abs(x)) for x in ws]
        fs = [a.factors(m) for a, m, _ in mods]
        A = _combine([f[0].float() for f in fs], wa, kind, density, msm, gen)  # (r, in)
        B = _combine([f[1].float() for f in fs], wb, kind, density, msm, gen)  # (out, r)
        return A.to(dtype), B.to(dtype)
    # svd family: combine the deltas in the base weight's layout (as PEFT's get_delta_weight,
    # which fixes where DARE's draws land), then re-factor in LoRA layout (out, in)
    a0, m0, _ = mods[0]
    deltas = [a.delta(m) for a, m, _ in mods]  # (out, in); (in, out) for Conv1D / embeddings
    delta = _combine(deltas, [w for _, _, w in mods], base_kind, density, msm, gen)
    if m0.embedding or a0.fan_in_fan_out:
        delta = delta.T  # (out, in) = B @ A layout
    if new_rank > min(delta.shape):
        raise MergeComputationError(
            f"module '{module}': svd_rank {new_rank} is larger than its delta {tuple(delta.shape)} "
            f"allows (at most {min(delta.shape)}). Choose a smaller svd_rank."
        )
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    B = U[:, :new_rank] @ torch.diag(S[:new_rank])  # (out, r)
    A = Vh[:new_rank, :]  # (r, in)
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def _merged_config(
    ads: list[Adapter], new_rank: int, saved: Mapping[str, tuple[str, Adapter]]
) -> dict[str, Any]:
    cfg = dict(ads[0].config)
    targets = [a.config.get("target_modules") for a in ads]
    if all(isinstance(t, str) for t in targets):
        new_targets: Any = "|".join(f"({t})" for t in targets)
    elif all(isinstance(t, list) for t in targets):
        new_targets = sorted({x for t in targets for x in t})
    else:
        raise MergeComputationError(
            "adapters mix target_modules given as a regex string and as a list; PEFT cannot "
            f"combine them either ({', '.join(repr(t) for t in targets)})."
        )
    mts = sorted({x for a in ads for x in (a.config.get("modules_to_save") or [])})
    cfg.update(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        modules_to_save=mts if saved else cfg.get("modules_to_save"),
    )
    return cfg


class _AdapterWriter:
    """Factory of a CheckpointWriter whose single shard is ``adapter_model.safetensors``."""

    @staticmethod
    def make(out: Path, infos: list[TensorInfo], force: bool):
        from ..checkpoint.writer import CheckpointWriter

        class Writer(CheckpointWriter):
            def shard_name(self, s: int) -> str:
                return ADAPTER_FILES[0]

        return Writer(out, infos, force=force, shard_size=1 << 62)


def write_adapter(
    out: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    force: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``,
    ``brickwork.json`` with provenance, ``README.md``) atomically."""
    from ..checkpoint.provenance import environment

    out = Path(out)
    names = sorted(tensors)
    infos = [TensorInfo(n, tuple(tensors[n].shape), tensors[n].dtype) for n in names]
    env = environment()
    with _AdapterWriter.make(out, infos, force) as w:
        for n in names:
            w.write(n, tensors[n].contiguous())
        w.add_text(CONFIG_FILE, json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        record = {**(extra or {}), "environment": env}
        w.add_text("brickwork.json", json.dumps(record, indent=2, default=str) + "\n")
        kind = (extra or {}).get("combination_type", "merge")
        w.add_text(
            "README.md",
            "---\nlibrary_name: peft\ntags: [lora, brickwork]\n---\n"
            f"# Merged LoRA adapter ({kind})\n\nMade with brickwork {env['brickwork']} on "
            f"{env['created']} from:\n\n"
            + "".join(
                f"- `{k}` (sha256 `{v}`)\n" for k, v in (extra or {}).get("inputs", {}).items()
            )
            + f"\nrank {config.get('r')}, lora_alpha {config.get('lora_alpha')}.\n",
        )
    return out
