"""The LM suite's rows: per-sequence losses, merge rows, upcycled-MoE rows, and their scores.

Every row's hyperparameters are chosen on the validation split (the share of the loss gain
kept, averaged over domains); its test split is read once, afterwards.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BrickworkError
from . import stats as S
from .lm_train import Models
from .train import load_row, save_row

#: MoE rows: one per router mode of ``brickwork route upcycle`` that needs only the fine-tunes'
#: own text (prompts / examples from each domain's fine-tuning documents).
MOE_ROUTERS: tuple[str, ...] = ("random", "hidden", "cheap_embed", "task", "train")
MOE_SPACE: dict[str, list[Any]] = {"top_k": [1, 2], "merge_method": [None, "linear"]}
N_PROMPTS = 8  # hidden / cheap_embed: positive prompts per expert
N_EXAMPLES = 64  # task / train: unlabelled examples per expert


class Evaluator:
    """Per-sequence mean next-token losses of a model on each domain's val or test split.
    ``calls`` records (split, domains) of every evaluation, for audits. Batches of 8: the
    logits of 32 sequences (66 MB at vocab 4096) were mapped and unmapped on every batch,
    a fifth of the evaluation's CPU time in page faults."""

    def __init__(self, splits: Mapping[str, Mapping[str, torch.Tensor]], batch: int = 8) -> None:
        self.splits, self.batch = splits, batch
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    @torch.no_grad()
    def losses(
        self, model: torch.nn.Module, split: str, domains: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        domains = list(self.splits[split]) if domains is None else list(domains)
        self.calls.append((split, tuple(domains)))
        model.eval()
        out = {}
        for d in domains:
            x = self.splits[split][d]  # (sequences, seq_len)
            per = []
            for s in range(0, len(x), self.batch):
                xb = x[s : s + self.batch]
                logits = model(input_ids=xb).logits[:, :-1].float()  # (b, seq_len - 1, vocab)
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), xb[:, 1:], reduction="none"
                )  # (b, seq_len - 1)
                per.append(nll.mean(1))
            out[d] = torch.cat(per).double().numpy()
        return out


def gain_kept(row: Mapping[str, float], base: Mapping[str, float], ft: Mapping[str, float]) -> dict:
    return {d: (base[d] - row[d]) / (base[d] - ft[d]) if base[d] != ft[d] else 0.0 for d in row}


def mean_losses(losses: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {d: float(np.mean(v)) for d, v in losses.items()}


def new_row(method: str, kind: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": method, "kind": kind, "status": "ok", "reason": None, "per_task": {},
        "loss_per_task": {}, "avg": None, "avg_ci": None, "normalized": None,
        "normalized_ci": None, "normalized_per_task": {}, "vs_linear": None, "params": None,
        "active_params": None, "latency_ms": None, "seconds": None, "train_seconds": None,
        "hyperparameters": {}, "validation": None, "recipe": None, "statistics": None,
    }  # fmt: skip
    row.update(kw)
    return row


#: The latency batch: the first ``LATENCY_BATCH`` validation sequences of the first domain;
#: ``LATENCY_REPEATS`` timed forwards after one warm-up, the fastest kept.
LATENCY_BATCH, LATENCY_REPEATS = 8, 5


def latency_batch(ev: Evaluator) -> torch.Tensor:
    """The fixed latency input: ``(LATENCY_BATCH, seq_len)`` validation token ids."""
    first = next(iter(ev.splits["val"].values()))
    return first[:LATENCY_BATCH]


@torch.no_grad()
def latency_ms(
    model: torch.nn.Module, batch: torch.Tensor, repeats: int = LATENCY_REPEATS
) -> float:
    """Milliseconds per sequence of one forward pass of ``model`` on ``batch`` (the fastest of
    ``repeats`` after a warm-up, on the current torch threads). The fastest, not the mean:
    other processes on the machine only ever add time."""
    model.eval()
    model(input_ids=batch)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=batch)
        best = min(best, time.perf_counter() - t0)
    return round(1000 * best / len(batch), 4)


def advance(b: Any) -> None:
    if b is not None:
        b.advance()


# ----------------------------------------------------------------------------- merge and MoE rows


def _merge_recipe(name: str, params: Mapping[str, Any], domains: Sequence[str], *,
                  needs_base: bool, seed: int, root: str) -> dict[str, Any]:  # fmt: skip
    return {
        "method": name,
        **({"base": f"{root}/base"} if needs_base else {}),
        "models": [{"model": f"{root}/{d}"} for d in domains],
        "parameters": dict(params),
        "seed": seed,
    }


def merge_rows(
    models: Models,
    ev: Evaluator,
    ref_val: tuple[dict[str, float], dict[str, float]],
    methods: Sequence[str] | None,
    *,
    seed: int,
    quick: bool,
    row_key: Callable[[str], str],
    reused: list[str],
    bar: Callable[[str, int], Any],
) -> list[dict[str, Any]]:
    """One row per merge method; each keeps its per-sequence test losses in ``_losses``."""
    from ..merge.api import merge_state_dicts
    from ..merge.registry import get_method, list_methods
    from .evaluate import MAX_COMBOS, grid, select_hyperparameters

    names = list_methods() if methods is None else [get_method(m).name for m in methods]
    domains = list(models.keys)
    fts = [models.state(models.keys[d]) for d in domains]
    base = models.state(models.base_key)
    holder = models.load(models.base_key)  # one module; each merge is loaded into it
    rows = []
    with bar("merge + select on validation", len(names)) as b:
        for name in names:
            key = row_key(f"merge:{name}")
            if (cached := load_row(key)) is not None:
                rows.append(cached)
                reused.append(name)
                advance(b)
                continue
            m, t0 = get_method(name), time.perf_counter()

            def merge(params: dict[str, Any], m: Any = m) -> dict[str, torch.Tensor]:
                return merge_state_dicts(m.name, fts, base=None if m.base == "none" else base,
                                         parameters=params, seed=seed)  # fmt: skip

            def score_val(state: dict[str, torch.Tensor]) -> dict[str, float]:
                holder.load_state_dict(state)
                return gain_kept(mean_losses(ev.losses(holder, "val")), *ref_val)

            combos = grid(m.search_space, cap=2 if quick else MAX_COMBOS)
            sel = select_hyperparameters(combos, merge, score_val, errors=(BrickworkError,))
            if sel.params is None or sel.state is None:
                rows.append(new_row(name, "merge", status="skipped", reason=sel.error,
                                    seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
            else:
                holder.load_state_dict(sel.state)
                losses = ev.losses(holder, "test")  # the only test read
                rows.append(new_row(
                    name, "merge", hyperparameters=sel.params,
                    validation={"normalized": round(sel.val_avg, 6), "tried": sel.tried},
                    params=sum(v.numel() for v in base.values()),
                    active_params=sum(v.numel() for v in base.values()),
                    seconds=round(time.perf_counter() - t0, 2),
                    recipe=_merge_recipe(name, sel.params, domains, needs_base=m.base != "none",
                                         seed=seed, root="../models"),
                    _losses={d: v.tolist() for d, v in losses.items()},
                ))  # fmt: skip
            save_row(key, rows[-1])
            advance(b)
    return rows


#: Calibration sequences per fine-tune (from its own fine-tuning documents) for the Gram
#: matrices (RegMean, RegMean++) and the diagonal Fisher; batches of LM_BATCH.
LM_GRAM_SEQS, LM_FISHER_SEQS, LM_BATCH = 64, 32, 8


def calibration(models: Models, n: int) -> dict[str, torch.Tensor]:
    """Per domain, ``n`` packed sequences of its fine-tuning documents (the data its
    fine-tune was trained on; never val or test): ``(n, seq_len)`` token ids."""
    from . import lm_data as LD

    return {
        d: torch.tensor(LD.sequences(models.tokenizer, t.buckets["finetune"], models.cfg.seq_len, n))
        for d, t in models.texts.items()
    }  # fmt: skip


def _lm_batches(x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": x[s : s + LM_BATCH]} for s in range(0, len(x), LM_BATCH)]


def data_rows(
    models: Models,
    ev: Evaluator,
    ref_val: tuple[dict[str, float], dict[str, float]],
    names: Sequence[str],
    *,
    seed: int,
    quick: bool,
    row_key: Callable[[str], str],
    reused: list[str],
    bar: Callable[[str, int], Any],
) -> list[dict[str, Any]]:
    """Rows of the data-aware merges: statistics of each fine-tune on its own fine-tuning
    sequences, AdaMerging on the unlabelled validation sequences; each row's ``recipe``
    names the calibration files (``recipes/calibration/<domain>-<n | val>.safetensors``, written
    by :func:`brickwork.bench.lm_report.write_recipes`) so ``brickwork merge`` repeats it."""
    from ..merge.api import merge_state_dicts
    from ..merge.data_aware import run_module_level
    from ..merge.registry import get_method
    from ..stats import StatisticsSource, statistics_for
    from .data_rows import PeakRSS, adamerging_combos
    from .evaluate import MAX_COMBOS, grid, select_hyperparameters

    domains = list(models.keys)
    fts = [models.state(models.keys[d]) for d in domains]
    base = models.state(models.base_key)
    holder = models.load(models.base_key)
    calib = {n: calibration(models, n) for n in {LM_GRAM_SEQS, LM_FISHER_SEQS}}

    def score_val(state: dict[str, torch.Tensor]) -> dict[str, float]:
        holder.load_state_dict(state)
        return gain_kept(mean_losses(ev.losses(holder, "val")), *ref_val)

    def module_level(m: Any) -> tuple[Callable[[dict[str, Any]], Any], dict[str, Any], int]:
        adapt = m.name == "adamerging"
        xs = ev.splits["val"] if adapt else calib[LM_GRAM_SEQS]
        data = [_lm_batches(xs[d]) for d in domains]
        encs = [models.load(models.keys[d]) for d in domains]
        base_m = models.load(models.base_key)
        info: dict[str, Any] = {"kinds": list(m.statistics), "split": "val" if adapt else "train",
                                "examples_per_model": min(len(xs[d]) for d in domains),
                                "cached": False}  # fmt: skip

        def merge(params: dict[str, Any]) -> dict[str, torch.Tensor]:
            with PeakRSS() as rss:
                s0 = time.perf_counter()
                out, _ = run_module_level(m, encs, base=base_m, data=data, parameters=params,
                                          seed=seed)  # fmt: skip
            info["seconds"], info["peak_rss_mb"] = round(time.perf_counter() - s0, 2), rss.peak_mb
            info["rss_before_mb"] = rss.start_mb
            return {k: v.detach().clone() for k, v in out.state_dict().items()}

        return merge, info, "val" if adapt else LM_GRAM_SEQS

    def tensor_level(m: Any) -> tuple[Callable[[dict[str, Any]], Any], dict[str, Any], int]:
        n = LM_FISHER_SEQS if "fisher" in m.statistics else LM_GRAM_SEQS
        with PeakRSS() as rss:
            s0 = time.perf_counter()
            files = {
                f"model{i}": {
                    k: statistics_for(models.load(models.keys[d]), _lm_batches(calib[n][d]), k,
                                      model_hash=models.keys[d], seed=seed, where=f"fine-tune {d}")
                    for k in m.statistics
                }
                for i, d in enumerate(domains)
            }  # fmt: skip
        source = StatisticsSource(files)
        info = {"kinds": list(m.statistics), "split": "train", "examples_per_model": n,
                "seconds": round(time.perf_counter() - s0, 2), "peak_rss_mb": rss.peak_mb,
                "rss_before_mb": rss.start_mb,
                "cached": all(f.hit for fs in files.values() for f in fs.values())}  # fmt: skip

        def merge(params: dict[str, Any]) -> dict[str, torch.Tensor]:
            return merge_state_dicts(m.name, fts, base=None if m.base == "none" else base,
                                     parameters=params, seed=seed, statistics=source)  # fmt: skip

        return merge, info, n

    rows = []
    with bar("data-aware merges", len(names)) as b:
        for name in names:
            key = row_key(f"merge:{name}")
            if (cached := load_row(key)) is not None:
                rows.append(cached)
                reused.append(name)
                advance(b)
                continue
            m, t0 = get_method(name), time.perf_counter()
            sel, err = None, None
            try:
                merge, info, n = (module_level if m.level == "module" else tensor_level)(m)
                combos = grid(m.search_space, cap=2 if quick else MAX_COMBOS)
                if name == "adamerging":  # as on the text suite
                    combos = adamerging_combos(combos, quick=quick)
                sel = select_hyperparameters(combos, merge, score_val, errors=(BrickworkError,))
            except BrickworkError as e:
                err = str(e)
            if sel is None or sel.params is None or sel.state is None:
                rows.append(new_row(name, "merge", status="skipped",
                                    reason=err if sel is None else sel.error,
                                    seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
            else:
                holder.load_state_dict(sel.state)
                losses = ev.losses(holder, "test")  # the only test read
                recipe = _merge_recipe(name, sel.params, domains, needs_base=m.base != "none",
                                       seed=seed, root="../models")  # fmt: skip
                for e, d in zip(recipe["models"], domains):  # n: sequences, or "val"
                    size = len(ev.splits["val"][d]) if n == "val" else n
                    e["data"] = {"path": f"calibration/{d}-{n}.safetensors",
                                 "n_examples": size, "batch_size": LM_BATCH}  # fmt: skip
                rows.append(new_row(
                    name, "merge", hyperparameters=sel.params,
                    validation={"normalized": round(sel.val_avg, 6), "tried": sel.tried},
                    params=sum(v.numel() for v in base.values()),
                    active_params=sum(v.numel() for v in base.values()),
                    seconds=round(time.perf_counter() - t0, 2), statistics=info, recipe=recipe,
                    _losses={d: v.tolist() for d, v in losses.items()},
                ))  # fmt: skip
            save_row(key, rows[-1])
            advance(b)
    return rows


def _moe_recipe(router: str, params: Mapping[str, Any], domains: Sequence[str], *, seed: int,
                root: str, prompts: Mapping[str, list[str]], data: str,
                max_length: int) -> dict[str, Any]:  # fmt: skip
    """A ``brickwork route upcycle`` recipe: prompts inline, examples as files under
    ``data`` (relative to the recipe, one a line)."""
    experts = []
    for d in domains:
        e: dict[str, Any] = {"model": f"{root}/{d}"}
        if router in ("hidden", "cheap_embed"):
            e["positive_prompts"] = list(prompts[d])
        if router in ("task", "train"):
            e["examples_file"] = f"{data}/{d}.examples.txt"
        experts.append(e)
    r: dict[str, Any] = {"base": f"{root}/base", "experts": experts, "format": "mixtral",
                         "top_k": params["top_k"], "router_init": router, "device": "cpu",
                         "max_length": max_length, "seed": seed}  # fmt: skip
    if params.get("merge_method"):
        r["merge_method"] = params["merge_method"]
    return r


def router_texts(models: Models) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(prompts, examples) per domain for the router modes: the first fine-tuning
    documents (prompts: hidden / cheap_embed; examples: task / train), never val or test."""
    prompts, examples = {}, {}
    for d, t in models.texts.items():
        docs = t.buckets["finetune"]
        prompts[d] = [x[:300] for x in docs[:N_PROMPTS]]
        examples[d] = [x[:600] for x in docs[:N_EXAMPLES]]
    return prompts, examples


def write_examples(examples: Mapping[str, list[str]], where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for d, xs in examples.items():
        (where / f"{d}.examples.txt").write_text("\n".join(xs) + "\n")


def moe_rows(
    models: Models,
    ev: Evaluator,
    ref_val: tuple[dict[str, float], dict[str, float]],
    routers: Sequence[str],
    *,
    seed: int,
    quick: bool,
    row_key: Callable[[str], str],
    reused: list[str],
    bar: Callable[[str, int], Any],
) -> list[dict[str, Any]]:
    """One Mixtral per router mode, built by ``upcycle_from_recipe`` from a recipe file."""
    import yaml
    from transformers import AutoModelForCausalLM

    from ..route.recipe import upcycle_from_recipe
    from .evaluate import grid

    domains = list(models.keys)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="brickwork-lm-moe-") as tmp,
        bar("upcycle MoEs + select on validation", len(routers)) as b,
    ):
        work = Path(tmp)
        (work / "models").mkdir()
        for name, key in [("base", models.base_key), *models.keys.items()]:
            (work / "models" / name).symlink_to(models.dir(key).resolve())  # cache may be relative
        prompts, examples = router_texts(models)
        write_examples(examples, work / "recipes" / "router_text")
        for router in routers:
            name = f"moe_{router}"
            key = row_key(f"moe:{router}")
            if (cached := load_row(key)) is not None:
                rows.append(cached)
                reused.append(name)
                advance(b)
                continue
            t0, best, tried = time.perf_counter(), None, []
            for params in grid(MOE_SPACE, cap=2 if quick else 4):
                recipe = _moe_recipe(router, params, domains, seed=seed, root="../models",
                                     prompts=prompts, data="router_text",
                                     max_length=models.cfg.seq_len)  # fmt: skip
                if quick and router == "train":
                    recipe["router_train"] = {"steps": 3}
                path = work / "recipes" / f"{name}.yaml"
                path.write_text(yaml.safe_dump(recipe, sort_keys=False))
                out = work / "moe" / f"{name}-{len(tried)}"
                try:
                    upcycle_from_recipe(path, out, seed=seed)
                except BrickworkError as e:
                    tried.append({"params": params, "error": str(e)})
                    continue
                moe = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
                score = gain_kept(mean_losses(ev.losses(moe, "val")), *ref_val)
                val = sum(score.values()) / len(score)
                tried.append({"params": params, "val_avg": round(val, 6)})
                if best is None or val > best[0]:
                    best = (val, params, moe, recipe)
            if best is None:
                rows.append(new_row(name, "moe", status="skipped", reason=tried[-1].get("error"),
                                    seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
            else:
                val, params, moe, recipe = best
                losses = ev.losses(moe, "test")  # the only test read
                cfg = moe.config
                n_total = sum(p.numel() for p in moe.parameters())
                ffn = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers
                active = n_total - (cfg.num_local_experts - params["top_k"]) * ffn
                rows.append(new_row(
                    name, "moe", hyperparameters=dict(params),
                    validation={"normalized": round(val, 6), "tried": tried},
                    params=n_total, active_params=active,
                    seconds=round(time.perf_counter() - t0, 2), recipe=recipe,
                    _losses={d: v.tolist() for d, v in losses.items()},
                ))  # fmt: skip
            save_row(key, rows[-1])
            advance(b)
    return rows


# ----------------------------------------------------------------------------- scores


def score_rows(rows: list[dict[str, Any]], boot: S.Bootstrap) -> None:
    """Fill each ok row's perplexities, normalized score, intervals and ``vs_linear`` from
    its per-sequence test losses (``_losses``, removed)."""
    by = {r["method"]: r for r in rows}
    base_l = {d: np.asarray(v) for d, v in by["base"]["_losses"].items()}
    ind_l = {d: np.asarray(v) for d, v in by["individual"]["_losses"].items()}
    base_m, ind_m = boot.means(base_l), boot.means(ind_l)
    base_p, ind_p = mean_losses(base_l), mean_losses(ind_l)
    reps: dict[str, np.ndarray] = {}
    for r in rows:
        losses = r.pop("_losses", None)
        if r["status"] != "ok" or losses is None:
            continue
        lo = {d: np.asarray(v) for d, v in losses.items()}
        point = mean_losses(lo)
        m = boot.means(lo)
        reps[r["method"]] = S.loss_gain_kept(m, base_m, ind_m)
        avg_rep = np.exp(S.average(m))
        r["per_task"] = {d: round(math.exp(v), 4) for d, v in point.items()}
        r["loss_per_task"] = {d: round(v, 5) for d, v in point.items()}
        r["avg"] = round(math.exp(sum(point.values()) / len(point)), 4)
        r["avg_ci"] = [round(x, 4) for x in S.interval(avg_rep)]
        kept = gain_kept(point, base_p, ind_p)
        r["normalized_per_task"] = {d: round(v, 4) for d, v in kept.items()}
        r["normalized"] = round(sum(kept.values()) / len(kept), 4)
        r["normalized_ci"] = [round(x, 4) for x in S.interval(reps[r["method"]])]
    if "linear" in reps:
        for r in rows:
            if r["method"] in reps and r["kind"] != "reference" and r["method"] != "linear":
                r["vs_linear"] = S.compare(reps[r["method"]], reps["linear"])
