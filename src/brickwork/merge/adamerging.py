"""AdaMerging: merging coefficients learned by entropy minimisation on unlabelled inputs.

Yang, Wang, Shen, Liu, Guo, Wang, Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024, arXiv:2310.02575. Module level (it needs a forward pass), unlike the
streaming tensor-level methods in ``methods/``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..errors import IncompatibleModelsError, MergeComputationError, RecipeError

__all__ = ["adamerging"]


def adamerging(
    base: nn.Module,
    models: Sequence[nn.Module],
    data: Sequence[Iterable[Any]],
    *,
    mode: Literal["task", "layer"] = "layer",
    init: float = 0.3,
    steps: int = 100,
    lr: float = 1e-3,
    clamp: tuple[float, float] = (0.0, 1.0),
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    heads: Sequence[Callable[[Any], torch.Tensor]] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Merge ``models`` into ``base`` with coefficients learned by entropy minimisation.

    AdaMerging (Yang et al., ICLR 2024, arXiv:2310.02575). The merged parameters are

        θ^(l) = θ_base^(l) + Σ_i λ_i^(l) τ_i^(l),     τ_i = θ_i − θ_base,

    and the coefficients λ minimise the mean over tasks i of the Shannon entropy
    H(softmax(logits)) of the merged model's predictions on unlabelled batches of task i
    (test-time adaptation: no labels are used).

    What is learned:

    - ``mode="layer"`` (layer-wise AdaMerging, the paper's best): one λ per task per parameter
      tensor (a "layer" is one entry of ``base.named_parameters()``, weight and bias apart, as in
      the authors' code and FusionBench's ``LayerWiseMergedModel``; tied tensors count once);
    - ``mode="task"`` (task-wise AdaMerging): one λ per task, shared by every tensor.

    Every λ starts at ``init`` (0.3, the paper's) and is optimised with Adam (``lr`` 1e-3,
    betas (0.9, 0.999): the paper's) for ``steps`` steps; after each step λ is projected onto
    ``clamp`` (default [0, 1]). Each step takes the next batch of every task (``data[i]``
    cycles: a list or a DataLoader is iterated again when it ends).

    Args:
        base: the pretrained model θ_base (also the architecture of the result).
        models: the fine-tuned models θ_i, same parameter names and shapes as ``base``.
        data: ``data[i]`` is a re-iterable of unlabelled batches of task i. A dict batch is fed
            as ``model(**batch)``, a tuple/list as ``model(*batch)``, anything else as
            ``model(batch)``; tensors in it are moved to the base's device.
        mode: ``"layer"`` or ``"task"``.
        init: the initial value of every λ.
        steps: Adam steps (the paper runs 500; 100 is a CPU-friendly default).
        lr: Adam's learning rate.
        clamp: (low, high) bounds of every λ.
        logits_fn: maps the model's output (after ``heads[i]``) to logits; default: the output if
            it is a tensor, else ``output.logits`` (or ``output["logits"]``). Logits of shape
            (..., classes); with an ``attention_mask`` of shape (...) in a dict batch (causal
            LM: logits (batch, tokens, vocab)), padding positions are left out of the mean.
        heads: ``heads[i]`` maps the model output to task i's logits (fixed per-task
            classification heads, as in the paper's CLIP setting). Never trained.
        seed: seeds torch's RNG inside (shuffling DataLoaders); the caller's RNG state is
            restored afterwards.
        progress: show a progress bar.

    Returns:
        ``(merged, report)``: ``merged`` is a new module (a deep copy of ``base`` holding the
        merged weights; ``base`` and ``models`` are never modified, nor their ``.grad``);
        ``report`` holds ``lambdas`` (per task: a float in task mode, a dict tensor name → λ in
        layer mode), ``layers`` (the tensor names, in order), ``loss`` (mean entropy over tasks
        at each step, before its update), ``seconds``, ``steps`` and the settings.

    Raises:
        RecipeError: ``len(data) != len(models)`` (or heads), an iterable with no batches, a bad
            ``mode`` / ``steps`` / ``lr`` / ``clamp``, ``init`` outside ``clamp``.
        IncompatibleModelsError: a parameter missing, extra or of another shape in a model
            (named, with both shapes), a non-floating-point parameter.
        MergeComputationError: an output with no logits, a loss that is not finite or does
            not depend on λ.

    Memory: the task vectors once (one copy of the weights per model, in the base's dtype and
    device), plus one copy of ``base`` that becomes the result; the models are not copied.

    Differences from the paper and its code (and FusionBench): λ is *projected* onto ``clamp``
    after each step, where they keep an unbounded λ and clamp it in the forward pass (a λ that
    crosses a bound there gets no more gradient and stays out); the loss is the *mean* over tasks
    (theirs the sum: the same Adam steps up to Adam's ε); entropy is computed with
    ``log_softmax`` (FusionBench: ``log(p + 1e-8)``); one batch per task per step (the authors'
    script: two of 16); the merged model runs in eval mode (no dropout, batch-norm running
    statistics neither used from the batch nor updated); every floating-point parameter is merged,
    whether or not it ``requires_grad`` (FusionBench keeps the base's frozen ones); buffers come
    from ``base``.
    """
    models = list(models)
    data = list(data)
    _check_options(models, data, mode=mode, init=init, steps=steps, lr=lr, clamp=clamp, heads=heads)
    names, base_params, task_vectors = _task_vectors(base, models)
    device = base_params[0].device if base_params else torch.device("cpu")
    n_tasks, n_layers = len(models), len(names)
    low, high = float(clamp[0]), float(clamp[1])
    shape = (n_tasks, n_layers) if mode == "layer" else (n_tasks,)
    # float64: a handful of numbers, and the bounds hold exactly as the caller wrote them
    lam = torch.full(shape, float(init), dtype=torch.float64, device=device)
    lam.requires_grad_(True)
    optimizer = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999))
    # One copy of base: functional_call runs it with the merged tensors in eval mode, and it
    # becomes the result (its own parameters are overwritten at the end).
    module = copy.deepcopy(base)
    modes = {n: m.training for n, m in module.named_modules()}
    module.eval()
    head_fns = [_frozen(h) for h in heads] if heads is not None else None
    get_logits = logits_fn or _default_logits
    losses: list[float] = []
    start = time.perf_counter()
    devices = [device.index or 0] if device.type == "cuda" else []
    # enable_grad: a caller's torch.no_grad() must not silently stop the adaptation
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        batches = [_cycle(d, i) for i, d in enumerate(data)]
        for it in batches:  # an empty iterable fails before any step
            it.peek()
        bar = _bar(steps, progress)
        for step in range(steps):
            params = _merged(lam, mode, names, base_params, task_vectors)
            loss = torch.zeros((), device=device)
            for i in range(n_tasks):
                batch = _to_device(next(batches[i]), device)
                out = _call(module, params, batch)
                if head_fns is not None:
                    out = head_fns[i](out)
                loss = loss + _entropy(_logits(get_logits, out, i), batch, i)
            loss = loss / n_tasks  # mean entropy over tasks
            lam.grad = _gradient(loss, lam, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                lam.clamp_(low, high)  # projected onto the bounds
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
    seconds = time.perf_counter() - start
    lam = lam.detach()
    with torch.no_grad():
        final = _merged(lam, mode, names, base_params, task_vectors)
        own = dict(module.named_parameters())
        for name in names:
            own[name].copy_(final[name])
    for n, m in module.named_modules():
        m.training = modes[n]
    return module, _report(lam, mode, names, losses, seconds, steps, init, lr, clamp, seed)


def _gradient(loss: torch.Tensor, lam: torch.Tensor, step: int) -> torch.Tensor:
    """∂loss/∂λ by ``autograd.grad``, which touches no module's ``.grad``."""
    if not torch.isfinite(loss):
        raise MergeComputationError(
            f"adamerging: the entropy became {loss.item()} at step {step}; lower lr or check the "
            "model's outputs for inf/nan."
        )
    grad = torch.autograd.grad(loss, [lam], allow_unused=True)[0] if loss.requires_grad else None
    if grad is None:
        raise MergeComputationError(
            "adamerging: the entropy does not depend on the merged weights (no gradient reaches "
            "λ); logits_fn and heads must compute the logits from the model's output, with "
            "gradients enabled (not under torch.no_grad or .detach())."
        )
    return grad


def _check_options(
    models: list[nn.Module],
    data: list[Iterable[Any]],
    *,
    mode: str,
    init: float,
    steps: int,
    lr: float,
    clamp: tuple[float, float],
    heads: Sequence[Any] | None,
) -> None:
    if not models:
        raise RecipeError("adamerging: models is empty; give at least one fine-tuned model.")
    if len(data) != len(models):
        raise RecipeError(
            f"adamerging: data has {len(data)} entries for {len(models)} models; give one "
            "iterable of unlabelled batches per model (task), in the order of models."
        )
    if heads is not None and len(heads) != len(models):
        raise RecipeError(
            f"adamerging: heads has {len(heads)} entries for {len(models)} models; give one "
            "head per model (task), or none."
        )
    if mode not in ("task", "layer"):
        raise RecipeError(f"adamerging: mode must be 'task' or 'layer', got {mode!r}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise RecipeError(f"adamerging: steps must be an integer >= 0, got {steps!r}.")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise RecipeError(f"adamerging: lr must be a finite number > 0, got {lr!r}.")
    if len(clamp) != 2 or not float(clamp[0]) <= float(clamp[1]):
        raise RecipeError(f"adamerging: clamp must be (low, high) with low <= high, got {clamp!r}.")
    if not float(clamp[0]) <= float(init) <= float(clamp[1]):
        raise RecipeError(
            f"adamerging: init must lie in clamp {tuple(clamp)}, got {init!r}; widen clamp or "
            "change init."
        )


def _task_vectors(
    base: nn.Module, models: list[nn.Module]
) -> tuple[list[str], list[torch.Tensor], list[list[torch.Tensor]]]:
    """Names, detached base tensors and task vectors τ_i = θ_i − θ_base (one copy each)."""
    base_named = list(base.named_parameters())
    for name, p in base_named:
        if not p.is_floating_point():
            raise IncompatibleModelsError(
                f"adamerging: base parameter '{name}' has dtype {p.dtype}; AdaMerging learns "
                "coefficients by gradient and needs floating-point parameters."
            )
    names = [n for n, _ in base_named]
    if not names:
        raise IncompatibleModelsError(
            "adamerging: base has no parameters; there is nothing to merge."
        )
    base_params = [p.detach() for _, p in base_named]
    task_vectors: list[list[torch.Tensor]] = []
    for i, m in enumerate(models):
        other = dict(m.named_parameters())
        for name, p in base_named:
            q = other.get(name)
            if q is None:
                raise IncompatibleModelsError(
                    f"adamerging: models[{i}] has no parameter '{name}' (base shape "
                    f"{tuple(p.shape)}); all models must share the base's architecture."
                )
            if q.shape != p.shape:
                raise IncompatibleModelsError(
                    f"adamerging: parameter '{name}' has shape {tuple(q.shape)} in models[{i}] "
                    f"and {tuple(p.shape)} in base; all models must share the base's architecture."
                )
            if not q.is_floating_point():
                raise IncompatibleModelsError(
                    f"adamerging: models[{i}] parameter '{name}' has dtype {q.dtype}; "
                    "floating-point parameters are needed."
                )
        extra = sorted(set(other) - set(names))
        if extra:
            raise IncompatibleModelsError(
                f"adamerging: models[{i}] has parameter '{extra[0]}' that base lacks; all models "
                "must share the base's architecture."
            )
        with torch.no_grad():
            task_vectors.append(
                [other[n].detach().to(p.device, p.dtype) - p for n, p in zip(names, base_params)]
            )
    return names, base_params, task_vectors


def _merged(
    lam: torch.Tensor,
    mode: str,
    names: list[str],
    base_params: list[torch.Tensor],
    task_vectors: list[list[torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """θ^(l) = θ_base^(l) + Σ_i λ_i^(l) τ_i^(l), differentiable in λ."""
    out = {}
    for j, (name, p) in enumerate(zip(names, base_params)):
        acc = p
        for i, tv in enumerate(task_vectors):
            w = lam[i, j] if mode == "layer" else lam[i]  # scalar
            acc = acc + w.to(p.dtype) * tv[j]
        out[name] = acc
    return out


def _call(module: nn.Module, params: Mapping[str, torch.Tensor], batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return torch.func.functional_call(module, dict(params), args=(), kwargs=dict(batch))
    if isinstance(batch, tuple | list):
        return torch.func.functional_call(module, dict(params), args=tuple(batch))
    return torch.func.functional_call(module, dict(params), args=(batch,))


def _frozen(head: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """A head whose parameters get no gradient (so their ``.grad`` is never touched)."""
    if not isinstance(head, nn.Module):
        return head
    params = {n: p.detach() for n, p in head.named_parameters()}
    return lambda out: torch.func.functional_call(head, params, args=(out,))


def _default_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    return logits


def _logits(fn: Callable[[Any], torch.Tensor], out: Any, i: int) -> torch.Tensor:
    logits = fn(out)
    if not isinstance(logits, torch.Tensor):
        raise MergeComputationError(
            f"adamerging: the model's output on data[{i}] is a {type(out).__name__} with no "
            "logits (neither a tensor nor an object with .logits); pass logits_fn= (output → "
            "logits) or heads= (one classification head per task)."
        )
    if logits.dim() == 0 or not logits.is_floating_point():
        raise MergeComputationError(
            f"adamerging: logits on data[{i}] must be a floating-point tensor of shape "
            f"(..., classes), got shape {tuple(logits.shape)} and dtype {logits.dtype}."
        )
    return logits


def _entropy(logits: torch.Tensor, batch: Any, i: int) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over all positions (padding left out)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., classes)
    h = -(logp.exp() * logp).sum(-1)  # (...)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.shape == h.shape:
        m = mask.to(h.dtype)
        if m.sum() == 0:
            raise MergeComputationError(
                f"adamerging: a batch of data[{i}] has an attention_mask with no tokens."
            )
        return (h * m).sum() / m.sum()
    return h.mean()


class _cycle(Iterator[Any]):
    """Cycles over a re-iterable; errors clearly when it yields nothing."""

    def __init__(self, source: Iterable[Any], index: int) -> None:
        self.source, self.index, self.seen = source, index, 0
        self.it = iter(source)
        self.head: list[Any] = []

    def peek(self) -> None:
        if not self.head:
            self.head.append(next(self))

    def __next__(self) -> Any:
        if self.head:
            return self.head.pop()
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.source)
            try:
                batch = next(self.it)
            except StopIteration:
                after = (
                    f" after {self.seen} batches: an iterator or generator runs only once; pass a "
                    "list or a DataLoader"
                    if self.seen
                    else ""
                )
                raise RecipeError(
                    f"adamerging: data[{self.index}] yielded no batches{after}. Give each task a "
                    "re-iterable of unlabelled batches."
                ) from None
        self.seen += 1
        return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _bar(steps: int, progress: bool) -> Any:
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="adamerging", unit="step")


def _report(
    lam: torch.Tensor,
    mode: str,
    names: list[str],
    losses: list[float],
    seconds: float,
    steps: int,
    init: float,
    lr: float,
    clamp: tuple[float, float],
    seed: int,
) -> dict[str, Any]:
    values = lam.cpu().tolist()
    if mode == "layer":
        lambdas: list[Any] = [dict(zip(names, row)) for row in values]
    else:
        lambdas = values
    return {
        "method": "adamerging",
        "mode": mode,
        "lambdas": lambdas,
        "layers": names,
        "loss": losses,
        "seconds": seconds,
        "steps": steps,
        "init": init,
        "lr": lr,
        "clamp": [float(clamp[0]), float(clamp[1])],
        "seed": seed,
        "reference": "Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task "
        "Learning, ICLR 2024, arXiv:2310.02575",
    }
