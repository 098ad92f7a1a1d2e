"""The ``digits-scratch`` suite and its alignment rows: networks that share no base.

``digits-scratch``
    The ``digits`` suite's tasks, data and 784-256-128 MLP, but every task's network is
    trained from scratch from an initialisation of its own (drawn from the training seed
    and the task's name), so no two models share a base and their hidden units are in
    unrelated orders: merging them needs alignment first (issue 11). Each model is an
    LP-FT from its own initialisation like the other suites' fine-tunes (a probe on that
    initialisation's random features, then encoder and head trained together), for 600
    steps at lr 1e-3 where ``digits`` fine-tunes a pretrained base for 300.

    What the shared-base notions mean here:

    - *base* (the reference row): each task's probe on the features of its own
      initialisation (random ReLU features), i.e. the networks before training.
    - :meth:`DigitsScratchSuite.base_state` (what a base-needing merge method such as
      ``ties`` is given when named in ``--methods``): the first task's initialisation at
      the suite's seed, a placeholder; task vectors against it mean little.
    - ``align+ties``: the models aligned onto model 0 (the first task's) and the *average
      of the aligned models* as the base, so a task vector is a model's deviation from
      that average; TIES trims the small deviations, elects a sign per weight and
      averages the deviations that agree (Yadav et al. 2023, arXiv:2306.01708).
    - *multitask*: one network trained from scratch (from the first task's
      initialisation) on all tasks; *individual*: each task's own network.
      *ensemble* is left out: a task's head reads only its own network's features.

    Rows (:data:`ALIGN_ROWS`; with ``linear``, the naive average of the unaligned models):
    ``align+linear`` (Git Re-Basin weight matching of every model onto model 0 with
    :func:`brickwork.align`, then the average), ``align+ties``, ``align_act+linear``
    (activation matching on training inputs), ``ot_fusion`` and ``ot_fusion_act``
    (:mod:`brickwork.align.ot_fusion`, Singh & Jaggi 2020: every model transported onto
    model 0 with a weight-based or an activation-based cost, EMD or Sinkhorn chosen on
    validation, then averaged) and ``zipit`` (:mod:`brickwork.align.zipit`, Stoica et al.
    2024: every layer zipped, alpha 0.5, the same-model budget beta chosen on validation).
    Alignment and fusion see only the tasks' *training* inputs
    (:func:`alignment_batches`); hyperparameters are chosen on validation and test is
    read once, as for every other row.

    The task heads travel with the models: model ``t`` is its encoder followed by one
    Linear holding every task's head, ``t``'s own rows filled and the others zero
    (:class:`_Net`). An alignment permutes that Linear's inputs like any consumer's; a
    fusion that averages the output layer over the ``n`` models leaves task ``t``'s rows
    at ``1/n`` of its aligned head (the other models' rows are zero), and a positive scale
    does not change a prediction, so each task's head is read from the fused model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import BrickworkError
from .suites import SUITES, DigitsSuite, MLPEncoder, Task, TrainConfig

if TYPE_CHECKING:  # suites.py imports this module to register the suite: no cycle at runtime
    from .evaluate import Evaluator
    from .train import Trainer

#: The rows of this module, in the order they run.
ALIGN_ROWS = ("align+linear", "align+ties", "align_act+linear", "ot_fusion", "ot_fusion_act",
              "zipit")  # fmt: skip
#: Hyperparameters chosen on validation (``align+ties``: the registered ``ties`` method's).
SPACES: dict[str, dict[str, list[Any]]] = {
    "ot_fusion": {"solver": ["emd", "sinkhorn"]},
    "ot_fusion_act": {"solver": ["emd", "sinkhorn"]},
    "zipit": {"beta": [0.0, 0.5, 1.0]},  # alpha: the paper's 0.5
}
#: Training inputs per task that alignment and fusion see (``--quick``: 64).
ALIGN_EXAMPLES = 512
ALIGN_BATCH = 128


class DigitsScratchSuite(DigitsSuite):
    """See the module docstring."""

    name = "digits-scratch"
    shared_base = False
    default_rows = ("linear", *ALIGN_ROWS)
    quick_per_class = (30, 5, 20)

    def train_config(self, quick: bool) -> TrainConfig:
        if quick:
            return TrainConfig(steps=150, batch_size=32, lr=1e-3, probe_iters=20,
                               multitask_steps=300)  # fmt: skip
        return TrainConfig(steps=600, batch_size=64, lr=1e-3, multitask_steps=1200)

    def describe(self) -> dict[str, Any]:
        return {"init": "per-task", "init_version": 1}

    def start_encoder(self, tasks: Sequence[Task], seed: int) -> nn.Module:
        """A fresh initialisation, drawn from ``seed`` and the first task's name (the
        multitask model starts from the first task's); the global RNG is left as it was."""
        return self._init(tasks[0].name, seed)

    def _init(self, task: str, seed: int) -> nn.Module:
        digest = hashlib.sha256(f"{self.name}:{seed}:{task}".encode()).hexdigest()
        with torch.random.fork_rng():
            torch.manual_seed(int(digest[:8], 16))
            return MLPEncoder()

    def base_state(self) -> dict[str, torch.Tensor]:
        """The first task's initialisation at the suite's seed (see the module docstring)."""
        if self._base is None:
            enc = self._init(self.tasks[0].name, self.seed)
            self._base = {k: v.detach().clone() for k, v in enc.state_dict().items()}
        return self._base

    def new_encoder(self) -> nn.Module:
        enc = MLPEncoder()
        enc.load_state_dict(self.base_state())
        return enc


# ----------------------------------------------------------------------------- models


class _Net(nn.Module):
    """An encoder and one Linear holding every task's head (rows ``blocks[task]``)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.enc, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))  # (batch, sum of classes)


def _blocks(tasks: Sequence[Task]) -> dict[str, slice]:
    out, at = {}, 0
    for t in tasks:
        out[t.name] = slice(at, at + len(t.classes))
        at += len(t.classes)
    return out


def nets(
    suite: Any,
    tasks: Sequence[Task],
    finetunes: dict[str, tuple[dict[str, torch.Tensor], nn.Linear]],
) -> list[_Net]:
    """One :class:`_Net` per task: its encoder, and its own head in its rows of the joint
    head (the other rows zero)."""
    from .train import full_state

    blocks = _blocks(tasks)
    n_out = sum(len(t.classes) for t in tasks)
    out = []
    for t in tasks:
        enc = suite.new_encoder()
        enc.load_state_dict(full_state(suite, finetunes[t.name][0]))
        head = nn.Linear(suite.feature_dim, n_out)
        h = finetunes[t.name][1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[blocks[t.name]] = h.weight
            head.bias[blocks[t.name]] = h.bias
        out.append(_Net(enc, head).eval())
    return out


def heads_of(
    net: nn.Module, tasks: Sequence[Task], *, only: str | None = None
) -> dict[str, nn.Linear]:
    """Each task's head, read from its rows of ``net.head`` (``only``: that task's)."""
    blocks = _blocks(tasks)
    out = {}
    for t in tasks:
        if only is not None and t.name != only:
            continue
        rows = blocks[t.name]
        h = nn.Linear(net.head.in_features, rows.stop - rows.start)
        h.load_state_dict({"weight": net.head.weight[rows].detach().clone(),
                           "bias": net.head.bias[rows].detach().clone()})  # fmt: skip
        out[t.name] = h
    return out


def _encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("enc.") :]: v for k, v in state.items() if k.startswith("enc.")}


def _mean(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}


def alignment_batches(
    trainer: Trainer, tasks: Sequence[Task], *, per_task: int, batch_size: int, seed: int
) -> list[torch.Tensor]:
    """Up to ``per_task`` *training* inputs of every task (drawn with ``seed``), shuffled
    together into batches of ``(batch_size, 784)``: the only data alignment and fusion see."""
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for t in tasks:
        prepared = trainer.prepared(t, "train")
        idx = torch.randperm(len(prepared), generator=gen)[:per_task].tolist()
        xs.append(trainer.suite.collate([prepared[i] for i in idx]))
    x = torch.cat(xs)
    x = x[torch.randperm(len(x), generator=gen)]  # (examples, 784)
    return list(x.split(batch_size))


# ----------------------------------------------------------------------------- rows


def _aligned(models: list[_Net], *, method: str, data: Any, seed: int) -> list[_Net]:
    """Every model permuted onto model 0 (``brickwork.align``); model 0 as it is."""
    from ..align.api import align

    return [models[0]] + [
        align(models[0], m, method=method, data=data, seed=seed)[0] for m in models[1:]
    ]


def _own_heads(models: list[_Net], tasks: Sequence[Task]) -> dict[str, nn.Linear]:
    return {k: v for m, t in zip(models, tasks) for k, v in heads_of(m, tasks, only=t.name).items()}


def _fused(fuse: Callable[[], nn.Module], tasks: Sequence[Task]) -> Any:
    """A fusion's merge: its encoder state, and heads read from its joint head."""
    net = fuse()
    return _encoder_state(net.state_dict()), heads_of(net, tasks)


def _plan(
    name: str, models: list[_Net], tasks: Sequence[Task], data: list[torch.Tensor], seed: int
) -> tuple[dict[str, list[Any]], Callable[[dict[str, Any]], Any]]:
    """``(search space, merge(params) -> (encoder state, heads))`` of row ``name``."""
    if name in ("align+linear", "align_act+linear"):
        method = "weight" if name == "align+linear" else "activation"
        al = _aligned(models, method=method, data=data, seed=seed)
        state = _encoder_state(_mean([m.state_dict() for m in al]))
        return {}, lambda p: (state, _own_heads(al, tasks))
    if name == "align+ties":
        from ..merge.api import merge_state_dicts
        from ..merge.registry import get_method

        al = _aligned(models, method="weight", data=None, seed=seed)
        encs = [_encoder_state(m.state_dict()) for m in al]
        base = _mean(encs)  # the aligned models' average: the reference of the task vectors
        heads = _own_heads(al, tasks)

        def ties(p: dict[str, Any]) -> Any:
            return merge_state_dicts("ties", encs, base=base, parameters=p, seed=seed), heads

        return dict(get_method("ties").search_space), ties
    if name in ("ot_fusion", "ot_fusion_act"):
        from ..align.ot_fusion import ot_fusion

        cal = data if name == "ot_fusion_act" else None  # activation cost on training inputs
        return SPACES[name], lambda p: _fused(
            lambda: ot_fusion(models, target=0, data=cal, **p), tasks
        )
    if name == "zipit":
        from ..align.zipit import zipit

        return SPACES[name], lambda p: _fused(lambda: zipit(models, data, **p), tasks)
    raise BrickworkError(f"unknown alignment row '{name}'; known: {', '.join(ALIGN_ROWS)}")


def align_rows(
    suite: Any,
    tasks: list[Task],
    ev: Evaluator,
    finetunes: dict[str, tuple[dict[str, torch.Tensor], nn.Linear]],
    names: Sequence[str],
    *,
    seed: int,
    progress: Any,
    row: Callable[..., dict[str, Any]],
    row_key: Callable[[str], str],
    load_row: Callable[[str], dict[str, Any] | None],
    save_row: Callable[[str, dict[str, Any]], None],
    reused: list[str],
    enc_params: int,
    costs: Any = None,
) -> list[dict[str, Any]]:
    """One row (kind ``merge``) per name of :data:`ALIGN_ROWS`, read from the row cache when
    the same models, data and code computed it before (its name then goes to ``reused``).
    A row whose alignment or fusion fails, or whose module is missing, is ``skipped`` with
    the reason."""
    import time

    rows: list[dict[str, Any]] = []
    if not names:
        return rows
    models: list[_Net] | None = None
    data: list[torch.Tensor] | None = None
    with progress("align + merge", len(names)) as bar:
        for name in names:
            key = row_key(f"align:{name}")
            cached = load_row(key)
            if cached is not None:
                rows.append(cached)
                reused.append(name)
                _adv(bar)
                continue
            t0 = time.perf_counter()
            if models is None:
                models = nets(suite, tasks, finetunes)
                n = 64 if suite.quick else ALIGN_EXAMPLES
                data = alignment_batches(ev.trainer, tasks, per_task=n, batch_size=ALIGN_BATCH,
                                         seed=seed)  # fmt: skip
            rows.append(_compute(name, suite, tasks, ev, models, data or [], seed=seed,
                                 row=row, enc_params=enc_params, costs=costs, t0=t0))  # fmt: skip
            if rows[-1]["status"] == "ok" or not rows[-1]["reason"].startswith("ImportError"):
                save_row(key, rows[-1])  # a missing module is retried next run
            _adv(bar)
    return rows


def _compute(
    name: str,
    suite: Any,
    tasks: list[Task],
    ev: Evaluator,
    models: list[_Net],
    data: list[torch.Tensor],
    *,
    seed: int,
    row: Callable[..., dict[str, Any]],
    enc_params: int,
    costs: Any,
    t0: float,
) -> dict[str, Any]:
    """Row ``name``: align / fuse, choose hyperparameters on validation, read test once."""
    import time

    from .evaluate import MAX_COMBOS, grid, select_hyperparameters
    from .train import full_state

    def secs() -> float:
        return round(time.perf_counter() - t0, 2)

    try:
        space, merge = _plan(name, models, tasks, data, seed)
    except (BrickworkError, ImportError) as e:
        return row(name, "merge", status="skipped", reason=f"{type(e).__name__}: {e}",
                   seconds=secs())  # fmt: skip
    merged: dict[int, tuple[dict[str, torch.Tensor], dict[str, nn.Linear]]] = {}

    def state_of(p: dict[str, Any]) -> dict[str, torch.Tensor]:
        enc, heads = merge(p)
        st = full_state(suite, enc)
        merged[id(st)] = (st, heads)  # the state kept alive: its id stays unique
        return st

    def score_val(st: dict[str, torch.Tensor]) -> dict[str, float]:
        return ev.accuracy(st, merged[id(st)][1], tasks, "val")

    combos = grid(space, cap=1 if suite.quick else MAX_COMBOS)  # quick: the first only
    sel = select_hyperparameters(combos, state_of, score_val, errors=(BrickworkError,))
    if sel.params is None or sel.state is None:
        return row(name, "merge", status="skipped", reason=sel.error, seconds=secs())
    heads = merged[id(sel.state)][1]
    correct = ev.correct(sel.state, heads, tasks, "test")  # the only test read
    return row(
        name, "merge", correct=correct, hyperparameters=sel.params,
        validation={"avg": round(sel.val_avg, 6), "tried": sel.tried},
        params=enc_params + sum(p.numel() for h in heads.values() for p in h.parameters()),
        seconds=secs(), **(costs.same(sel.state, heads) if costs is not None else {}),
    )  # fmt: skip


def split_align_rows(methods: Sequence[str] | None) -> tuple[list[str] | None, list[str]]:
    """``(the other names or None, the alignment rows named)``."""
    if methods is None:
        return None, []
    return [m for m in methods if m not in ALIGN_ROWS], [m for m in ALIGN_ROWS if m in methods]


def _adv(bar: Any) -> None:
    if bar is not None:
        bar.advance()


SUITES[DigitsScratchSuite.name] = DigitsScratchSuite
