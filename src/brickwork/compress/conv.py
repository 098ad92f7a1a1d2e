"""Tucker-2 and CP factorisation of 2-D convolutions, through TensorLy (imported lazily).

A ``Conv2d`` with kernel ``K`` of shape ``(out, in, kh, kw)`` becomes a sequence of smaller
convolutions:

- **Tucker-2** (Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for
  Fast and Low Power Mobile Applications", arXiv:1511.06530): ``K ≈ G ×₀ U_out ×₁ U_in``
  with core ``G`` ``(R_out, R_in, kh, kw)`` → ``1×1 conv in→R_in`` (weight ``U_inᵀ``),
  ``kh×kw conv R_in→R_out`` (weight ``G``; the original stride / padding / dilation), ``1×1
  conv R_out→out`` (weight ``U_out``, the original bias). At ``rank=(out, in)`` the
  factors are square orthogonal and the sequence computes the original conv exactly.
- **CP** (Lebedev et al. 2015, "Speeding-up Convolutional Neural Networks Using
  Fine-tuned CP-Decomposition", arXiv:1412.6553): ``K ≈ Σ_r λ_r a_r ⊗ b_r ⊗ c_r ⊗ d_r``
  → ``1×1 in→R`` (``b``), depthwise ``kh×1`` (``c``), depthwise ``1×kw`` (``d``), ``1×1
  R→out`` (``λ a``, the bias). The sequence computes exactly the conv whose kernel is the
  CP reconstruction; how close that is to ``K`` depends on the rank (ALS, ``parafac``).

Only ``groups=1`` convolutions with zero padding mode are factorised; others are refused by
name. ``padding_mode="zeros"`` lets the padding be split between the two depthwise convs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import RecipeError

CONV_METHODS = ("tucker", "cp")


def _tensorly():
    try:
        import tensorly as tl
    except ImportError:
        raise RecipeError(
            "Tucker / CP factorisation needs TensorLy: pip install 'brickwork[compress]'."
        ) from None
    tl.set_backend("pytorch")
    return tl


def _check(path: str, conv: nn.Conv2d) -> None:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise RecipeError(
            f"conv '{path}': groups={conv.groups}, padding={conv.padding!r}, padding_mode="
            f"'{conv.padding_mode}'; only groups=1 convs with numeric zero padding are "
            "factorised. Exclude it (include= other paths)."
        )


def _tucker2(conv: nn.Conv2d, rank: tuple[int, int]) -> nn.Sequential:
    from tensorly.decomposition import partial_tucker

    _tensorly()
    w = conv.weight.detach().to(torch.float64)  # (out, in, kh, kw)
    (core, (u_out, u_in)), _ = partial_tucker(w, rank=list(rank), modes=[0, 1], init="svd")
    r_out, r_in = core.shape[0], core.shape[1]
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
    mid = nn.Conv2d(
        r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=False,
    )  # fmt: skip
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)
    dt = conv.weight.dtype
    with torch.no_grad():
        first.weight.copy_(u_in.T[:, :, None, None].to(dt))  # (r_in, in, 1, 1)
        mid.weight.copy_(core.to(dt))  # (r_out, r_in, kh, kw)
        last.weight.copy_(u_out[:, :, None, None].to(dt))  # (out, r_out, 1, 1)
        if conv.bias is not None:
            last.bias.copy_(conv.bias)
    return nn.Sequential(first, mid, last)


def _cp(conv: nn.Conv2d, rank: int, seed: int) -> nn.Sequential:
    from tensorly.decomposition import parafac

    _tensorly()
    w = conv.weight.detach().to(torch.float64)  # (out, in, kh, kw)
    weights, (a, b, c, d) = parafac(
        w, rank=rank, init="random", random_state=seed, n_iter_max=500, tol=1e-12
    )  # (R,), (out, R), (in, R), (kh, R), (kw, R)
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    first = nn.Conv2d(conv.in_channels, rank, 1, bias=False)
    vert = nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                     groups=rank, bias=False)  # fmt: skip
    horiz = nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                      groups=rank, bias=False)  # fmt: skip
    last = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
    dt = conv.weight.dtype
    with torch.no_grad():
        first.weight.copy_(b.T[:, :, None, None].to(dt))  # (R, in, 1, 1)
        vert.weight.copy_(c.T[:, None, :, None].to(dt))  # (R, 1, kh, 1)
        horiz.weight.copy_(d.T[:, None, None, :].to(dt))  # (R, 1, 1, kw)
        last.weight.copy_((a * weights)[:, :, None, None].to(dt))  # (out, R, 1, 1)
        if conv.bias is not None:
            last.bias.copy_(conv.bias)
    return nn.Sequential(first, vert, horiz, last)


def factorize_conv(
    module: nn.Module,
    *,
    method: str = "tucker",
    rank: int | float | tuple[int, int] | str = "full",
    include: Sequence[str] | None = None,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``module`` whose ``Conv2d`` s are replaced by their Tucker-2 / CP sequence.

    ``rank``: Tucker: ``(R_out, R_in)``, one int for both (capped at the channel counts),
    a float in (0, 1] for that fraction of each channel count, or ``"full"``; CP: an int
    ``R`` (``"full"``: ``min(out·in, in·kh·kw, out·kh·kw)``, which bounds the CP rank).
    ``include``: module paths to factorise (default: every ``Conv2d``); ``module`` itself
    is not changed. CP is fitted by ALS from a ``seed``-ed random start."""
    from ..route.format import replace_module

    if method not in CONV_METHODS:
        raise RecipeError(f"unknown conv factorisation '{method}'; known: tucker, cp")
    new = copy.deepcopy(module)
    convs = {n: m for n, m in new.named_modules() if isinstance(m, nn.Conv2d)}
    if include is not None:
        missing = [p for p in include if p not in convs]
        if missing:
            raise RecipeError(
                f"'{missing[0]}' is not a Conv2d of {type(module).__name__}; convs: "
                f"{', '.join(convs) or 'none'}."
            )
        convs = {n: convs[n] for n in include}
    if not convs:
        raise RecipeError(f"{type(module).__name__} has no Conv2d to factorise.")
    for path, conv in convs.items():
        _check(path, conv)
        o, i, kh, kw = conv.weight.shape
        if method == "tucker":
            if rank == "full":
                r = (o, i)
            elif isinstance(rank, float):
                if not 0 < rank <= 1:
                    raise RecipeError(f"rank fraction must be in (0, 1], got {rank}")
                r = (max(1, round(rank * o)), max(1, round(rank * i)))
            elif isinstance(rank, int):
                r = (min(rank, o), min(rank, i))
            else:
                r = tuple(rank)
            if not (1 <= r[0] <= o and 1 <= r[1] <= i):
                raise RecipeError(
                    f"conv '{path}': Tucker rank {r} outside 1..({o}, {i}) (out, in channels)."
                )
            seq = _tucker2(conv, r)
        else:
            r = min(o * i, i * kh * kw, o * kh * kw) if rank == "full" else rank
            if not isinstance(r, int) or r < 1:
                raise RecipeError(f"conv '{path}': CP rank must be a positive int, got {rank!r}")
            seq = _cp(conv, r, seed)
        new = replace_module(new, path, seq)
    return new
