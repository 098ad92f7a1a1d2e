"""Mixture-of-experts rows of the benchmark (their cost columns: :mod:`.costs`).

Rows (selectable by name with ``methods``; every choice is made on the validation split,
the test split is read once per row, at the end):

``moe_task``
    :func:`brickwork.route.upcycle_modules.upcycle_module` of the fine-tunes: each FFN of
    the trained encoder becomes an MoE whose expert ``e`` is fine-tune ``e``'s FFN; the
    other tensors (attention, norms) are merged by task arithmetic. The router of each FFN
    is built from the centroids of the FFN inputs (through the base) of a few *unlabelled*
    training inputs per task. ``lambda``, ``top_k`` (1 or 2) and ``route_by`` are chosen
    on validation: ``"token"`` routes each token alone, ``"sequence"`` averages the router
    logits over an input's tokens (padding left out) and sends all of them to the same
    experts (task-level MoE, Kudugunta et al. 2021, "Beyond Distillation: Task-level
    Mixture-of-Experts for Efficient Inference"). No task id enters the encoder: the router
    decides from the input alone. Each task is scored with its own fine-tuned head, as for
    every merge row.
``moe_train``
    ``moe_task``'s model, then only the routers train (everything else frozen) on mixed
    unlabelled training inputs of every task: each input's feature is pulled towards the
    feature of its own domain's fine-tune (its domain is known, its class label is not
    used), plus :func:`~brickwork.route.moe.load_balancing_loss`. The routers train at
    ``top_k=2`` (with one expert the routing weight is 1 and passes no gradient), once per
    ``train_route_bys``; ``route_by`` and ``top_k`` are chosen again on validation after.
    By default they train by token only: on the text suite (seed 0) routers trained by
    sequence scored 0.718 on validation against 0.721 for token-trained ones and doubled
    the training time (+22 s).
``moefy_top4of8``, ``moefy_top2of8``
    :func:`brickwork.route.moefy.moefy` of each fine-tune (8 experts per FFN, routers fit
    on that task's training inputs, no labels); each task is scored with its own MoEfied
    fine-tune and head (like ``individual``), so *normalized* is the kept fraction of
    each fine-tune's accuracy at 4 (2) of 8 experts, i.e. 50 % (25 %) of FFN neurons.

An encoder that is one MLP ``Linear -> act -> Linear (-> act)`` with fewer outputs than
inputs (the digits suite's 784-256-128) is not the ``d -> d_ff -> d`` FFN that route's
MoE layer computes; :class:`SquareMLP` pads it to one (zero output rows, then a slice),
the same function (the whole encoder is then the FFN: ``moe_task`` has nothing to merge).
A suite whose encoder has neither gets ``status: skipped`` rows. There every input is
one vector, so sequence routing is token routing (the tie keeps ``"token"``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BrickworkError, RecipeError, unknown_name
from .costs import Costs, count_params, moe_layers, sample, set_top_k
from .evaluate import accuracies, hits
from .suites import Suite, Task
from .train import Trainer, features, full_state, save_row, source_hash

#: Row names, in the order the rows appear.
MOE_ROWS = ("moe_task", "moe_train", "moefy_top4of8", "moefy_top2of8")
_MOEFY = {"moefy_top4of8": (8, 4), "moefy_top2of8": (8, 2)}  # name -> (n_experts, top_k)


@dataclass(frozen=True)
class MoEConfig:
    """Everything besides the data and the seed that determines the MoE rows."""

    calibration: int = 64  # unlabelled training inputs per task for the task routers
    lambdas: tuple[float, ...] = (0.3, 0.5)  # task arithmetic of the non-FFN tensors
    top_ks: tuple[int, ...] = (1, 2)  # tried on validation
    route_bys: tuple[str, ...] = ("token", "sequence")  # tried on validation
    train_route_bys: tuple[str, ...] = ("token",)  # moe_train trains one router set per entry
    train_examples: int = 128  # per task, for router training
    train_steps: int = 60
    train_batch: int = 32
    train_lr: float = 3e-3
    train_top_k: int = 2  # top-1 passes no gradient to the router through the weights
    aux_coef: float = 0.01
    moefy_examples: int = 256  # per task
    moefy_steps: int = 300


def moe_config(quick: bool) -> MoEConfig:
    if quick:
        return MoEConfig(calibration=16, lambdas=(0.3,), train_examples=16, train_steps=8, train_batch=16,
                         moefy_examples=32, moefy_steps=40,
                         train_route_bys=("token", "sequence"))  # fmt: skip
    return MoEConfig()


def split_methods(
    methods: Sequence[str] | None, *, moe: bool = True
) -> tuple[list[str] | None, list[str]]:
    """``(merge methods or None for all, MoE rows)`` from a ``methods`` list; an unknown name
    raises with every valid one."""
    from ..merge.registry import list_methods

    if methods is None:
        return None, list(MOE_ROWS) if moe else []
    merges = list_methods(data_aware=True)
    for m in methods:
        if m not in MOE_ROWS and m not in merges:
            raise unknown_name("merge method or MoE row", m, [*merges, *MOE_ROWS])
    wanted = [m for m in MOE_ROWS if m in methods] if moe else []
    return [m for m in methods if m not in MOE_ROWS], wanted


# ----------------------------------------------------------------------------- modules


class SquareMLP(nn.Module):
    """``post(down(act(up(x))))`` with ``down`` widened to ``up.in_features`` outputs (the
    extra rows zero) and sliced back: the same function as the MLP, in the shape of an FFN
    ``d -> d_ff -> d`` that :func:`~brickwork.route.ffn.find_ffns` recognises."""

    def __init__(self, up: nn.Linear, act: nn.Module, down: nn.Linear, post: nn.Module) -> None:
        super().__init__()
        d_in, d_ff, self.d_out = up.in_features, up.out_features, down.out_features
        wide = nn.Linear(d_ff, d_in)
        with torch.no_grad():
            wide.weight.zero_()
            wide.bias.zero_()
            wide.weight[: self.d_out] = down.weight  # (d_out, d_ff) of (d_in, d_ff)
            wide.bias[: self.d_out] = down.bias
        self.ffn = nn.Sequential(copy.deepcopy(up), copy.deepcopy(act), wide)
        self.post = copy.deepcopy(post)
        self.pad_rows = d_in - self.d_out  # zero rows of every copy of `wide`: not counted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.ffn(x)[..., : self.d_out])  # (batch, d_in) -> (batch, d_out)


def set_route_by(model: nn.Module, route_by: str) -> nn.Module:
    """Route every MoE layer of ``model`` (in place) by ``"token"`` or ``"sequence"``."""
    for m in moe_layers(model):
        m.route_by = route_by
    return model


def _set_mask(model: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: a text batch ``(hidden, mask)`` gives every MoE layer its mask, so
    that sequence routing leaves padding out (a module-level function: deep copies of the
    model keep a working hook)."""
    batch = args[0] if args else None
    mask = batch[1] if isinstance(batch, tuple) and len(batch) == 2 else None
    for m in moe_layers(model):
        m.sequence_mask = mask if isinstance(mask, torch.Tensor) else None


def _clear_mask(model: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    for m in moe_layers(model):
        m.sequence_mask = None


def masked(model: nn.Module) -> nn.Module:
    """``model`` (in place) with hooks that hand each batch's padding mask to its MoE layers."""
    model.register_forward_pre_hook(_set_mask)
    model.register_forward_hook(_clear_mask)
    return model


def routable(encoder: nn.Module, probe: Any) -> nn.Module:
    """``encoder`` if route finds FFNs in it, else an equivalent :class:`SquareMLP`;
    :class:`RecipeError` (the row's reason to be skipped) when neither works. ``probe`` is
    a batch on which the two must agree."""
    from ..route.ffn import activation_name, find_ffns

    try:
        find_ffns(encoder)
        return encoder
    except RecipeError as e:
        why = str(e)
    kids = [c for c in encoder.children() if any(True for _ in c.parameters())]
    seq = kids[0] if len(kids) == 1 and isinstance(kids[0], nn.Sequential) else None
    parts = list(seq) if seq is not None else []
    ok = (
        len(parts) in (3, 4)
        and isinstance(parts[0], nn.Linear)
        and isinstance(parts[2], nn.Linear)
        and activation_name(parts[1]) is not None
        and parts[2].bias is not None
        and parts[0].in_features >= parts[2].out_features
    )
    if not ok:
        raise RecipeError(f"no FFN to turn into experts: {why}")
    post = parts[3] if len(parts) == 4 else nn.Identity()
    sq = SquareMLP(parts[0], parts[1], parts[2], post)
    with torch.no_grad():
        if not torch.allclose(sq(probe), encoder(probe), atol=1e-5):
            raise RecipeError(f"the encoder is not its MLP '{type(seq).__name__}' alone: {why}")
    return sq


def _by_length(suite: Suite, examples: Sequence[Any]) -> list[tuple[Any]]:
    """Batches of equal-length examples (no padding token reaches a router), each wrapped
    as the model's one positional argument."""
    groups: dict[int, list[Any]] = {}
    for e in examples:
        groups.setdefault(suite.length(e), []).append(e)
    return [(suite.collate(g),) for _, g in sorted(groups.items())]


# ----------------------------------------------------------------------------- building


class _Builder:
    """Builds (once) what the MoE rows share: the routable fine-tunes, the chosen
    ``moe_task`` model and the MoEfied fine-tunes."""

    def __init__(self, suite: Suite, tasks: list[Task], ev: Any, finetunes: Mapping[str, Any],
                 *, seed: int, progress: Any, cfg: MoEConfig) -> None:  # fmt: skip
        self.suite, self.tasks, self.ev, self.seed, self.cfg = suite, tasks, ev, seed, cfg
        self.trainer: Trainer = ev.trainer
        self.progress = progress
        self.heads = {t.name: finetunes[t.name][1] for t in tasks}
        self._states = {t.name: full_state(suite, finetunes[t.name][0]) for t in tasks}
        self._task: tuple[nn.Module, dict[str, Any], dict[str, Any]] | None = None
        self._moefied: dict[str, nn.Module] = {}
        self._dense: dict[str, nn.Module] = {}
        self._pool: list[tuple[list[Any], torch.Tensor]] | None = None
        self.probe = suite.collate(self.trainer.prepared(tasks[0], "train")[:4])

    def dense(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        enc = self.suite.new_encoder()
        enc.load_state_dict(dict(state))
        return routable(enc.eval(), self.probe)

    def finetuned(self, task: Task) -> nn.Module:
        """``task``'s fine-tune as a routable module (built once; callers do not change it)."""
        if task.name not in self._dense:
            self._dense[task.name] = self.dense(self._states[task.name])
        return self._dense[task.name]

    def base(self) -> nn.Module:
        if "" not in self._dense:
            self._dense[""] = self.dense(self.suite.base_state())
        return self._dense[""]

    def unlabelled(self, task: Task, n: int, salt: int = 0) -> list[Any]:
        """``n`` training inputs of ``task`` (inputs only: labels are never read here)."""
        prep = self.trainer.prepared(task, "train")
        return [prep[i] for i in sample(len(prep), n, self.seed * 7919 + salt)]

    def correct(
        self, models: Mapping[str, nn.Module], split: str, tasks: Sequence[Task] | None = None
    ) -> dict[str, Any]:
        """Per task, whether ``models[task]`` with the task's fine-tuned head gets each
        example of ``split`` right (``(examples,)`` bool arrays)."""
        tasks = self.tasks if tasks is None else tasks
        self.ev.calls.append((split, tuple(t.name for t in tasks)))  # audited by tests
        out = {}
        for t in tasks:
            x = features(self.suite, models[t.name], self.trainer.prepared(t, split))
            with torch.no_grad():
                pred = self.heads[t.name](x).argmax(1)
            out[t.name] = hits(pred, t, split)
        return out

    def accuracy(
        self, models: Mapping[str, nn.Module], split: str, tasks: Sequence[Task] | None = None
    ) -> dict[str, float]:
        """Per-task accuracy of ``models[task]`` with the task's fine-tuned head."""
        return accuracies(self.correct(models, split, tasks))

    def one(self, model: nn.Module, split: str) -> dict[str, float]:
        return self.accuracy({t.name: model for t in self.tasks}, split)

    # -- moe_task
    def upcycle(self, lam: float | None, top_k: int) -> nn.Module:
        from ..route.upcycle_modules import upcycle_module

        cal = [_by_length(self.suite, self.unlabelled(t, self.cfg.calibration)) for t in self.tasks]
        return masked(upcycle_module(
            self.base(), [self.finetuned(t) for t in self.tasks], top_k=top_k,
            merge_method=None if lam is None else "task_arithmetic",
            merge_parameters=None if lam is None else {"lambda": lam},
            router_init="task", examples=cal, seed=self.seed,
        ))  # fmt: skip

    def select(
        self, model: nn.Module, fixed: Mapping[str, Any], tried: list[dict[str, Any]]
    ) -> tuple[float, dict[str, Any]]:
        """Every ``route_by`` x ``top_k`` of ``model`` on validation (appended to ``tried``):
        ``(best average, its parameters)``; ``model`` is left at the last choice tried."""
        best: tuple[float, dict[str, Any]] = (float("-inf"), {})
        for rb in self.cfg.route_bys:
            for k in self.cfg.top_ks:
                scores = self.one(set_top_k(set_route_by(model, rb), k), "val")
                avg = sum(scores.values()) / len(scores)
                params = {**fixed, "top_k": k, "route_by": rb}
                tried.append({"params": params, "val_avg": round(avg, 6)})
                if avg > best[0]:
                    best = (avg, params)
        return best

    def task_moe(self) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        """``(model, hyperparameters, validation)`` of ``moe_task``, chosen on validation."""
        if self._task is not None:
            return self._task
        from ..route.ffn import find_ffns

        ffns = {f"{p}." for s in find_ffns(self.base()) for p in (s.up, s.down, s.gate) if p}
        merged = [k for k, _ in self.base().named_parameters() if not k.startswith(tuple(ffns))]
        lams = list(self.cfg.lambdas) if merged else [None]  # only FFNs: nothing to merge
        best: tuple[float, Any, dict[str, Any]] = (float("-inf"), None, {})
        tried = []
        with self.progress("moe_task: upcycle + select on validation", len(lams)) as bar:
            for lam in lams:
                model = self.upcycle(lam, max(self.cfg.top_ks))
                avg, params = self.select(model, {"lambda": lam} if lam is not None else {}, tried)
                if avg > best[0]:
                    k, rb = params["top_k"], params["route_by"]
                    best = (avg, set_top_k(set_route_by(model, rb), k), params)
                if bar is not None:
                    bar.advance()
        hp = {**best[2], "router": "task", "calibration_per_task": self.cfg.calibration}
        self._task = (best[1], hp, {"avg": round(best[0], 6), "tried": tried})
        return self._task

    # -- moe_train
    def train_moe(self) -> tuple[nn.Module, dict[str, Any], dict[str, Any], float]:
        """``(model, hyperparameters, validation, train_seconds)`` of ``moe_train``."""
        start, hp0, _ = self.task_moe()
        cfg, k_train = self.cfg, min(self.cfg.train_top_k, moe_layers(start)[0].n_experts)
        fixed = {k: v for k, v in hp0.items() if k not in ("top_k", "route_by")}
        seconds, tried, best = 0.0, [], (float("-inf"), None, {}, [])
        for rb in self.cfg.train_route_bys:
            t0 = time.perf_counter()
            model = set_route_by(set_top_k(copy.deepcopy(start), k_train), rb)
            losses = self.train_routers(model, k_train, f"moe_train: router training ({rb})")
            seconds += time.perf_counter() - t0
            avg, params = self.select(model, {"train_route_by": rb}, tried)
            if avg > best[0]:
                best = (avg, set_top_k(set_route_by(model, params["route_by"]), params["top_k"]),
                        params, losses)  # fmt: skip
        avg, model, params, losses = best
        hp = {**fixed, **params, "router": "train", "steps": cfg.train_steps, "lr": cfg.train_lr,
              "train_top_k": k_train, "aux_coef": cfg.aux_coef,
              "examples_per_task": cfg.train_examples,
              "distil_loss": [round(losses[0], 4), round(losses[-1], 4)]}  # fmt: skip
        return model, hp, {"avg": round(avg, 6), "tried": tried}, seconds

    def distillation_pool(self) -> list[tuple[list[Any], torch.Tensor]]:
        """Per task: (unlabelled training inputs, the task's fine-tune's features of them)."""
        if self._pool is None:
            self._pool = []
            for t in self.tasks:
                xs = self.unlabelled(t, self.cfg.train_examples, salt=1)
                self._pool.append((xs, features(self.suite, self.finetuned(t), xs)))  # (n, dim)
        return self._pool

    def train_routers(self, model: nn.Module, k_train: int, what: str) -> list[float]:
        """Train only ``model``'s routers (in place, at its ``route_by`` and ``top_k``);
        returns the distillation loss of every step."""
        from ..route.moe import load_balancing_loss

        cfg = self.cfg
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for m in moe_layers(model) for p in m.router.parameters()]
        for p in params:
            p.requires_grad_(True)
        pool = self.distillation_pool()
        scale = torch.cat([f for _, f in pool]).pow(2).mean()
        logits: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: logits.append(o.router_logits))
                 for m in moe_layers(model)]  # fmt: skip
        opt = torch.optim.Adam(params, lr=cfg.train_lr)
        g = torch.Generator().manual_seed(self.seed)
        per = max(1, cfg.train_batch // len(self.tasks))
        losses = []
        try:
            with self.progress(what, cfg.train_steps) as bar:
                for _ in range(cfg.train_steps):
                    ex, tgt = [], []
                    for xs, f in pool:
                        idx = torch.randint(len(xs), (per,), generator=g).tolist()
                        ex += [xs[i] for i in idx]
                        tgt.append(f[idx])
                    batch = self.suite.collate(ex)
                    logits.clear()
                    with torch.enable_grad():
                        distil = (model(batch) - torch.cat(tgt)).pow(2).mean() / scale
                        mask = batch[1].reshape(-1).bool() if isinstance(batch, tuple) else None
                        lb = sum(load_balancing_loss(lg if mask is None else lg[mask], k_train)
                                 for lg in logits) / len(logits)  # fmt: skip
                        loss = distil + cfg.aux_coef * lb
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    losses.append(distil.item())
                    if bar is not None:
                        bar.advance()
        finally:
            for h in hooks:
                h.remove()
        for p in model.parameters():
            p.requires_grad_(False)
        return losses

    # -- moefy
    def moefied(self, task: Task) -> nn.Module:
        """``task``'s fine-tune MoEfied into 8 experts per FFN (routers fit on its inputs)."""
        if task.name not in self._moefied:
            from ..route.moefy import moefy

            cal = _by_length(self.suite, self.unlabelled(task, self.cfg.moefy_examples, salt=2))
            k_max = max(k for _, k in _MOEFY.values())
            res = moefy(self.finetuned(task), n_experts=8, top_k=k_max, calibration=cal,
                        steps=self.cfg.moefy_steps, seed=self.seed)  # fmt: skip
            self._moefied[task.name] = res.model.eval()
        return self._moefied[task.name]


# ----------------------------------------------------------------------------- rows


def moe_row_key(suite: Suite, tasks: list[Task], trainer: Any, name: str, *, seed: int) -> str:
    """The row-cache key of MoE row ``name``."""
    from .runner import _row_key

    return _row_key(suite, tasks, trainer, f"moe:{name}", seed=seed,
                    moe=asdict(moe_config(suite.quick)),
                    code_route=source_hash("merge", "bench", "checkpoint", "route"))  # fmt: skip


def moe_rows(
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
) -> list[dict[str, Any]]:
    """One row per name in ``names`` (of :data:`MOE_ROWS`), cached like merge rows."""
    from .runner import _row, load_cached_row

    reused = [] if reused is None else reused
    cfg = moe_config(suite.quick)
    b = _Builder(suite, tasks, ev, finetunes, seed=seed, progress=progress, cfg=cfg)
    shared = suite.shared_params()
    heads = sum(p.numel() for h in b.heads.values() for p in h.parameters())
    rows = []
    for name in [n for n in MOE_ROWS if n in names]:
        key = moe_row_key(suite, tasks, ev.trainer, name, seed=seed)
        cached = load_cached_row(key) if use_cache else None
        if cached is not None:
            rows.append(cached)
            reused.append(name)
            continue
        t0 = time.perf_counter()
        try:
            if name in _MOEFY:
                n_exp, k = _MOEFY[name]
                with progress(f"{name}: moefy the fine-tunes", len(tasks)) as bar:
                    models = {}
                    for t in tasks:
                        models[t.name] = set_top_k(b.moefied(t), k)
                        if bar is not None:
                            bar.advance()
                per = {}
                for t in tasks:  # each MoEfied fine-tune on its own task only
                    per |= b.correct(models, "test", [t])
                total = sum(count_params(m)[1] for m in models.values())
                kw = dict(correct=per, params=shared + total + heads,
                          hyperparameters={"n_experts": n_exp, "top_k": k, "active_neurons": k / n_exp,
                                           "calibration_per_task": cfg.moefy_examples,
                                           "router_steps": cfg.moefy_steps})  # fmt: skip
                secs = round(time.perf_counter() - t0, 2)  # costs are measured after
                kw |= costs({t.name: [models[t.name]] for t in tasks}, b.heads)
            else:
                if name == "moe_task":
                    model, hp, val = b.task_moe()
                    extra = {}
                else:
                    model, hp, val, secs = b.train_moe()
                    extra = {"train_seconds": round(secs, 2)}
                kw = dict(correct=b.correct({t.name: model for t in tasks}, "test"),  # the only test read
                          params=shared + count_params(model)[1] + heads, hyperparameters=hp,
                          validation=val, **extra)  # fmt: skip
                secs = round(time.perf_counter() - t0, 2)
                kw |= costs.same(model, b.heads)
            row = _row(name, "moe", seconds=secs, **kw)
        except BrickworkError as e:
            row = _row(name, "moe", status="skipped", reason=str(e),
                       seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
        save_row(key, row)
        rows.append(row)
    return rows
