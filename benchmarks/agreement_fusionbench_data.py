"""brickwork's regmean and fisher against FusionBench's merge functions, on the same
statistics.

Builds a tiny random GPT-2 (its linear layers are Hugging Face ``Conv1D``: weight
``(in, out)``) and a tiny random BERT (``nn.Linear``), three seeded fine-tunes of each
(perturbed copies), and calibration batches with padding. brickwork's collector measures
every model's statistics (input Gram matrices with padding masked; the per-example sampled
Fisher); those exact tensors are saved and handed to FusionBench's
``merging_with_regmean_weights`` and ``merging_with_fisher_weights`` (CPU, in FusionBench's
own virtual environment, a subprocess: fusion-bench is never a dependency of brickwork),
and brickwork merges the same modules with ``merge_modules``. Printed: the max absolute
difference per method and model over every merged parameter, and the relative error
‖brickwork − FusionBench‖ / ‖FusionBench‖.

The merges are compared on brickwork's statistics because the statistics themselves differ
on purpose: FusionBench's ``fisher_merging`` estimates a classifier's Fisher as the square of
the gradient of ``Σ_batch Σ_c √p_c log p_c`` (divided by the batch size), brickwork as the
per-example diagonal ``1/N Σ_n Σ_c p_c (∇ log p_c)²`` (``exact``; the default ``sampled``
draws one ``c``). The script writes FusionBench's estimate out as its code computes it, on
one batch of 8 examples of the BERT classifier and on the same 8 examples one at a time,
and reports its relative distance from brickwork's exact per-example Fisher.

    python3.11 -m venv /work/venv-fusionbench
    /work/venv-fusionbench/bin/pip install torch==2.13.0 && \\
        /work/venv-fusionbench/bin/pip install fusion-bench==0.2.33
    .venv/bin/python benchmarks/agreement_fusionbench_data.py [--fusionbench-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ALPHA = 0.9  # RegMean's non-diagonal scale (FusionBench: reduce_non_diagonal_ratio)
EPS = 1e-6  # FusionBench's minimal_fisher_weight

_FB = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
job = json.load(open(sys.argv[1]))
out = {}
for case in job["cases"]:
    params = [load_file(p) for p in case["params"]]
    names = case["names"]
    pdict = {n: [p[n] for p in params] for n in names}
    if case["method"] == "regmean":
        grams = [load_file(g) for g in case["stats"]]
        weights = [{k[: -len(".weight")]: v for k, v in g.items()} for g in grams]
        merged = merging_with_regmean_weights(pdict, weights, reduce_non_diagonal_ratio=case["alpha"],
                                              weight_transpose=case["transpose"])
    else:
        fishers = [load_file(f) for f in case["stats"]]
        fishers = [{n: f[n] for n in names} for f in fishers]
        coeff = torch.ones(len(params)) / len(params)
        merged = merging_with_fisher_weights(pdict, fishers, coeff, normalize_fisher_weight=True,
                                             minimal_fisher_weight=case["eps"])
    path = case["out"]
    save_file({k: v.contiguous() for k, v in merged.items()}, path)
    out[case["label"]] = path
json.dump(out, open(sys.argv[2], "w"))
"""


def _family(kind: str, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=0)  # fmt: skip
        base = GPT2LMHeadModel(cfg).eval()
    else:
        cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, num_labels=5)  # fmt: skip
        base = BertForSequenceClassification(cfg).eval()
    models = []
    for i in range(3):
        m = type(base)(cfg).eval()
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        models.append(m)
    return models


def _batches(seed: int, n: int = 48, length: int = 24, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(0, n, batch):
        ids = torch.randint(1, 96, (batch, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()  # right padding
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _batch_squared_fisher(model, batch):
    """FusionBench's ``fisher_merging`` estimate, as its code computes it for a classifier:
    the gradient of Σ_batch Σ_c √p_c · log p_c, squared, divided by the batch size."""
    params = dict(model.named_parameters())
    logits = model(**batch).logits
    p = torch.softmax(logits, -1).detach()
    total = (torch.sqrt(p) * torch.log_softmax(logits, -1)).sum()
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return {n: (g**2 / logits.shape[0]) for n, g in zip(params, grads) if g is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fusionbench-python", default="/work/venv-fusionbench/bin/python")
    args = ap.parse_args()
    import brickwork
    from brickwork.stats import statistics_for
    from brickwork.stats.collect import collect_fisher

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="agreement-fb-data-"))
    os.environ.setdefault("BRICKWORK_CACHE", str(tmp / "cache"))
    cases, ours = [], {}
    for kind in ("gpt2", "bert"):
        models = _family(kind)
        data = [_batches(10 + i) for i in range(len(models))]
        names = [n for n, _ in models[0].named_parameters()]  # tied lm_head once
        params = []
        for i, m in enumerate(models):
            p = tmp / f"{kind}-params-{i}.safetensors"
            save_file({n: t.detach().contiguous() for n, t in m.named_parameters()}, p)
            params.append(str(p))
        for method in ("regmean", "fisher"):
            stats = []
            for i, (m, d) in enumerate(zip(models, data)):
                f = statistics_for(m, d, "gram" if method == "regmean" else "fisher")
                t = load_file(f.path)
                if method == "regmean":  # FusionBench's Gram matrices are means: XᵀX / n
                    t = {n: v / f.info["tensors"][n]["rows"] for n, v in t.items()}
                p = tmp / f"{kind}-{method}-stats-{i}.safetensors"
                save_file(t, p)
                stats.append(str(p))
            if method == "regmean":
                merged = brickwork.merge_modules(
                    "regmean", models, data=data, parameters={"alpha": ALPHA}
                )
            else:
                merged = brickwork.merge_modules(
                    "fisher", models, data=data,
                    parameters={"fisher_floor": 0.0, "epsilon": EPS, "normalize": True},
                )  # fmt: skip
            label = f"{method} / {kind}"
            ours[label] = {n: t.detach() for n, t in merged.named_parameters()}
            cases.append(
                {
                    "label": label, "method": method, "params": params, "stats": stats,
                    "names": names, "alpha": ALPHA, "eps": EPS,
                    "transpose": kind != "gpt2",  # nn.Linear (out, in); GPT-2 Conv1D (in, out)
                    "out": str(tmp / f"fb-{kind}-{method}.safetensors"),
                }
            )  # fmt: skip
    job = tmp / "job.json"
    job.write_text(json.dumps({"cases": cases}))
    res = tmp / "result.json"
    subprocess.run(
        [args.fusionbench_python, "-c", _FB, str(job), str(res)],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    print(f"{'method / model':<18} {'tensors':>7} {'max |Δ|':>10} {'relative':>10}")
    for label, path in json.loads(res.read_text()).items():
        fb = load_file(path)
        mine = ours[label]
        diff = max(float((mine[n].double() - fb[n].double()).abs().max()) for n in fb)
        num = sum(float((mine[n].double() - fb[n].double()).square().sum()) for n in fb)
        den = sum(float(fb[n].double().square().sum()) for n in fb)
        print(f"{label:<18} {len(fb):>7} {diff:>10.2e} {(num / den) ** 0.5:>10.2e}")

    # the intended difference in the statistics: per-example vs batch-squared Fisher
    model = _family("bert")[0]
    batch = _batches(10, n=8)[0]
    per_example = collect_fisher(model, [batch], estimate="exact").values
    batch_sq = _batch_squared_fisher(model, batch)
    singles = [
        _batch_squared_fisher(model, {k: v[j : j + 1] for k, v in batch.items()}) for j in range(8)
    ]
    one_at_a_time = {n: sum(s[n] for s in singles) / 8 for n in batch_sq}

    def rel(est):
        num = sum(float((per_example[n] - est[n]).square().sum()) for n in est)
        den = sum(float(per_example[n].square().sum()) for n in est)
        return (num / den) ** 0.5

    # (Σ_c √p_c ∇log p_c)² is not Σ_c p_c (∇log p_c)² even for one example; over a batch
    # the cross terms between examples add to that.
    def ratio(est):
        num = sum(float(est[n].square().sum()) for n in est)
        return (num / sum(float(per_example[n].square().sum()) for n in est)) ** 0.5

    print(
        "Fisher estimate, BERT classifier, 8 examples, relative distance from brickwork's "
        f"per-example exact Fisher: FusionBench's batch of 8 {rel(batch_sq):.3f}, "
        f"FusionBench's estimate one example at a time {rel(one_at_a_time):.3f}; norm ratios "
        f"{ratio(batch_sq):.3g} and {ratio(one_at_a_time):.3g}"
    )


if __name__ == "__main__":
    sys.exit(main())
