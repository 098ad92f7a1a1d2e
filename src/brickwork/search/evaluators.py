"""What a search maximises: one float per candidate, from the *validation* data only.

* ``callable: package.module:function`` — ``function(model) -> float`` (higher is better).
  ``model`` is the merged network as a Hugging Face module when the reference model (the
  base, else the first model) is a directory with ``config.json``, otherwise the merged
  state dict. A function with a ``tokenizer`` parameter also receives the reference
  model's tokenizer (``None`` if it has none).
* ``perplexity: [FILE, ...]`` — text files (one example per line, or ``.jsonl``/
  ``.safetensors`` as a recipe's ``data:`` block), tokenised with the reference model's
  tokenizer; the score is minus the mean next-token loss (so lower perplexity is better).
* ``bench_task: NAME | [NAMES] | all`` with ``suite: text`` (or ``digits``) — the mean over
  tasks of the merged encoder's validation accuracy with each task's fine-tuned head,
  divided by the fine-tune's own validation accuracy (the bench's *normalized*, on
  validation); with ``suite: lm`` — the mean over domains of the share of each fine-tune's
  loss gain kept on the validation sequences. Their ``test`` reads the test split; the
  search calls it once, for the best candidate, at the end.
* lm-eval-harness tasks (mergekit-evolve's ``tasks:``) need ``lm-eval`` installed.

Evaluators are built inside each Ray worker (:meth:`Evaluator.setup`), once per worker.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, RecipeError
from .config import EvaluatorSpec

#: A genome model reference to a benchmark model: ``bench:text/<task>`` or ``bench:text/base``.
BENCH_PREFIX = "bench:"


class Evaluator:
    """``setup()`` once per worker, then ``score(state)`` per candidate."""

    def setup(self) -> None:
        return None

    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        raise NotImplementedError

    def test(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """The best candidate's test score (bench evaluators only; read once, at the end)."""
        return None


def _hf_dir(reference: str | None) -> Path | None:
    if reference is None:
        return None
    p = Path(reference)
    d = p if p.is_dir() else p.parent
    return d if (d / "config.json").is_file() else None


class _HFModel:
    """One module built from the reference model's config, reloaded per candidate."""

    def __init__(self, reference: str | None, what: str, *, required: bool) -> None:
        self.dir = _hf_dir(reference)
        if self.dir is None and required:
            raise DataError(
                f"{what}: the reference model {reference} is not a Hugging Face directory "
                "(config.json + weights), so there is no network to run; give model "
                "directories, or use evaluator.callable with a function of the state dict"
            )
        self.module: torch.nn.Module | None = None

    def load(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module | None:
        if self.dir is None:
            return None
        if self.module is None:
            from ..stats.data import load_hf_module

            self.module = load_hf_module(self.dir, "search evaluator")
        own = self.module.state_dict()
        fill = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in fill]
        tied = getattr(self.module.config, "tie_word_embeddings", False)
        if missing and not (tied and all(k.endswith("lm_head.weight") for k in missing)):
            raise DataError(
                f"search evaluator: the merged model lacks {len(missing)} tensor(s) of "
                f"{self.dir}, e.g. '{missing[0]}'"
            )
        self.module.load_state_dict(fill, strict=False)
        if tied and hasattr(self.module, "tie_weights"):
            self.module.tie_weights()
        return self.module.eval()


class CallableEvaluator(Evaluator):
    def __init__(self, spec: EvaluatorSpec, reference: str | None) -> None:
        self.target = spec.callable
        self.reference = reference
        self.fn: Any = None

    def setup(self) -> None:
        mod_name, _, fn_name = str(self.target).partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise RecipeError(
                f"evaluator.callable = {self.target!r}: cannot import module '{mod_name}' "
                f"({e}); is it installed or on PYTHONPATH?"
            ) from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise RecipeError(
                f"evaluator.callable = {self.target!r}: module '{mod_name}' has no function "
                f"'{fn_name}'"
            )
        self.fn = fn
        self.wants_tokenizer = "tokenizer" in inspect.signature(fn).parameters
        self.model = _HFModel(self.reference, "evaluator.callable", required=False)
        self.tokenizer = None
        if self.wants_tokenizer and self.model.dir is not None:
            from ..stats.data import load_tokenizer

            self.tokenizer = load_tokenizer(self.model.dir, "evaluator.callable")

    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        model = self.model.load(state)
        arg = model if model is not None else dict(state)
        with torch.no_grad():
            out = self.fn(arg, tokenizer=self.tokenizer) if self.wants_tokenizer else self.fn(arg)
        try:
            return float(out)
        except (TypeError, ValueError):
            raise RecipeError(
                f"evaluator.callable {self.target!r} returned {type(out).__name__}, not a number"
            ) from None


class PerplexityEvaluator(Evaluator):
    def __init__(self, spec: EvaluatorSpec, reference: str | None, base_dir: Path | None) -> None:
        self.spec, self.reference, self.base_dir = spec, reference, base_dir

    def setup(self) -> None:
        from ..recipe import DataSpec
        from ..stats.data import load_batches

        self.model = _HFModel(self.reference, "evaluator.perplexity", required=True)
        self.batches: list[dict[str, torch.Tensor]] = []
        for f in self.spec.perplexity or []:
            data = DataSpec(path=f, n_examples=self.spec.n_examples,
                            batch_size=self.spec.batch_size, max_length=self.spec.max_length)  # fmt: skip
            self.batches += load_batches(data, model_dir=self.model.dir, vocab_size=None,
                                         where=f"evaluator.perplexity {f}",
                                         recipe_dir=self.base_dir)  # fmt: skip

    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        model = self.model.load(state)
        if model is None:  # setup() required a Hugging Face directory; only a bad call gets here
            raise DataError(f"evaluator.perplexity: no network for {self.reference} to run")
        total, count = 0.0, 0
        with torch.no_grad():
            for b in self.batches:
                ids = b["input_ids"]
                mask = b.get("attention_mask", torch.ones_like(ids))
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                tgt = ids[:, 1:]
                m = mask[:, 1:].bool()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="none"
                ).reshape(tgt.shape)
                total += float(loss[m].sum())
                count += int(m.sum())
        if count == 0:
            raise DataError("evaluator.perplexity: the files hold no token to predict")
        return -total / count


def bench_ref(model: str) -> tuple[str, str] | None:
    """``(suite, task or "base")`` of a ``bench:SUITE/TASK`` model reference, else None."""
    if not model.startswith(BENCH_PREFIX):
        return None
    suite, _, task = model[len(BENCH_PREFIX) :].partition("/")
    if not suite or not task:
        raise RecipeError(f"model {model!r}: write a benchmark model as bench:SUITE/TASK")
    return suite, task


class BenchEvaluator(Evaluator):
    """Normalized validation accuracy on benchmark tasks (text and digits suites)."""

    def __init__(self, spec: EvaluatorSpec, tasks: Sequence[str]) -> None:
        self.spec = spec
        self.task_names = list(tasks)

    def setup(self) -> None:
        from ..bench.evaluate import Evaluator as BenchEv
        from ..bench.suites import make_suite
        from ..bench.train import Trainer, full_state

        self.suite = make_suite(self.spec.suite, quick=self.spec.quick, seed=0,
                                tasks=self.task_names)  # fmt: skip
        self.trainer = Trainer(self.suite, seed=self.spec.train_seed)
        self.tasks = list(self.suite.tasks)
        fts = {t.name: self.trainer.finetune(t) for t in self.tasks}
        self.heads = {n: h for n, (_, h) in fts.items()}
        self.ev = BenchEv(self.suite, self.trainer)
        self.ft_states = {n: full_state(self.suite, s) for n, (s, _) in fts.items()}
        self.ft_val = {}
        for t in self.tasks:
            self.ft_val |= self.ev.accuracy(self.ft_states[t.name], self.heads, [t], "val")

    def accuracies(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self.ev.accuracy(state, self.heads, self.tasks, "val")

    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        acc = self.accuracies(state)
        ratios = [acc[n] / self.ft_val[n] for n in acc if self.ft_val[n] > 0]
        return sum(ratios) / len(ratios)

    def test(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Test accuracy per task and normalized (with the bench's 95 % bootstrap interval),
        plus the per-example correctness for paired comparisons."""
        from ..bench import stats as S

        correct = self.ev.correct(state, self.heads, self.tasks, "test")
        ft = {}
        for t in self.tasks:
            ft |= self.ev.correct(self.ft_states[t.name], self.heads, [t], "test")
        boot = S.Bootstrap({n: len(v) for n, v in correct.items()})
        reps = S.normalized_accuracy(boot.means(correct), boot.means(ft))
        acc = {n: float(v.mean()) for n, v in correct.items()}
        ft_acc = {n: float(v.mean()) for n, v in ft.items()}
        point = sum(acc[n] / ft_acc[n] for n in acc if ft_acc[n] > 0) / len(acc)
        lo, hi = S.interval(reps)
        return {"normalized": round(point, 6), "interval": [round(lo, 6), round(hi, 6)],
                "accuracy": {n: round(v, 6) for n, v in acc.items()},
                "correct": {n: v.tolist() for n, v in correct.items()}}  # fmt: skip


def lm_bench(quick: bool, domains: Sequence[str] | None) -> tuple[Any, Any, Any]:
    """``(models, token splits, evaluator)`` of the lm bench (trained, or from its cache)."""
    import contextlib

    from transformers.utils import logging as hf_logging

    from ..bench import lm_data as LD
    from ..bench import lm_train as LT
    from ..bench.lm import _context_parts

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model loaded otherwise
    cfg = LT.QUICK if quick else LT.FULL
    texts, _ = LD.load_domains(list(domains) if domains else None, 0)
    models = LT.Models(cfg, texts, 0)
    models.prepare(jobs=1, bar=lambda *_: contextlib.nullcontext(None))
    splits, ev, _ = _context_parts(models, texts, cfg, 0)
    return models, splits, ev


class BenchLMEvaluator(Evaluator):
    """The lm suite: mean over domains of the share of each fine-tune's loss gain the merged
    model keeps on the *validation* sequences, (L_base - L) / (L_base - L_finetune)."""

    def __init__(self, spec: EvaluatorSpec, domains: Sequence[str]) -> None:
        self.spec, self.domains = spec, list(domains)

    def setup(self) -> None:
        from ..bench.lm_rows import mean_losses

        self.models, self.splits, self.ev = lm_bench(self.spec.quick, self.domains)
        m = self.models
        self.module = m.load(m.base_key)
        self.base_val = mean_losses(self.ev.losses(self.module, "val", self.domains))
        self.ft_val = {}
        for d in self.domains:
            self.ft_val |= mean_losses(self.ev.losses(m.load(m.keys[d]), "val", [d]))

    def _load(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        self.module.load_state_dict(dict(state), strict=False)
        if getattr(self.module.config, "tie_word_embeddings", False):
            self.module.tie_weights()
        return self.module

    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        from ..bench.lm_rows import gain_kept, mean_losses

        loss = mean_losses(self.ev.losses(self._load(state), "val", self.domains))
        kept = gain_kept(loss, self.base_val, self.ft_val)
        return sum(kept.values()) / len(kept)

    def test(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Test gain kept (the lm bench's *normalized*) with its 95 % bootstrap interval, and
        the per-sequence test losses for paired comparisons."""
        from ..bench import stats as S
        from ..bench.lm_rows import gain_kept, mean_losses

        m = self.models
        row = self.ev.losses(self._load(state), "test", self.domains)
        base = self.ev.losses(m.load(m.base_key), "test", self.domains)
        ft = {}
        for d in self.domains:
            ft |= self.ev.losses(m.load(m.keys[d]), "test", [d])
        boot = S.Bootstrap({d: len(v) for d, v in row.items()})
        reps = S.loss_gain_kept(boot.means(row), boot.means(base), boot.means(ft))
        kept = gain_kept(mean_losses(row), mean_losses(base), mean_losses(ft))
        lo, hi = S.interval(reps)
        return {"normalized": round(sum(kept.values()) / len(kept), 6),
                "interval": [round(lo, 6), round(hi, 6)],
                "per_domain": {d: round(v, 6) for d, v in kept.items()},
                "losses": {d: v.tolist() for d, v in row.items()}}  # fmt: skip


class LMEvalEvaluator(Evaluator):
    """lm-eval-harness tasks (mergekit-evolve's ``tasks:``), weighted."""

    def __init__(self, spec: EvaluatorSpec, reference: str | None) -> None:
        self.spec, self.reference = spec, reference
        check_lm_eval(spec)

    def setup(self) -> None:
        self.model = _HFModel(self.reference, "tasks (lm-eval)", required=True)

    def score(self, state: Mapping[str, torch.Tensor]) -> float:  # pragma: no cover - needs lm-eval
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from ..stats.data import load_tokenizer

        model = self.model.load(state)
        lm = HFLM(pretrained=model, tokenizer=load_tokenizer(self.model.dir, "lm-eval"))
        tasks = self.spec.lm_eval or []
        opts = {k: v for k, v in self.spec.options.items() if k in ("limit", "num_fewshot")}
        res = lm_eval.simple_evaluate(model=lm, tasks=[t["name"] for t in tasks], **opts)
        total = weight = 0.0
        for t in tasks:
            w = float(t.get("weight", 1.0))
            total += w * float(res["results"][t["name"]][t.get("metric", "acc,none")])
            weight += w
        return total / weight


def check_lm_eval(spec: EvaluatorSpec) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        names = [t.get("name") for t in spec.lm_eval or []]
        raise RecipeError(
            f"tasks {names} are lm-eval-harness tasks (not benchmark tasks of brickwork), and "
            "lm-eval is not installed: pip install lm-eval, or score with evaluator.callable, "
            "evaluator.perplexity or evaluator.bench_task"
        ) from None


def make_evaluator(
    spec: EvaluatorSpec, *, reference: str | None, models: Sequence[str], base_dir: Path | None
) -> Evaluator:
    """The evaluator of ``spec`` (not yet set up). ``models``: the genome's model
    references as written (``bench:`` ones name the bench tasks for ``bench_task: all``)."""
    if spec.callable:
        return CallableEvaluator(spec, reference)
    if spec.perplexity:
        return PerplexityEvaluator(spec, reference, base_dir)
    if spec.lm_eval:
        return LMEvalEvaluator(spec, reference)
    names = spec.bench_task
    if names == "all":
        refs = [r for m in models if (r := bench_ref(m)) is not None and r[1] != "base"]
        names = [t for _, t in refs]
        if not names:
            raise RecipeError(
                "evaluator.bench_task: all scores the tasks of the genome's bench:SUITE/TASK "
                "models, and it has none; name the tasks"
            )
    elif isinstance(names, str):
        names = [names]
    if spec.suite == "lm":
        return BenchLMEvaluator(spec, list(names or []))
    return BenchEvaluator(spec, list(names or []))
