"""``brickwork.align(model_a, model_b)``: B's hidden units permuted onto A's."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from brickwork.align.spec import PermutationSpec, apply_permutations, permutation_spec
from brickwork.errors import AlignError, DataError, unknown_name

_METHODS = ("activation", "weight")  # permutations: B's function, LongTensor maps
_OTHER_METHODS = ("ot", "zip")  # transport / merge: float maps (see the docstring)


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    method: Literal["weight", "activation", "ot", "zip"] = "weight",
    data: Iterable[Any] | None = None,
    seed: int = 0,
    max_iter: int = 100,
    solver: str = "emd",
    reg: float = 0.01,
    spec: PermutationSpec | None = None,
    heads: bool = True,
    within_head: bool = True,
    residual: bool = False,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Permute the hidden units of ``model_b`` onto those of ``model_a``.

    Returns a new module (a copy of B with its units reordered; it computes the same function
    as B) and ``{group name: LongTensor}`` where new unit ``i`` of a group is B's unit
    ``perm[i]``. The groups come from :func:`brickwork.align.spec.permutation_spec`.

    ``method="weight"`` is Git Re-Basin weight matching (Ainsworth et al. 2023,
    arXiv:2209.04836): data-free coordinate descent, seeded by ``seed``, at most ``max_iter``
    passes. ``method="activation"`` is the same paper's activation matching and needs ``data``,
    an iterable of calibration batches. Neither input is modified.

    ``method="ot"`` is optimal-transport fusion's transport step (Singh & Jaggi 2020,
    :mod:`brickwork.align.ot_fusion`): B transported onto A's units, which may be fewer or
    more than B's (same layers, other widths); ``solver="emd"`` or ``"sinkhorn"`` (``reg``),
    weight-based without ``data``, activation-based with it. The maps are the transport plans
    ``{group: T (n_b × n_a)}``; with equal widths and EMD, ``n T`` is a permutation matrix and
    the result computes B's function, otherwise it is an approximation of B at A's widths.

    ``method="zip"`` is ZipIt! (Stoica et al. 2024, :mod:`brickwork.align.zipit`; needs
    ``data``). Zipping is a merge, not a permutation: the returned module is the *zipped model
    of A and B* (not a copy of B), and the maps are the merge matrices ``{group: M (n × 2n)}``.
    For more models, partial zipping or α / β use :func:`brickwork.align.zipit.zipit`.
    Hugging Face transformers are zipped by :func:`brickwork.align.zipit.zip_transformers`
    (residual stream, FFN units and heads; an approximate merge, full zipping only), and
    transported by OT over heads as blocks and FFN units (``heads`` and ``residual`` passed
    through; ``within_head`` does not apply: nested groups are not transported). ``spec=``
    is refused with ``"ot"`` and ``"zip"``, which derive their own groups.

    Hugging Face ``PreTrainedModel``s (BERT, GPT-2, Llama, Mistral, Qwen2), which torch.fx
    cannot trace, get :func:`brickwork.align.hf_spec.hf_permutation_spec` with ``heads``,
    ``within_head`` and ``residual`` passed through; ``spec=`` overrides either derivation."""
    if method not in _METHODS + _OTHER_METHODS:
        raise unknown_name("alignment method", method, sorted(_METHODS + _OTHER_METHODS))
    if spec is not None and method in _OTHER_METHODS:
        raise AlignError(
            f"spec= is used by method='weight' and 'activation' only; method='{method}' derives "
            "its own groups (fusion_spec). Drop spec=, or use method='weight' or 'activation'."
        )
    if method == "ot":
        from brickwork.align.ot_fusion import transport

        return transport(
            model_a, model_b, data=data, solver=solver, reg=reg, residual=residual, heads=heads
        )
    if method == "zip":
        from brickwork.align.zipit import zip_with_maps

        if data is None:
            raise DataError(
                "method='zip' needs calibration data: pass data=[batch, ...] (batches both "
                "models accept); ZipIt matches features by their correlations on it."
            )
        if _is_hf(model_a) or _is_hf(model_b):
            from brickwork.align.zipit import zip_transformers

            return zip_transformers([model_a, model_b], data, heads=heads)
        return zip_with_maps([model_a, model_b], data)
    options = {"heads": heads, "within_head": within_head, "residual": residual}
    spec = _common_spec(model_a, model_b, spec, options)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    if method == "weight":
        from brickwork.align.weight_matching import weight_matching

        perms = weight_matching(spec, sd_a, sd_b, seed=seed, max_iter=max_iter).perms
    else:
        if data is None:
            raise DataError(
                "method='activation' needs calibration data: pass data=[batch, ...] "
                "(batches both models accept), or use method='weight', which needs none."
            )
        from brickwork.align.activation_matching import activation_matching

        if _is_hf(model_b) or _nested_or_blocked(spec):
            from brickwork.align.hf_activation import feature_matching

            perms = feature_matching(spec, model_a, model_b, data)
        else:
            perms = activation_matching(spec, model_a, model_b, data)
    aligned = copy.deepcopy(model_b)
    aligned.load_state_dict(apply_permutations(sd_b, spec, perms))
    return aligned, perms


def _is_hf(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _nested_or_blocked(spec: PermutationSpec) -> bool:
    return any(g.parent or any(m.block > 1 for m in g.members) for g in spec.groups)


def _derive_spec(model: nn.Module, options: dict[str, bool]) -> PermutationSpec:
    if _is_hf(model):
        from brickwork.align.hf_spec import hf_permutation_spec

        return hf_permutation_spec(model.config, model.state_dict().keys(), **options)
    return permutation_spec(model)


def _common_spec(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec | None = None,
    options: dict[str, bool] | None = None,
) -> PermutationSpec:
    if spec is not None:
        spec_a = spec_b = spec
    else:
        spec_a, spec_b = _derive_spec(model_a, options or {}), _derive_spec(model_b, options or {})
    if spec_a != spec_b:
        raise AlignError(
            "models A and B have different permutation groups: A has "
            f"{[(g.name, g.size) for g in spec_a.groups]}, B has "
            f"{[(g.name, g.size) for g in spec_b.groups]}. Align two models of one architecture."
        )
    shapes_a = {k: tuple(v.shape) for k, v in model_a.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in model_b.state_dict().items()}
    if shapes_a != shapes_b:
        diff = sorted(
            k for k in shapes_a.keys() | shapes_b.keys() if shapes_a.get(k) != shapes_b.get(k)
        )
        raise AlignError(
            f"models A and B have different tensors: {', '.join(diff[:5])}"
            f"{' ...' if len(diff) > 5 else ''} differ in name or shape "
            f"(A: {[shapes_a.get(k) for k in diff[:5]]}, B: {[shapes_b.get(k) for k in diff[:5]]})."
        )
    return spec_a
