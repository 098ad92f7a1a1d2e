"""``brickwork bench --suite lm``: a small Llama pretrained on Debian text, one fine-tune per
domain, every registered merge method and upcycled Mixtral MoEs of the fine-tunes, scored by
held-out perplexity.

Rows: ``base``; ``individual`` (each fine-tune on its own domain); one row per registered
merge method (``merge_state_dicts`` of the fine-tunes, hyperparameters from the method's
``search_space`` chosen on the validation split); ``moe_<router>``: the fine-tunes upcycled
into a Mixtral through ``upcycle_from_recipe``, the code path of ``brickwork route upcycle``,
one row per router mode (top-k and the non-FFN tensors, base's or averaged, chosen on
validation). The test split is read once per row, after the selection.

Scores: per domain the perplexity ``exp(L)`` of the test sequences (``L``: the mean over
sequences of each sequence's mean next-token loss); ``normalized`` = mean over domains of
``(L_base - L_row) / (L_base - L_finetune)`` (1: the row keeps each fine-tune's gain, 0: no
better than the base); 95 % bootstrap intervals over test sequences, the same resamples for
every row (:mod:`brickwork.bench.stats`); ``vs_linear``: the paired comparison of
``normalized`` with the ``linear`` row.

Written under ``out``: ``models/`` (base and fine-tunes, Hugging Face directories with the
tokenizer), ``recipes/<row>.yaml`` (``brickwork merge`` / ``brickwork route upcycle``
recipes that rebuild each row from ``models/``), ``results.json``, ``results.md``,
``normalized.png``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BrickworkError
from . import lm_data as LD
from . import lm_report as report
from . import lm_train as LT
from . import stats as S
from .train import cache_root, load_row, save_row, source_hash

#: MoE rows: one per router mode of ``brickwork route upcycle`` that needs only the fine-tunes'
#: own text (prompts / examples from each domain's fine-tuning documents).
MOE_ROUTERS: tuple[str, ...] = ("random", "hidden", "cheap_embed", "task", "train")
MOE_SPACE: dict[str, list[Any]] = {"top_k": [1, 2], "merge_method": [None, "linear"]}
N_PROMPTS = 8  # hidden / cheap_embed: positive prompts per expert
N_EXAMPLES = 64  # task / train: unlabelled examples per expert
ROW_FIELDS = ("method", "kind", "status", "reason")


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


def _kept(row: Mapping[str, float], base: Mapping[str, float], ft: Mapping[str, float]) -> dict:
    return {d: (base[d] - row[d]) / (base[d] - ft[d]) if base[d] != ft[d] else 0.0 for d in row}


def _mean(losses: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {d: float(np.mean(v)) for d, v in losses.items()}


def _row(method: str, kind: str, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": method, "kind": kind, "status": "ok", "reason": None, "per_task": {},
        "loss_per_task": {}, "avg": None, "avg_ci": None, "normalized": None,
        "normalized_ci": None, "normalized_per_task": {}, "vs_linear": None, "params": None,
        "active_params": None, "seconds": None, "train_seconds": None, "hyperparameters": {},
        "validation": None, "recipe": None,
    }  # fmt: skip
    row.update(kw)
    return row


@functools.cache  # once per process: the code it runs, not later edits on disk
def _code_hash() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(source_hash("merge", "checkpoint", "route").encode())
    # not lm_train.py: the models a row reads are in its key by their own hashes
    for f in ("lm.py", "lm_data.py", "stats.py", "evaluate.py"):
        h.update((here / f).read_bytes())
    return h.hexdigest()[:16]


def _dpkg_version(pkg: str) -> str | None:
    import subprocess

    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                           text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


# ----------------------------------------------------------------------------- models


class Models:
    """The tokenizer, base and fine-tunes of one configuration: cached HF directories."""

    def __init__(self, cfg: LT.LMConfig, texts: Mapping[str, LD.DomainText], seed: int) -> None:
        self.cfg, self.texts, self.seed = cfg, texts, seed
        fps = [(d, t.fingerprint()) for d, t in texts.items()]
        self.base_key = LT.model_key("base", cfg=cfg.pretrain_part(), data=fps, seed=seed)
        ft = {"steps": cfg.finetune_steps, "lr": cfg.finetune_lr}
        self.keys = {d: LT.model_key("finetune", base=self.base_key, domain=d, data=fp,
                                     cfg=ft, seed=seed) for d, fp in fps}  # fmt: skip
        self.hits: dict[str, bool] = {}
        self.train_seconds: dict[str, float | None] = {}

    def dir(self, key: str) -> Path:
        return cache_root() / f"lm-{key}"

    def prepare(self, *, jobs: int, bar: Callable[[str, int], Any]) -> None:
        """Train (or find in the cache) the base and every fine-tune."""
        cfg = self.cfg
        self.hits["base"] = LT.cached_dir(self.base_key) is not None
        if not self.hits["base"]:
            tok = LD.train_tokenizer(LD.tokenizer_sample(self.texts, cfg.tokenizer_docs),
                                     cfg.vocab_size)  # fmt: skip
            need = math.ceil(cfg.pretrain_steps * cfg.batch_size / len(self.texts))
            seqs = [s for t in self.texts.values()
                    for s in LD.sequences(tok, t.buckets["pretrain"], cfg.seq_len, need)]  # fmt: skip
            with bar("pretrain the base", cfg.pretrain_steps) as b:
                LT.pretrain(cfg, tok, seqs, self.dir(self.base_key), seed=self.seed,
                            record={"kind": "bench.lm.base", "config": asdict(cfg),
                                    "domains": list(self.texts), "sequences": len(seqs)},
                            progress=b.advance if b is not None else None)  # fmt: skip
        self.tokenizer = self._tokenizer()
        todo = []
        for d, key in self.keys.items():
            self.hits[d] = LT.cached_dir(key) is not None
            if not self.hits[d]:
                n = cfg.finetune_steps * cfg.batch_size
                seqs = LD.sequences(
                    self.tokenizer, self.texts[d].buckets["finetune"], cfg.seq_len, n
                )
                todo.append({"cfg": asdict(cfg), "base": str(self.dir(self.base_key)),
                             "seqs": seqs, "out": str(self.dir(key)), "seed": self.seed,
                             "record": {"kind": "bench.lm.finetune", "domain": d,
                                        "base": self.base_key, "sequences": len(seqs)}})  # fmt: skip
        with bar(f"fine-tunes ({min(jobs, max(1, len(todo)))} processes)", len(todo)) as b:
            LT.finetune_all(todo, processes=jobs, progress=b.advance if b is not None else None)
        for name, key in [("base", self.base_key), *self.keys.items()]:
            rec = _read_json(self.dir(key) / "brickwork.json")
            self.train_seconds[name] = rec.get("train_seconds")

    def _tokenizer(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.dir(self.base_key)))

    def load(self, key: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.dir(key)), dtype=torch.float32)

    def state(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir(key) / "model.safetensors"))


def _read_json(p: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- rows


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
                _adv(b)
                continue
            m, t0 = get_method(name), time.perf_counter()

            def merge(params: dict[str, Any], m: Any = m) -> dict[str, torch.Tensor]:
                return merge_state_dicts(m.name, fts, base=None if m.base == "none" else base,
                                         parameters=params, seed=seed)  # fmt: skip

            def score_val(state: dict[str, torch.Tensor]) -> dict[str, float]:
                holder.load_state_dict(state)
                return _kept(_mean(ev.losses(holder, "val")), *ref_val)

            combos = grid(m.search_space, cap=2 if quick else MAX_COMBOS)
            sel = select_hyperparameters(combos, merge, score_val, errors=(BrickworkError,))
            if sel.params is None or sel.state is None:
                rows.append(_row(name, "merge", status="skipped", reason=sel.error,
                                 seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
            else:
                holder.load_state_dict(sel.state)
                losses = ev.losses(holder, "test")  # the only test read
                rows.append(_row(
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
            _adv(b)
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
            (work / "models" / name).symlink_to(models.dir(key))
        prompts, examples = router_texts(models)
        write_examples(examples, work / "recipes" / "router_text")
        for router in routers:
            name = f"moe_{router}"
            key = row_key(f"moe:{router}")
            if (cached := load_row(key)) is not None:
                rows.append(cached)
                reused.append(name)
                _adv(b)
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
                score = _kept(_mean(ev.losses(moe, "val")), *ref_val)
                val = sum(score.values()) / len(score)
                tried.append({"params": params, "val_avg": round(val, 6)})
                if best is None or val > best[0]:
                    best = (val, params, moe, recipe)
            if best is None:
                rows.append(_row(name, "moe", status="skipped", reason=tried[-1].get("error"),
                                 seconds=round(time.perf_counter() - t0, 2)))  # fmt: skip
            else:
                val, params, moe, recipe = best
                losses = ev.losses(moe, "test")  # the only test read
                cfg = moe.config
                n_total = sum(p.numel() for p in moe.parameters())
                ffn = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers
                active = n_total - (cfg.num_local_experts - params["top_k"]) * ffn
                rows.append(_row(
                    name, "moe", hyperparameters=dict(params),
                    validation={"normalized": round(val, 6), "tried": tried},
                    params=n_total, active_params=active,
                    seconds=round(time.perf_counter() - t0, 2), recipe=recipe,
                    _losses={d: v.tolist() for d, v in losses.items()},
                ))  # fmt: skip
            save_row(key, rows[-1])
            _adv(b)
    return rows


# ----------------------------------------------------------------------------- scores


def score_rows(rows: list[dict[str, Any]], boot: S.Bootstrap) -> None:
    """Fill each ok row's perplexities, normalized score, intervals and ``vs_linear`` from
    its per-sequence test losses (``_losses``, removed)."""
    by = {r["method"]: r for r in rows}
    base_l = {d: np.asarray(v) for d, v in by["base"]["_losses"].items()}
    ind_l = {d: np.asarray(v) for d, v in by["individual"]["_losses"].items()}
    base_m, ind_m = boot.means(base_l), boot.means(ind_l)
    base_p, ind_p = _mean(base_l), _mean(ind_l)
    reps: dict[str, np.ndarray] = {}
    for r in rows:
        losses = r.pop("_losses", None)
        if r["status"] != "ok" or losses is None:
            continue
        lo = {d: np.asarray(v) for d, v in losses.items()}
        point = _mean(lo)
        m = boot.means(lo)
        reps[r["method"]] = S.loss_gain_kept(m, base_m, ind_m)
        avg_rep = np.exp(S.average(m))
        r["per_task"] = {d: round(math.exp(v), 4) for d, v in point.items()}
        r["loss_per_task"] = {d: round(v, 5) for d, v in point.items()}
        r["avg"] = round(math.exp(sum(point.values()) / len(point)), 4)
        r["avg_ci"] = [round(x, 4) for x in S.interval(avg_rep)]
        kept = _kept(point, base_p, ind_p)
        r["normalized_per_task"] = {d: round(v, 4) for d, v in kept.items()}
        r["normalized"] = round(sum(kept.values()) / len(kept), 4)
        r["normalized_ci"] = [round(x, 4) for x in S.interval(reps[r["method"]])]
    if "linear" in reps:
        for r in rows:
            if r["method"] in reps and r["kind"] != "reference" and r["method"] != "linear":
                r["vs_linear"] = S.compare(reps[r["method"]], reps["linear"])


# ----------------------------------------------------------------------------- the run


def _adv(b: Any) -> None:
    if b is not None:
        b.advance()


def split_names(methods: Sequence[str] | None, *, moe: bool) -> tuple[list[str] | None, list[str]]:
    """(merge methods or None for all, router modes) of ``--methods`` (``moe_<router>``)."""
    if methods is None:
        return None, list(MOE_ROUTERS) if moe else []
    merges = [m for m in methods if not m.startswith("moe_")]
    routers = [m.removeprefix("moe_") for m in methods if m.startswith("moe_")]
    unknown = [r for r in routers if r not in MOE_ROUTERS]
    if unknown:
        raise BrickworkError(
            f"unknown MoE row(s) {', '.join('moe_' + u for u in unknown)}; known: "
            + ", ".join(f"moe_{r}" for r in MOE_ROUTERS)
            + "."
        )
    return merges, routers


def run_lm_bench(
    *,
    out: Path | None = None,
    quick: bool = False,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    console: Any = None,
    moe: bool = True,
    jobs: int | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the LM suite and write ``models/``, ``recipes/``, ``results.json``, ``results.md``
    and ``normalized.png`` under ``out`` (default ``bench-results/lm-<date>/``). ``tasks``:
    domains (default: every installed one); ``methods``: merge methods and ``moe_<router>``
    rows; ``jobs``: processes training fine-tunes (default 2; 1 with ``quick``)."""
    from transformers.utils import logging as hf_logging

    old, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per model loaded
    try:
        return _run(out=out, quick=quick, domains=tasks, methods=methods, seed=seed,
                    progress=progress, console=console, moe=moe, jobs=jobs)  # fmt: skip
    finally:
        torch.set_num_threads(old)
        if bars:
            hf_logging.enable_progress_bar()


def _run(*, out: Path | None, quick: bool, domains: list[str] | None,
         methods: list[str] | None, seed: int, progress: bool, console: Any, moe: bool,
         jobs: int | None) -> dict[str, Any]:  # fmt: skip
    from rich.console import Console

    from .data import MissingDataError
    from .runner import _progress_factory

    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    merges, routers = split_names(methods, moe=moe)
    bar = _progress_factory(console, progress)
    cfg = LT.QUICK if quick else LT.FULL
    texts, skipped = LD.load_domains(domains, seed)
    for name, why in skipped.items():
        console.print(f"skipping domain {name}: {why}", markup=False)
    if len(texts) < 2:
        raise MissingDataError(
            f"the LM suite needs at least two domains; readable: {list(texts) or 'none'}. "
            + " ".join(skipped.values())
        )
    jobs = jobs or (1 if quick else min(2, os.cpu_count() or 1))
    models = Models(cfg, texts, seed)
    models.prepare(jobs=jobs, bar=bar)
    tok = models.tokenizer
    splits = {
        split: {d: torch.tensor(LD.sequences(tok, t.buckets[split], cfg.seq_len, n))
                for d, t in texts.items()}
        for split, n in (("val", cfg.val_seqs), ("test", cfg.test_seqs))
    }  # fmt: skip
    ev = Evaluator(splits)
    code = _code_hash()
    data_fp = [(d, t.fingerprint()) for d, t in texts.items()]

    def row_key(what: str) -> str:
        return LT.model_key(f"row:{what}", base=models.base_key, models=models.keys,
                            data=data_fp, cfg=asdict(cfg), seed=seed, code=code)  # fmt: skip

    reused: list[str] = []
    refs = _reference_rows(models, ev, row_key, reused, bar)
    ref_val = (refs[0].pop("_val"), refs[1].pop("_val"))
    rows = refs + merge_rows(models, ev, ref_val, merges, seed=seed, quick=quick,
                             row_key=row_key, reused=reused, bar=bar)  # fmt: skip
    rows += moe_rows(models, ev, ref_val, routers, seed=seed, quick=quick, row_key=row_key,
                     reused=reused, bar=bar)  # fmt: skip
    boot = S.Bootstrap({d: len(x) for d, x in splits["test"].items()}, seed=seed)
    score_rows(rows, boot)

    out = Path(out) if out is not None else Path("bench-results") / f"lm-{_dt.date.today()}"
    model_dirs = _export(models, out)
    results = {
        "schema": report.SCHEMA_VERSION, "suite": "lm", "metric": "perplexity", "seed": seed,
        "quick": quick, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": [{
            "name": d, "description": t.domain.description, "packages": {
                p: _dpkg_version(p) for p, path in zip(t.domain.packages, t.domain.paths)
                if path.exists()},
            "n_train": len(t.buckets["finetune"]), "n_pretrain": len(t.buckets["pretrain"]),
            "n_val": len(splits["val"][d]), "n_test": len(splits["test"][d]),
            "sizes": {"pretrain_docs": len(t.buckets["pretrain"]),
                      "finetune_docs": len(t.buckets["finetune"]),
                      "finetune_seqs": cfg.finetune_steps * cfg.batch_size,
                      "val_seqs": len(splits["val"][d]), "test_seqs": len(splits["test"][d])},
        } for d, t in texts.items()],
        "skipped_tasks": skipped, "train_config": asdict(cfg),
        "model": {"architecture": "LlamaForCausalLM", "vocab_size": len(tok),
                  "params": sum(v.numel() for v in models.state(models.base_key).values())},
        "models": model_dirs,
        "cache": {"hits": models.hits, "reused_rows": reused},
        "bootstrap": {"resamples": boot.n, "seed": seed, "level": S.LEVEL},
        "rows": rows, "environment": _environment(),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }  # fmt: skip
    report.write_recipes(results, out)
    if routers:  # the files the MoE recipes' examples_file entries name
        write_examples(router_texts(models)[1], out / "recipes" / "router_text")
    report.validate(results)
    report.write(results, out)
    report.print_table(results, console, out=out)
    console.print(f"results written to {out}/ (wall time {results['wall_seconds']:.0f} s)",
                  markup=False)  # fmt: skip
    return results


def _reference_rows(models: Models, ev: Evaluator, row_key: Callable[[str], str],
                    reused: list[str], bar: Callable[[str, int], Any]) -> list[dict[str, Any]]:  # fmt: skip
    """``base`` and ``individual``, with test losses (``_losses``) and mean val losses
    (``_val``: the references of the validation score)."""
    n = sum(v.numel() for v in models.state(models.base_key).values())
    domains = list(models.keys)
    key = row_key("references")
    if (cached := load_row(key)) is not None:
        reused += ["base", "individual"]
        return cached["rows"]
    with bar("evaluate base and fine-tunes", 1 + len(domains)) as b:
        t0 = time.perf_counter()
        base = models.load(models.base_key)
        bt, bv = ev.losses(base, "test"), ev.losses(base, "val")
        _adv(b)
        rows = [_row("base", "reference", params=n, active_params=n,
                     seconds=round(time.perf_counter() - t0, 2),
                     train_seconds=models.train_seconds.get("base"),
                     _losses={d: v.tolist() for d, v in bt.items()}, _val=_mean(bv))]  # fmt: skip
        t0, it, iv = time.perf_counter(), {}, {}
        for d, k in models.keys.items():
            ft = models.load(k)
            it |= ev.losses(ft, "test", [d])
            iv |= ev.losses(ft, "val", [d])
            _adv(b)
    ts = [models.train_seconds.get(d) for d in domains]
    rows.append(_row("individual", "reference", params=n * len(domains), active_params=n,
                     seconds=round(time.perf_counter() - t0, 2),
                     train_seconds=round(sum(t for t in ts if t), 2) if any(ts) else None,
                     _losses={d: v.tolist() for d, v in it.items()}, _val=_mean(iv)))  # fmt: skip
    save_row(key, {"rows": rows})
    return [dict(r) for r in rows]


def _export(models: Models, out: Path) -> dict[str, str]:
    """The base and fine-tunes under ``out/models/`` (through the shared writer; skipped
    when the same model is already there)."""
    dirs = {}
    for name, key in [("base", models.base_key), *models.keys.items()]:
        dst = out / "models" / name
        dirs[name] = f"models/{name}"
        if _read_json(dst / "brickwork.json").get("cache_key") == key:
            continue
        LT.export_model(models.dir(key), dst, record={
            "kind": "bench.lm.model", "role": name, "cache_key": key,
            **{k: v for k, v in _read_json(models.dir(key) / "brickwork.json").items()
               if k not in ("environment",)},
        })  # fmt: skip
    return dirs


def _environment() -> dict[str, Any]:
    from .report import environment

    env = environment()
    from importlib import metadata

    try:
        env["packages"]["tokenizers"] = metadata.version("tokenizers")
    except metadata.PackageNotFoundError:
        env["packages"]["tokenizers"] = None
    return env
