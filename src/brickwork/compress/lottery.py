"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding, over any ``nn.Module``.

Frankle & Carbin 2019, "The Lottery Ticket Hypothesis" (arXiv:1803.03635): train, prune the
``rate`` smallest-magnitude fraction of the *remaining* weights (20 % per round for fully
connected layers, the output layer at half that rate), reset the kept weights to their
initial values and train again; repeat. Frankle et al. 2020, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis" (arXiv:1912.05671): reset ("rewind") to the weights at training step
``k`` instead of step 0, which is what makes tickets appear in deeper networks.

What is pruned: by default the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` —
never biases, norms or embeddings (as in the papers). ``include=`` names other parameters.
The *output layer* is the last prunable parameter in ``model.named_parameters()`` order unless
``output=`` names it; it is pruned at ``output_rate`` (default ``rate / 2``).

Masks are applied to the weights and kept applied: :func:`mask_optimizer` hooks an optimiser
so that after every ``optimizer.step()`` the pruned weights are set back to exactly zero, and
before and after every step their gradients and every per-parameter optimiser state tensor
(SGD's momentum buffer, Adam's moments, ...) are zeroed at the pruned entries, so momentum
accumulated before pruning cannot move them and a saved optimiser state holds no stale values.

    ticket = find_ticket(model, train, rounds=7, rate=0.2, rewind_step=100, seed=0)
    sparse = ticket.model(7)             # rewound weights ⊙ round-7 mask, ready to train

where ``train(model, masks, callback)`` is the user's loop: it builds its optimiser, calls
``mask_optimizer(opt, masks, model)`` and ``callback(step)`` after every optimiser step
(``step`` = number of steps done); it may return anything (e.g. metrics), kept per round in
``ticket.results``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from brickwork.errors import IncompatibleModelsError, RecipeError, unknown_name

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(
    model: nn.Module, include: Iterable[str] | Callable[[str, nn.Parameter], bool] | None = None
) -> list[str]:
    """Names of the parameters that are pruned, in ``model.named_parameters()`` order.

    Default: the ``weight`` of every Linear / Conv layer. ``include`` is either a list of
    parameter names (each must exist) or a predicate ``(name, parameter) -> bool``.
    """
    params = dict(model.named_parameters())
    if include is None:
        chosen = {
            f"{mod_name}.weight" if mod_name else "weight"
            for mod_name, mod in model.named_modules()
            if isinstance(mod, _PRUNABLE) and isinstance(getattr(mod, "weight", None), nn.Parameter)
        }
        return [n for n in params if n in chosen]
    if callable(include):
        return [n for n, p in params.items() if include(n, p)]
    names = list(include)
    for n in names:
        if n not in params:
            raise unknown_name("parameter to prune (include=)", n, params)
    return [n for n in params if n in set(names)]


class Masks(Mapping[str, torch.Tensor]):
    """Boolean masks per parameter name (``True`` = kept), as produced by
    :func:`magnitude_masks`. Read-only mapping; masks are stored on the CPU."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self._masks = {n: m.detach().to("cpu", torch.bool).clone() for n, m in masks.items()}
        self._factors: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def dense(
        cls,
        model: nn.Module,
        include: Iterable[str] | Callable[[str, nn.Parameter], bool] | None = None,
    ) -> Masks:
        """All-``True`` masks over :func:`prunable_parameters` (round 0 of IMP)."""
        params = dict(model.named_parameters())
        return cls({n: torch.ones_like(params[n], dtype=torch.bool) for n in
                    prunable_parameters(model, include)})  # fmt: skip

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Masks({len(self)} tensors, {100 * self.density():.2f}% kept)"

    def kept(self) -> dict[str, int]:
        """Number of kept entries per parameter."""
        return {n: int(m.sum()) for n, m in self._masks.items()}

    def density(self, name: str | None = None) -> float:
        """Fraction of entries kept, over all masked parameters or for one ``name``."""
        masks = [self._masks[name]] if name is not None else list(self._masks.values())
        total = sum(m.numel() for m in masks)
        return sum(int(m.sum()) for m in masks) / total if total else 1.0

    def sparsity(self, name: str | None = None) -> float:
        """Fraction of entries pruned (``1 - density``)."""
        return 1.0 - self.density(name)

    def check(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's masked parameters; IncompatibleModelsError if names or shapes differ."""
        params = dict(model.named_parameters())
        for n, m in self._masks.items():
            if n not in params:
                raise unknown_name("masked parameter (not in the model)", n, params)
            if params[n].shape != m.shape:
                raise IncompatibleModelsError(
                    f"mask for '{n}' has shape {tuple(m.shape)} but the model's parameter has "
                    f"{tuple(params[n].shape)}; build the masks from this model's architecture."
                )
        return {n: params[n] for n in self._masks}

    def factor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The mask of ``name`` as 0/1 in ``like``'s dtype and device (cached: multiplying by
        it is much faster than ``masked_fill_`` on the CPU)."""
        key = (name, like.device, like.dtype)
        if key not in self._factors:
            self._factors[key] = self._masks[name].to(like.device, like.dtype)
        return self._factors[key]

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the pruned entries of ``model``'s parameters **in place**; returns ``model``."""
        for n, p in self.check(model).items():
            p.mul_(self.factor(n, p))
        return model


def _check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise RecipeError(
            f"{name} must be in [0, 1) (the fraction of the remaining weights pruned this "
            f"round), got {rate}; Frankle & Carbin use 0.2 for fully connected layers."
        )


def _output_name(names: list[str], output: str | None) -> str | None:
    if output is None:
        return names[-1] if names else None
    if output not in names:
        raise unknown_name("output layer parameter (output=, must be a pruned parameter)",
                           output, names)  # fmt: skip
    return output


def _prune_smallest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean (kept) over a flat vector of scores, dropping the ``n_prune`` smallest
    (ties broken by position, so the result is deterministic)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        order = torch.sort(scores, stable=True).indices
        keep[order[:n_prune]] = False
    return keep


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    rate: float = 0.2,
    *,
    scope: Literal["layer", "global"] = "layer",
    output_rate: float | None = None,
    current: Masks | None = None,
    include: Iterable[str] | Callable[[str, nn.Parameter], bool] | None = None,
    output: str | None = None,
) -> Masks:
    """One round of magnitude pruning: prune ``rate`` of the *remaining* (``current``) weights
    with the smallest ``|w|`` — per parameter (``scope="layer"``, Frankle & Carbin's LeNet and
    Conv-2/4/6) or over all parameters but the output layer together (``scope="global"``, their
    VGG/ResNet). The output layer (``output=``, default the last pruned parameter) is pruned on
    its own at ``output_rate`` (default ``rate / 2``). Per parameter, ``round(rate * remaining)``
    entries go, so after k rounds ``(1 - rate)^k`` is left up to rounding. ``include`` chooses
    the parameters only when ``current`` is not given (``current`` fixes them otherwise).
    Returns new Masks; ``model`` and ``current`` are not modified.
    """
    _check_rate("rate", rate)
    output_rate = rate / 2 if output_rate is None else output_rate
    _check_rate("output_rate", output_rate)
    if scope not in ("layer", "global"):
        raise unknown_name("pruning scope", str(scope), ("global", "layer"))
    current = current if current is not None else Masks.dense(model, include)
    params = current.check(model)
    names = list(current)
    out = _output_name(names, output)
    new: dict[str, torch.Tensor] = {}

    def layer(n: str, r: float) -> None:
        m = current[n].flatten()
        scores = params[n].detach().abs().flatten().cpu().float()[m]  # kept entries only
        keep = m.clone()
        keep[m] = _prune_smallest(scores, round(r * int(m.sum())))
        new[n] = keep.view_as(current[n])

    if out is not None:
        layer(out, output_rate)
    rest = [n for n in names if n != out]
    if scope == "layer":
        for n in rest:
            layer(n, rate)
    elif rest:
        flat_masks = [current[n].flatten() for n in rest]
        scores = torch.cat([params[n].detach().abs().flatten().cpu().float()[m]
                            for n, m in zip(rest, flat_masks)])  # fmt: skip
        keep_all = _prune_smallest(scores, round(rate * scores.numel()))
        start = 0
        for n, m in zip(rest, flat_masks):
            k = int(m.sum())
            keep = m.clone()
            keep[m] = keep_all[start : start + k]
            start += k
            new[n] = keep.view_as(current[n])
    return Masks({n: new[n] for n in names})


def random_masks(like: Masks, *, seed: int) -> Masks:
    """Random masks with exactly the per-parameter kept counts of ``like`` (the random-pruning
    control of Frankle & Carbin: same layer-wise sparsity, random positions)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in like.items():
        keep = torch.zeros(m.numel(), dtype=torch.bool)
        keep[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
        out[n] = keep.view_as(m)
    return Masks(out)


class MaskHandle:
    """Returned by :func:`mask_optimizer`; ``remove()`` detaches the hooks."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def mask_optimizer(optimizer: torch.optim.Optimizer, masks: Masks, model: nn.Module) -> MaskHandle:
    """Keep ``model``'s pruned weights at exactly zero while ``optimizer`` trains it.

    Before every ``optimizer.step()`` the gradients of the pruned entries are zeroed, and
    after it (and once now) the pruned entries of the parameters and of every optimiser state
    tensor of the parameter's shape (momentum buffer, Adam's ``exp_avg`` / ``exp_avg_sq``, ...)
    are zeroed, so that neither momentum nor weight decay can revive them. Works with LR schedulers (the
    optimiser itself is unchanged apart from the hooks). Also zeroes the pruned weights now.
    """
    params = masks.check(model)
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for n, p in params.items():
        if id(p) not in in_opt:
            raise IncompatibleModelsError(
                f"masked parameter '{n}' is not among the optimiser's parameters; build the "
                "optimiser on the same model that the masks are applied to."
            )
    pairs = [(p, masks.factor(n, p)) for n, p in params.items()]  # 0/1 in p's dtype

    @torch.no_grad()
    def zero_state() -> None:
        for p, m in pairs:
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(m if v.dtype == m.dtype else m.to(v.dtype))

    @torch.no_grad()
    def pre(*_: Any) -> None:
        for p, m in pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def post(*_: Any) -> None:
        for p, m in pairs:
            p.mul_(m)
        zero_state()

    post()
    return MaskHandle(
        [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
    )


def reinitialized(model: nn.Module, *, seed: int) -> nn.Module:
    """A copy of ``model`` with fresh random weights: ``reset_parameters()`` of every
    submodule that has one, under ``torch.manual_seed(seed)`` (the random re-initialisation
    control). The global RNG state is restored afterwards; ``model`` is not modified."""
    new = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in new.modules():
            reset = getattr(mod, "reset_parameters", None)
            if callable(reset):
                reset()
    return new


TrainFn = Callable[[nn.Module, Masks, Callable[[int], None]], Any]


@dataclass
class Ticket:
    """Result of :func:`find_ticket`. ``masks[r]`` is the mask trained in round r (``masks[0]``
    dense); ``rewind`` the weights at step ``rewind_step`` of the dense run (``init`` at step
    0); ``results[r]`` whatever ``train`` returned in round r."""

    masks: list[Masks]
    init: dict[str, torch.Tensor]
    rewind: dict[str, torch.Tensor]
    rewind_step: int
    results: list[Any] = field(default_factory=list)
    template: nn.Module | None = field(default=None, repr=False)

    def model(self, round: int = -1, *, weights: Mapping[str, torch.Tensor] | None = None):
        """A new model: ``weights`` (default the rewound ones) with ``masks[round]`` applied."""
        if self.template is None:
            raise RecipeError("this Ticket holds no model template (built without a model)")
        m = copy.deepcopy(self.template)
        m.load_state_dict(dict(self.rewind if weights is None else weights))
        return self.masks[round].apply_(m)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def find_ticket(
    model: nn.Module | Callable[[], nn.Module],
    train: TrainFn,
    *,
    rounds: int,
    rate: float = 0.2,
    rewind_step: int = 0,
    scope: Literal["layer", "global"] = "layer",
    output_rate: float | None = None,
    include: Iterable[str] | Callable[[str, nn.Parameter], bool] | None = None,
    output: str | None = None,
    seed: int | None = None,
    on_round: Callable[[int, Masks, nn.Module], None] | None = None,
) -> Ticket:
    """Iterative magnitude pruning with rewinding (Frankle et al. 2020).

    Round 0 trains the dense network from its initialisation θ₀ and records θ_k, its weights
    after ``rewind_step`` optimiser steps (reported by ``train`` through ``callback(step)``).
    Each round r = 1..``rounds`` prunes ``rate`` of the remaining weights of the previous
    round's *trained* weights (:func:`magnitude_masks`), rewinds the kept weights to θ_k
    (pruned ones zero) and trains again. ``train(model, masks, callback)`` must train in place,
    re-applying the masks after every optimiser step (:func:`mask_optimizer`) and calling
    ``callback(step)`` after each; the callback re-applies the masks as well. ``seed`` seeds the
    global RNG before each round (``seed + r``), restoring it afterwards. ``on_round(r, masks,
    trained_model)`` is called after each round's training. ``model`` (a module, copied, or a
    zero-argument factory) is not modified.
    """
    if rounds < 0:
        raise RecipeError(f"rounds must be >= 0, got {rounds}")
    if rewind_step < 0:
        raise RecipeError(f"rewind_step must be >= 0, got {rewind_step}")
    _check_rate("rate", rate)
    work = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
    template = copy.deepcopy(work)
    masks = Masks.dense(work, include)
    init = _state(work)
    rewound: dict[str, torch.Tensor] | None = init if rewind_step == 0 else None
    ticket = Ticket(masks=[], init=init, rewind={}, rewind_step=rewind_step, template=template)

    for r in range(rounds + 1):
        if r > 0:
            masks = magnitude_masks(work, rate, scope=scope, output_rate=output_rate,
                                    current=masks, output=output)  # fmt: skip
            work.load_state_dict(ticket.rewind)
        masks.apply_(work)

        def callback(step: int, _r: int = r, _masks: Masks = masks) -> None:
            nonlocal rewound
            _masks.apply_(work)
            if _r == 0 and step == rewind_step and rewound is None:
                rewound = _state(work)

        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed + r)
            result = train(work, masks, callback)
        if rewound is None:
            raise RecipeError(
                f"rewind_step={rewind_step} but the dense round never reported that step: "
                "train(model, masks, callback) must call callback(step) after every optimiser "
                "step and train for at least rewind_step steps."
            )
        ticket.rewind = rewound
        masks.apply_(work)
        ticket.masks.append(masks)
        ticket.results.append(result)
        if on_round is not None:
            on_round(r, masks, work)
    return ticket
