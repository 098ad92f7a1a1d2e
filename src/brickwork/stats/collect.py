"""The one statistics collector: run a module over calibration batches and measure, per
weight tensor name, what data-aware methods need (DESIGN.md "Statistics").

* **gram** — the input Gram matrix ``XᵀX`` (summed, float64 while accumulating) of every
  ``nn.Linear`` and Hugging Face ``Conv1D`` (GPT-2; its weight is ``(in, out)``, the
  transpose of ``nn.Linear``'s), with the number of rows ``n`` so that the mean ``XᵀX / n``
  can be formed. Rows are tokens; padding tokens (``attention_mask == 0``) are left out.
  A linear layer whose weight is tied to another parameter (an LM head tied to the input
  embedding) gets none: its tensor is not a free linear map.
* **fisher** — the diagonal Fisher information of every parameter,
  ``F = 1/N Σ_n (∇_θ log p(y_n | x_n))²``, **per example**: one gradient per example,
  squared, then averaged. ``estimate`` says where ``y`` comes from:

  - ``"sampled"`` (default, the *true* Fisher): ``y ~ p(· | x)`` drawn from the model's own
    predictive distribution (a seeded generator); for token outputs one token per
    non-padding position, and ``log p(y | x)`` sums over them;
  - ``"exact"`` (classifiers, logits ``(batch, classes)``): the expectation over the label
    set in closed form, ``Σ_c p(c | x) (∇ log p(c | x))²`` (one gradient per class);
  - ``"empirical"``: ``y`` = the batch's ``labels`` (causal LMs: shifted by one, ``-100``
    ignored).

  FusionBench's ``fisher_merging`` and the original Bloomberg RegMean/Fisher code square the
  gradient of a whole batch's summed log-likelihood, ``(Σ_n ∇ log p_n)²``, which is not the
  per-example diagonal ``Σ_n (∇ log p_n)²`` (the cross terms between examples do not vanish);
  brickwork computes the latter, with a loop over examples (one forward and backward pass
  per example: ``vmap`` over a batch would hold batch × parameter-count gradients at once).

Memory while collecting: the model, one example's activations and gradients, and one
float64 ``(in, in)`` accumulator per linear layer (a merge later reads them one at a time).

The module is never modified: hooks are removed, the train/eval mode is restored, and
gradients are taken with :func:`torch.func.functional_call` on detached copies of the
parameters (``.grad`` and ``requires_grad`` of the module stay as they were).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import DataError

FisherEstimate = Literal["sampled", "exact", "empirical"]


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and relatives): ``y = x @ W + b``, ``W`` (in, out)."""
    return type(module).__name__ == "Conv1D" and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


def linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """``{weight tensor name: (module, input axis of the weight)}`` for every ``nn.Linear``
    (weight ``(out, in)``: axis 1) and ``Conv1D`` (weight ``(in, out)``: axis 0), leaving out
    those whose weight is shared with another parameter (tied heads)."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    out: dict[str, tuple[nn.Module, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            axis = 1
        elif _is_conv1d(mod):
            axis = 0
        else:
            continue
        if owners.get(id(mod.weight), 0) > 1:
            continue
        out[f"{name}.weight" if name else "weight"] = (mod, axis)
    return out


@dataclass
class Gram:
    """``XᵀX`` summed over ``rows`` input rows of one linear layer (``(in, in)``)."""

    sum: torch.Tensor
    rows: int = 0
    input_axis: int = 1

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


@dataclass
class _Mask:
    current: torch.Tensor | None = None  # (batch, tokens) of the batch being run


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The non-padding rows of a linear layer's input ``x``: ``(rows, in)``."""
    if mask is not None:
        m = mask.to(device=x.device).bool()
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):  # (batch, tokens, in)
            return x[m]
        if x.dim() == 2 and x.shape[0] == m.numel():  # (batch * tokens, in), flattened
            return x[m.reshape(-1)]
    return x.reshape(-1, x.shape[-1])  # pooled inputs (batch, in) and masks of other shapes


def batch_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        return m if isinstance(m, torch.Tensor) else None
    return None


def call(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _forward(model: nn.Module, batch: Any, where: str, i: int) -> Any:
    try:
        return call(model, batch)
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        keys = (
            ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if hasattr(v, "shape"))
            if isinstance(batch, Mapping)
            else type(batch).__name__
        )
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise DataError(
            f"{where}: the model's forward pass failed on calibration batch {i} ({keys}): "
            f"{first}. Give inputs that fit the model: token ids below its vocabulary size, "
            "the input names its forward() takes, sequences no longer than its positions."
        ) from None


class StopForward(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a hook to end a forward pass early; :func:`collect_gram` catches it."""


def collect_gram(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    where: str = "model",
    only: set[str] | None = None,
) -> dict[str, Gram]:
    """Input Gram matrices of every linear layer of ``model`` (those named in ``only``)
    over ``batches``, padding masked via each batch's ``attention_mask``; ``where`` names
    the model in errors. A hook may end a forward pass early with :class:`StopForward`."""
    layers = linear_modules(model)
    if only is not None:
        layers = {k: v for k, v in layers.items() if k in only}
    grams = {
        name: Gram(torch.zeros(m.weight.shape[axis], m.weight.shape[axis], dtype=torch.float64),
                   input_axis=axis)
        for name, (m, axis) in layers.items()
    }  # fmt: skip
    mask = _Mask()

    def hook(name: str) -> Callable[..., None]:
        def run(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = _rows(args[0].detach(), mask.current).to(torch.float64)  # (rows, in)
            g = grams[name]
            g.sum += (x.T @ x).cpu()
            g.rows += x.shape[0]

        return run

    # prepended: a hook that ends the pass after a layer (StopForward) runs after these
    handles = [m.register_forward_hook(hook(name), prepend=True) for name, (m, _) in layers.items()]
    try:
        with _eval(model), torch.no_grad():
            for i, batch in enumerate(batches):
                mask.current = batch_mask(batch)
                with contextlib.suppress(StopForward):
                    _forward(model, batch, where, i)
    finally:
        for h in handles:
            h.remove()
    return grams


# -- Fisher ---------------------------------------------------------------------------------


def _default_logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, torch.Tensor):
        logits = out
    if logits is None and isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise DataError(
            f"the model's output ({type(out).__name__}) has no logits, so log p(y|x) is not "
            "defined: load the model with its head (AutoModelForSequenceClassification, "
            "AutoModelForCausalLM, ...) or pass logits_fn= to turn outputs into logits."
        )
    return logits


def _is_causal(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return type(model).__name__.endswith("LMHeadModel") or type(model).__name__.endswith(
        "ForCausalLM"
    ) or bool(getattr(cfg, "is_decoder", False))  # fmt: skip


def _examples(batch: Any) -> Iterator[Any]:
    """One example at a time (a batch of one) from a mapping, tuple or tensor batch."""
    if isinstance(batch, Mapping):
        n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        for j in range(n):
            yield {k: v[j : j + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    elif isinstance(batch, tuple):
        n = next(v.shape[0] for v in batch if isinstance(v, torch.Tensor))
        for j in range(n):
            yield tuple(v[j : j + 1] if isinstance(v, torch.Tensor) else v for v in batch)
    else:
        for j in range(batch.shape[0]):
            yield batch[j : j + 1]


@dataclass
class Fisher:
    """Diagonal Fisher per parameter name, averaged over ``examples``."""

    values: dict[str, torch.Tensor]
    examples: int
    estimate: str
    norm: float = field(default=0.0)  # L2 norm over every parameter's Fisher


def _log_likelihoods(
    model: nn.Module,
    logits: torch.Tensor,
    example: Any,
    estimate: str,
    generator: torch.Generator,
    where: str,
) -> list[tuple[float, torch.Tensor]]:
    """``[(weight, log p(y | x))]`` for one example: one term (sampled, empirical) or one per
    class (exact, weighted by the class's probability)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logp.dim() == 2:  # (1, classes): a classifier
        if estimate == "exact":
            probs = logp.detach().exp()[0]
            return [(probs[c].item(), logp[0, c]) for c in range(logp.shape[-1])]
        if estimate == "sampled":
            y = torch.multinomial(logp.detach().exp()[0].cpu(), 1, generator=generator)
            return [(1.0, logp[0, y.item()])]
        labels = example.get("labels") if isinstance(example, Mapping) else None
        if labels is None:
            raise DataError(
                f"{where}: the empirical Fisher needs 'labels' in every calibration batch; "
                "none were given. Add labels, or use the true Fisher (sampled or exact)."
            )
        return [(1.0, logp[0, int(labels.reshape(-1)[0])])]
    if logp.dim() != 3:
        raise DataError(
            f"{where}: logits of shape {tuple(logits.shape)}; expected (batch, classes) or "
            "(batch, tokens, vocabulary). Pass logits_fn= to select them."
        )
    mask = batch_mask(example)
    mask = torch.ones(logp.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    mask = mask.to(logp.device)
    if estimate == "exact":
        raise DataError(
            f"{where}: the exact Fisher sums over every label sequence, which is not tractable "
            "for token outputs; use fisher_estimate 'sampled' (the default) or 'empirical'."
        )
    if estimate == "sampled":
        flat = logp.detach().exp().reshape(-1, logp.shape[-1]).cpu()  # (tokens, vocabulary)
        y = torch.multinomial(flat, 1, generator=generator).reshape(logp.shape[:2])
        picked = logp.gather(-1, y.to(logp.device)[..., None])[..., 0]  # (1, tokens)
        return [(1.0, picked[mask].sum())]
    labels = example.get("labels") if isinstance(example, Mapping) else None
    if labels is None:
        raise DataError(
            f"{where}: the empirical Fisher needs 'labels' in every calibration batch; none "
            "were given. Add labels, or use the true Fisher (fisher_estimate 'sampled')."
        )
    labels = labels.to(logp.device)
    if _is_causal(model):  # position t predicts token t + 1
        logp, labels, mask = logp[:, :-1], labels[:, 1:], mask[:, 1:]
    keep = mask & (labels != -100)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (1, tokens)
    return [(1.0, picked[keep].sum())]


def collect_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    estimate: FisherEstimate = "sampled",
    seed: int = 0,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    where: str = "model",
) -> Fisher:
    """Per-example diagonal Fisher of every parameter of ``model`` over ``batches`` (see the
    module docstring for ``estimate``); tied parameters share one entry under each name."""
    from torch.func import functional_call

    if estimate not in ("sampled", "exact", "empirical"):
        raise DataError(
            f"{where}: fisher_estimate {estimate!r}; expected sampled, exact or empirical."
        )
    named = list(model.named_parameters())  # tied parameters once
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    sums = [torch.zeros(p.shape, dtype=torch.float32) for _, p in named]
    generator = torch.Generator().manual_seed(seed)
    to_logits = logits_fn or _default_logits
    n = 0
    with _eval(model):
        for i, batch in enumerate(batches):
            for example in _examples(batch):
                params = {name: p.detach().requires_grad_() for name, p in named}
                args, kwargs = _call_args(example)
                try:
                    out = functional_call(model, params, args, kwargs)
                except (TypeError, ValueError, RuntimeError, IndexError):
                    _forward(model, example, where, i)  # raises the DataError
                    raise
                terms = _log_likelihoods(model, to_logits(out), example, estimate, generator, where)
                leaves = list(params.values())
                for k, (weight, lp) in enumerate(terms):
                    grads = torch.autograd.grad(
                        lp, leaves, allow_unused=True, retain_graph=k < len(terms) - 1
                    )
                    for s, g in zip(sums, grads):
                        if g is not None:
                            s.add_(g.detach().float().cpu().square(), alpha=weight)
                n += 1
    if n == 0:
        raise DataError(f"{where}: the calibration data holds no examples.")
    values: dict[str, torch.Tensor] = {}
    for (_, p), s in zip(named, sums):
        f = s / n
        for alias in aliases[id(p)]:
            values[alias] = f
    norm = float(torch.sqrt(sum((s / n).double().square().sum() for s in sums)))
    return Fisher(values, n, estimate, norm)


def _call_args(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """functional_call's (args, kwargs) for one example, as :func:`call` passes it."""
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, tuple):
        return example, {}
    return (example,), {}
