"""Compression rows of the benchmark (issue 12) for the text and digits suites.

Each row compresses every fine-tune on its own and scores each task with its own compressed
fine-tune and fine-tuned head (like ``individual`` and the ``moefy`` rows), so *normalized*
is the kept fraction of each fine-tune's accuracy. Row names and options:
:data:`brickwork.bench.compress_names.COMPRESS_ROWS`. Nothing is chosen on validation (the
options are fixed by the row); the test split is read once per row, at the end.

``lora_r8`` / ``lora_r32`` / ``lora_r128``
    The rank-r LoRA of each fine-tune against the base, as ``brickwork compress lora``
    extracts it (the same factors, :func:`brickwork.compress.lora_factors`: the best
    rank-r approximation ``B A`` of every linear weight's delta), applied in memory: each
    2-D weight is ``W_base + B A``; every other changed tensor (biases, LayerNorms) keeps its
    fine-tuned value, as the adapter stores it (``base_layer.bias`` / ``modules_to_save``).
    *params*: the base once, plus per task its adapter factors and kept tensors.
    *active_params* / *latency_ms*: the adapter merged into the weights (a dense encoder).
``magnitude_50``, ``wanda_50``, ``wanda_2of4``, ``sparsegpt_50``, ``sparsegpt_2of4``
    :func:`brickwork.compress.prune_module` of each fine-tune (Wanda: dense inputs;
    SparseGPT: sequential, each layer's inputs through the already pruned layers below), on
    every linear weight inside the encoder's layers. *params* and *active_params* count the
    non-zeros of the pruned weights. *latency_ms* is measured honestly on the weights as
    they are stored, dense with zeros: on CPU they run at dense speed (no sparse kernel is
    used), so the latency is the fine-tune's.
``svd_llm_20`` / ``svd_llm_40``
    :func:`brickwork.compress.factorize_model` (``svd_llm``, parameter ratio 0.8 / 0.6 of
    each factorised layer) of each fine-tune: every linear layer inside the encoder's layers
    becomes two smaller ones. *params* count the factors; the latency is that of the
    factorised encoder.

Calibration (Wanda, SparseGPT, SVD-LLM): :attr:`CompressConfig.calibration` *unlabelled
training* inputs of the task the fine-tune was trained on (inputs only: never a label,
never validation or test data), drawn like the MoE rows' (:func:`.costs.sample`).

The digits suite's encoder is one ``nn.Sequential`` MLP, not a stack of numbered layers;
:func:`layered` gives it the numbered view compress's layer-wise code walks (each child is
a "layer"), the same function. An encoder with neither gets ``status: skipped`` rows, as
does a row whose shape does not fit (an N:M pattern whose M does not divide an input
dimension, a LoRA rank above a weight's).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BrickworkError, RecipeError
from .compress_names import COMPRESS_ROWS
from .costs import Costs, sample
from .evaluate import hits
from .suites import Suite, Task
from .train import features, full_state, save_row, source_hash

#: ``COMPRESS_ROWS``' type: name -> (kind, options).
Specs = Mapping[str, tuple[str, Mapping[str, object]]]


@dataclass(frozen=True)
class CompressConfig:
    """Everything besides the row's own options, the data and the seed that determines a row."""

    calibration: int = 256  # unlabelled training inputs of each task (data-aware rows)
    batch_size: int = 64  # calibration batch size


def compress_config(quick: bool) -> CompressConfig:
    return CompressConfig(calibration=32, batch_size=16) if quick else CompressConfig()


def compress_row_key(
    suite: Suite,
    tasks: list[Task],
    trainer: Any,
    name: str,
    *,
    seed: int,
    specs: Specs = COMPRESS_ROWS,
) -> str:
    """The row-cache key of compression row ``name`` (its options and the compress code in it)."""
    from .runner import _row_key

    kind, opts = specs[name]
    return _row_key(suite, tasks, trainer, f"compress:{name}", seed=seed,
                    compress={"kind": kind, "options": dict(opts)},
                    compress_config=asdict(compress_config(suite.quick)),
                    code_compress=source_hash("compress", "stats", "arch", "route"))  # fmt: skip


# ----------------------------------------------------------------------------- modules


class _Layers(nn.Module):
    """``layers(x)``: an encoder that is one ``nn.Sequential``, reachable as ``layers`` so
    that each of its children is a numbered layer (``layers.0.weight``, ...)."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.layers = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (batch, in) -> (batch, features)


def layered(encoder: nn.Module, probe: Any) -> nn.Module:
    """``encoder`` when it has linear layers inside numbered layers (``layer.4.``,
    ``layers.0.``), else an equivalent :class:`_Layers` view of its one ``nn.Sequential``
    (a copy: ``encoder`` is not changed); :class:`RecipeError` (the row's reason to be
    skipped) when neither. ``probe``: a batch on which the two must agree."""
    from ..arch import layer_name

    linear = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    if any(layer_name(f"{n}.weight") is not None for n in linear):
        return encoder
    kids = [c for c in encoder.children() if any(True for _ in c.parameters())]
    if len(kids) == 1 and isinstance(kids[0], nn.Sequential):
        view = _Layers(copy.deepcopy(kids[0])).eval()
        with torch.no_grad():
            if torch.allclose(view(probe), encoder.eval()(probe), atol=1e-6):
                return view
    raise RecipeError(
        f"{type(encoder).__name__}: no linear layer inside numbered layers ('layer.N.', "
        f"'layers.N.') and not one nn.Sequential; linear layers: {linear[:6]}"
    )


def lora_state(
    base: Mapping[str, torch.Tensor], finetune: Mapping[str, torch.Tensor], rank: int
) -> tuple[dict[str, torch.Tensor], int]:
    """``(state, stored)``: ``finetune`` through its rank-``rank`` LoRA against ``base``
    (every changed 2-D ``.weight``: ``base + B A``; every other changed tensor, and the
    rest of its module's tensors, the fine-tune's) and the parameters the adapter stores."""
    from ..compress.lora import lora_factors

    state = {k: v.clone() for k, v in base.items()}
    lora: set[str] = set()
    stored = 0
    for k, ft in finetune.items():
        if ft.dim() != 2 or not k.endswith(".weight") or torch.equal(ft, base[k]):
            continue
        if rank > min(ft.shape):
            raise RecipeError(
                f"LoRA rank {rank} is larger than tensor '{k}' allows: it is "
                f"{ft.shape[0]}x{ft.shape[1]} (rank at most {min(ft.shape)})."
            )
        b, a = lora_factors(ft, base[k], rank)  # (out, r), (r, in)
        state[k] = (base[k].float() + b @ a).to(base[k].dtype)
        stored += b.numel() + a.numel()
        lora.add(k[: -len(".weight")])
    changed = [k for k, v in finetune.items() if not torch.equal(v, base[k])]
    kept: set[str] = set()
    for k in changed:
        module = k.rsplit(".", 1)[0] if "." in k else ""
        if k.endswith(".weight") and module in lora:
            continue
        if module in lora:  # a LoRA module's bias: stored as base_layer.bias
            kept.add(k)
        else:  # modules_to_save: the whole module at its fine-tuned values
            kept |= {n for n in finetune if (n.rsplit(".", 1)[0] if "." in n else "") == module}
    for k in kept:
        state[k] = finetune[k].clone()
        stored += finetune[k].numel()
    return state, stored


def _nonzero_params(model: nn.Module, pruned: Sequence[str]) -> int:
    """Parameters of ``model``, counting only the non-zeros of the tensors in ``pruned``."""
    params = dict(model.named_parameters())
    out = 0
    for n, p in params.items():
        out += int(torch.count_nonzero(p)) if n in pruned else p.numel()
    return out


# ----------------------------------------------------------------------------- building


class _Builder:
    """Compresses one fine-tune at a time and scores it on its own task."""

    def __init__(self, suite: Suite, tasks: list[Task], ev: Any, finetunes: Mapping[str, Any],
                 *, seed: int, cfg: CompressConfig) -> None:  # fmt: skip
        self.suite, self.tasks, self.ev, self.seed, self.cfg = suite, tasks, ev, seed, cfg
        self.trainer = ev.trainer
        self.heads = {t.name: finetunes[t.name][1] for t in tasks}
        self.states = {t.name: full_state(suite, finetunes[t.name][0]) for t in tasks}
        self.probe = suite.collate(self.trainer.prepared(tasks[0], "train")[:4])

    def finetuned(self, task: Task) -> nn.Module:
        enc = self.suite.new_encoder()
        enc.load_state_dict(self.states[task.name])
        return enc.eval()

    def unlabelled(self, task: Task) -> list[Any]:
        """Calibration batches: ``cfg.calibration`` training inputs of ``task`` (no labels)."""
        prep = self.trainer.prepared(task, "train")
        idx = sample(len(prep), self.cfg.calibration, self.seed * 7919 + 3)
        xs, n = [prep[i] for i in idx], self.cfg.batch_size
        return [self.suite.model_batch(xs[i : i + n]) for i in range(0, len(xs), n)]

    def compress(
        self, task: Task, kind: str, opts: Mapping[str, Any]
    ) -> tuple[nn.Module | dict[str, torch.Tensor], int, int, dict[str, Any]]:
        """``(encoder or encoder state, stored params, active params, info)`` of ``task``'s
        fine-tune compressed by ``kind`` with ``opts`` (params of the encoder only)."""
        if kind == "lora":
            if not self.suite.shared_base:
                raise RecipeError(
                    f"suite '{self.suite.name}' has no shared base (each model starts from its "
                    "own initialisation), so a fine-tune has no delta to extract a LoRA from."
                )
            state, stored = lora_state(self.suite.base_state(), self.states[task.name],
                                       int(opts["rank"]))  # fmt: skip
            dense = sum(v.numel() for v in state.values())
            return state, stored, dense, {}
        model = layered(self.finetuned(task), self.probe)
        if kind == "prune":
            from ..compress import prune_module

            method = str(opts["method"])
            cal = self.unlabelled(task) if method != "magnitude" else None
            res = prune_module(model, method, sparsity=opts.get("sparsity"),  # type: ignore[arg-type]
                               nm=opts.get("nm"), batches=cal)  # type: ignore[arg-type]  # fmt: skip
            new = copy.deepcopy(model)
            new.load_state_dict({**new.state_dict(), **res.tensors})
            n = _nonzero_params(new, list(res.tensors))
            return new.eval(), n, n, {"sequential": res.info.get("sequential")}
        if kind == "lowrank":
            from ..compress import factorize_model, gram_statistics
            from ..compress.lowrank import summary

            grams = gram_statistics(model, self.unlabelled(task), where=f"fine-tune {task.name}")
            new, reports = factorize_model(model, method=str(opts["method"]),
                                           ratio=float(opts["ratio"]), grams=grams)  # type: ignore[arg-type]  # fmt: skip
            n = sum(p.numel() for p in new.parameters())
            return new.eval(), n, n, {"kept_fraction": round(summary(reports)["kept_fraction"], 4)}
        raise RecipeError(f"unknown compression row kind '{kind}'; known: lora, prune, lowrank")

    def correct(self, model: nn.Module | Mapping[str, torch.Tensor], task: Task, split: str):
        """Whether ``model`` (a module or an encoder state) with ``task``'s fine-tuned head
        gets each example of ``split`` right (a ``(examples,)`` bool array)."""
        if not isinstance(model, nn.Module):
            return self.ev.correct(model, self.heads, [task], split)[task.name]
        self.ev.calls.append((split, (task.name,)))  # audited by tests
        x = features(self.suite, model, self.trainer.prepared(task, split))  # (examples, dim)
        with torch.no_grad():
            pred = self.heads[task.name](x).argmax(1)
        return hits(pred, task, split)


def _hyperparameters(kind: str, opts: Mapping[str, Any], cfg: CompressConfig) -> dict[str, Any]:
    hp: dict[str, Any] = {"compress": kind, **opts}
    if kind == "lowrank" or opts.get("method") in ("wanda", "sparsegpt"):
        hp["calibration_per_task"] = cfg.calibration
    return hp


# ----------------------------------------------------------------------------- rows


def compress_rows(
    suite: Suite,
    tasks: list[Task],
    ev: Any,
    finetunes: Mapping[str, tuple[dict[str, torch.Tensor], nn.Linear]],
    names: Sequence[str],
    *,
    seed: int,
    progress: Any,
    costs: Costs,
    reused: list[str] | None = None,
    use_cache: bool = True,
    specs: Specs = COMPRESS_ROWS,
) -> list[dict[str, Any]]:
    """One row per name in ``names`` (of ``specs``, in its order), cached like merge rows.
    ``specs``: name -> (kind, options), :data:`COMPRESS_ROWS` by default (tests add others)."""
    from .runner import _row, load_cached_row

    reused = [] if reused is None else reused
    cfg = compress_config(suite.quick)
    b = _Builder(suite, tasks, ev, finetunes, seed=seed, cfg=cfg)
    shared = suite.shared_params()
    heads = sum(p.numel() for h in b.heads.values() for p in h.parameters())
    top = sum(v.numel() for v in suite.base_state().values())
    rows = []
    for name in [n for n in specs if n in names]:
        key = compress_row_key(suite, tasks, ev.trainer, name, seed=seed, specs=specs)
        cached = load_cached_row(key) if use_cache else None
        if cached is not None:
            rows.append(cached)
            reused.append(name)
            continue
        kind, opts = specs[name]
        t0 = time.perf_counter()
        try:
            models, stored, active, info = {}, 0, 0, {}
            with progress(f"{name}: compress the fine-tunes", len(tasks)) as bar:
                for t in tasks:
                    models[t.name], n, a, info = b.compress(t, kind, opts)
                    stored, active = stored + n, active + a
                    if bar is not None:
                        bar.advance()
            per = {t.name: b.correct(models[t.name], t, "test") for t in tasks}  # the test read
            secs = round(time.perf_counter() - t0, 2)  # costs are measured after
            kw = costs({t.name: [models[t.name]] for t in tasks}, b.heads)
            # Costs counts dense tensors; a pruned encoder's active parameters are its non-zeros
            head_mean = heads / len(tasks)
            kw["active_params"] = round(shared + head_mean + active / len(tasks))
            params = shared + heads + stored + (top if kind == "lora" else 0)  # lora: base once
            hp = _hyperparameters(kind, opts, cfg) | info
            row = _row(name, "compress", correct=per, params=params, hyperparameters=hp,
                       seconds=secs, **kw)  # fmt: skip
        except BrickworkError as e:
            row = _row(name, "compress", status="skipped", reason=str(e),
                       seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
        save_row(key, row)
        rows.append(row)
    return rows
