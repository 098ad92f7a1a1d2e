"""mergekit's nuslerp, multislerp, sce, nearswap, arcee_fusion, ram and ramplus_tl.

Reference tests (STYLE.md §6): each method's formula written out plainly, entry by entry,
on small float64 tensors, against ``merge_state_dicts``; properties that could fail
(STYLE.md §5); recipe errors for bad parameters and wrong model counts; and each method
through the ``brickwork merge`` command from a mergekit YAML. Agreement with mergekit
itself: benchmarks/agreement_mergekit_methods.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _helpers import write_yaml
from safetensors.torch import load_file, save_file

from brickwork.errors import RecipeError
from brickwork.merge.api import merge_state_dicts


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _merge(method, models, base=None, params=None, weights=None):
    out = merge_state_dicts(
        method,
        [{"w": m} for m in models],
        base=None if base is None else {"w": base},
        parameters=params or {},
        model_parameters=None if weights is None else [{"weight": w} for w in weights],
        compute_dtype="float64",
    )
    return out["w"]


def _close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-9)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _slerp_list(t, a, b):
    """Slerp of two vectors given as lists of floats, from the angle between them."""
    cos = _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b))
    om = math.acos(max(-1.0, min(1.0, cos)))
    ca, cb = math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)
    return [ca * x + cb * y for x, y in zip(a, b)]


# -- nuslerp ---------------------------------------------------------------------------------


def test_nuslerp_whole_tensor_at_t_from_the_weights():
    a, b = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    t = 0.75 / (0.25 + 0.75)
    expected = _t(_slerp_list(t, a.flatten().tolist(), b.flatten().tolist()))
    _close(_merge("nuslerp", [a, b], weights=[0.25, 0.75]), expected.reshape(3, 4))


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_task_vectors_per_row_or_column(row_wise):
    base, a, b = _rand(3, 4, seed=0), _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    ta, tb = a - base, b - base
    t = 0.3 / (0.7 + 0.3)
    expected = base.clone()
    if row_wise:  # mergekit's nuslerp_row_wise: vectors along the first axis (columns)
        for j in range(4):
            expected[:, j] += _t(_slerp_list(t, ta[:, j].tolist(), tb[:, j].tolist()))
    else:  # vectors along the last axis (rows)
        for i in range(3):
            expected[i] += _t(_slerp_list(t, ta[i].tolist(), tb[i].tolist()))
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise}
    _close(_merge("nuslerp", [a, b], base, params, weights=[0.7, 0.3]), expected)


def test_nuslerp_properties():
    a, b = _rand(5, 6, seed=1), _rand(5, 6, seed=2)
    a, b = a / a.norm(), b / b.norm()
    # the endpoints, and unit vectors stay on the unit sphere
    _close(_merge("nuslerp", [a, b], weights=[1.0, 0.0]), a)
    _close(_merge("nuslerp", [a, b], weights=[0.0, 2.0]), b)
    mid = _merge("nuslerp", [a, b], weights=[0.4, 0.6])
    assert abs(mid.norm().item() - 1) < 1e-9
    # weights summing to 0: t = 0.5, as mergekit
    _close(_merge("nuslerp", [a, b], weights=[1.0, -1.0]), _merge("nuslerp", [a, b]))
    # collinear vectors: linear interpolation
    _close(_merge("nuslerp", [a, 3 * a], weights=[0.5, 0.5]), 2 * a)


# -- multislerp ------------------------------------------------------------------------------


def test_multislerp_formula_with_a_base():
    base = _rand(4, 3, seed=0)
    thetas = [_rand(4, 3, seed=i) for i in (1, 2, 3)]
    w = [0.5, 1.0, 2.5]
    wn = [x / sum(w) for x in w]
    taus = [(t - base).flatten().tolist() for t in thetas]
    norms = [math.sqrt(_dot(x, x)) for x in taus]
    units = [[v / (n + 1e-8) for v in x] for x, n in zip(taus, norms)]
    mean = [sum(wi * u[j] for wi, u in zip(wn, units)) for j in range(12)]
    mu = [v / math.sqrt(_dot(mean, mean)) for v in mean]
    tangents = [[u[j] - _dot(u, mu) * mu[j] for j in range(12)] for u in units]
    step = [sum(wi * tg[j] for wi, tg in zip(wn, tangents)) for j in range(12)]
    length = math.sqrt(_dot(step, step)) + 1e-8
    point = [math.cos(length) * m + math.sin(length) / length * s for m, s in zip(mu, step)]
    scale = sum(wi * n for wi, n in zip(wn, norms))
    expected = base + _t([scale * p for p in point]).reshape(4, 3)
    _close(_merge("multislerp", thetas, base, weights=w), expected)


def test_multislerp_properties():
    a, b = _rand(6, 5, seed=1), _rand(6, 5, seed=2)
    a, b = 2 * a / a.norm(), 2 * b / b.norm()
    # two models of equal norm and weight: the slerp midpoint
    _close(_merge("multislerp", [a, b]), _merge("nuslerp", [a, b]), atol=1e-7)
    # one model: that model; the order of the models does not matter
    _close(_merge("multislerp", [a]), a)
    c = _rand(6, 5, seed=3)
    _close(
        _merge("multislerp", [a, b, c], weights=[1, 2, 3]),
        _merge("multislerp", [c, a, b], weights=[3, 1, 2]),
    )
    # normalize_weights: false with weights summing to 1 changes nothing
    _close(
        _merge("multislerp", [a, b, c], weights=[0.2, 0.3, 0.5]),
        _merge(
            "multislerp", [a, b, c], params={"normalize_weights": False}, weights=[0.2, 0.3, 0.5]
        ),
    )
    # antipodal pair with equal weights: their weighted sum (mergekit's fallback)
    _close(_merge("multislerp", [a, -a], weights=[0.5, 0.5]), torch.zeros_like(a))


# -- sce -------------------------------------------------------------------------------------


def _sce_reference(base, thetas, topk):
    """Wan et al. 2024 (FuseChat), as mergekit runs it: select, calculate, erase."""
    n, m = base.numel(), len(thetas)
    taus = [(t - base).flatten().tolist() for t in thetas]
    if topk < 1:  # select: the entries with the largest variance across the models
        var = [sum((x[j] - sum(y[j] for y in taus) / m) ** 2 for x in taus) / m for j in range(n)]
        k = int(sum(v != 0 for v in var) * topk)
        keep = set(sorted(range(n), key=lambda j: -var[j])[:k])
        taus = [[x[j] if j in keep else 0.0 for j in range(n)] for x in taus]
    energy = [sum(v * v for v in x) / n for x in taus]  # calculate
    w = [e / sum(energy) for e in energy]
    out = base.flatten().tolist()
    for j in range(n):  # erase: entries against the elected sign
        sign = 1.0 if sum(x[j] for x in taus) >= 0 else -1.0
        agree = [i for i in range(m) if taus[i][j] != 0 and math.copysign(1, taus[i][j]) == sign]
        num = sum(w[i] * taus[i][j] for i in agree)
        den = max(sum(w[i] for i in agree), 1e-6)
        out[j] += num / den
    return _t(out).reshape(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce_formula(topk):
    base = _rand(4, 5, seed=0)
    thetas = [base + (i + 1) * _rand(4, 5, seed=i) for i in (1, 2, 3)]
    out = _merge("sce", thetas, base, {"select_topk": topk})
    _close(out, _sce_reference(base, thetas, topk))


def test_sce_properties():
    base = _rand(4, 5, seed=0)
    thetas = [base + _rand(4, 5, seed=i) for i in (1, 2)]
    _close(_merge("sce", thetas, base, {"select_topk": 0.0}), base)  # nothing selected
    _close(_merge("sce", thetas[:1], base), thetas[0])  # one model: itself
    # where all task vectors agree in sign, the result lies between their min and max
    same = [base + (i + 1) * _rand(4, 5, seed=9).abs() for i in range(3)]
    out = _merge("sce", same, base) - base
    assert (out >= (same[0] - base) - 1e-12).all() and (out <= (same[2] - base) + 1e-12).all()
    # int8_mask changes nothing
    _close(_merge("sce", thetas, base, {"int8_mask": True}), _merge("sce", thetas, base))


# -- nearswap --------------------------------------------------------------------------------


def test_nearswap_formula_and_limits():
    base = _t([[0.0, 1.0, 2.0, -1.0]])
    other = _t([[0.05, 1.5, 2.0, -3.0]])
    t = 0.1
    expected = []
    for a, b in zip(base.flatten().tolist(), other.flatten().tolist()):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        expected.append(w * b + (1 - w) * a)
    _close(_merge("nearswap", [other], base, {"t": t}), _t([expected]))
    # entries nearer than t are swapped; t = 0 keeps the base; a huge t takes the other model
    assert _merge("nearswap", [other], base, {"t": t})[0, 0].item() == 0.05
    _close(_merge("nearswap", [other], base, {"t": 0.0}), base)
    _close(_merge("nearswap", [other], base, {"t": 1e9}), other)


# -- arcee_fusion ----------------------------------------------------------------------------


def test_arcee_fusion_formula():
    base, theta = _rand(6, 8, seed=0), _rand(6, 8, seed=1)
    imp = []
    for i in range(6):
        p = [math.exp(v) for v in theta[i].tolist()]
        q = [math.exp(v) for v in base[i].tolist()]
        p = [v / sum(p) + 1e-8 for v in p]
        q = [v / sum(q) + 1e-8 for v in q]
        kl = sum(x * math.log(x / y) for x, y in zip(p, q))
        imp.append([abs(a - b) * kl for a, b in zip(theta[i].tolist(), base[i].tolist())])
    flat = sorted(v for row in imp for v in row)
    q1, med, q3 = (flat[int(q * (len(flat) - 1))] for q in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    expected = _t(
        [
            [t if v >= threshold else b for t, b, v in zip(tr.tolist(), br.tolist(), vr)]
            for tr, br, vr in zip(theta, base, imp)
        ]
    )
    out = _merge("arcee_fusion", [theta], base)
    _close(out, expected)
    kept = (out == theta).sum().item()
    assert 0 < kept < 48  # an outlier rule: some entries, not all


def test_arcee_fusion_of_the_base_is_the_base():
    base = _rand(4, 4, seed=0)
    _close(_merge("arcee_fusion", [base.clone()], base), base)


# -- ram / ramplus_tl ------------------------------------------------------------------------


def _ram_reference(base, thetas, eps, r=None, alpha=None):
    """Shared changes averaged over the models that make them, unique ones kept (RAM+: unique
    ones of model i scaled by 1 + r·clamp(shared_i / unique_i, 0, α))."""
    taus = [(t - base).flatten().tolist() for t in thetas]
    n, m = base.numel(), len(thetas)
    changed = [[abs(x[j]) > eps for j in range(n)] for x in taus]
    count = [sum(c[j] for c in changed) for j in range(n)]
    scale = [1.0] * m
    if r is not None:
        for i in range(m):
            shared = sum(changed[i][j] and count[j] > 1 for j in range(n))
            unique = sum(changed[i][j] and count[j] == 1 for j in range(n))
            scale[i] = 1 + r * min(alpha, max(0.0, shared / max(unique, eps)))
    out = base.flatten().tolist()
    for j in range(n):
        for i in range(m):
            if changed[i][j]:
                out[j] += taus[i][j] * (scale[i] if count[j] == 1 else 1 / count[j])
    return _t(out).reshape(base.shape)


def _sparse_models(base, m=3):
    out = []
    for i in range(m):
        g = torch.Generator().manual_seed(10 + i)
        keep = torch.rand(base.shape, generator=g) < 0.4
        out.append(base + _rand(*base.shape, seed=20 + i) * keep)
    return out


def test_ram_formula():
    base = _rand(5, 6, seed=0)
    thetas = _sparse_models(base)
    _close(_merge("ram", thetas, base), _ram_reference(base, thetas, 1e-5))
    _close(_merge("ram", thetas, base, {"epsilon": 0.5}), _ram_reference(base, thetas, 0.5))


def test_ramplus_tl_formula_and_r_zero_is_ram():
    base = _rand(5, 6, seed=0)
    thetas = _sparse_models(base)
    params = {"r": 0.7, "alpha": 0.6, "epsilon": 1e-5}
    expected = _ram_reference(base, thetas, 1e-5, r=0.7, alpha=0.6)
    # the scale λ_i is float32 (mergekit's rho from integer counts), whatever the dtype
    _close(_merge("ramplus_tl", thetas, base, params), expected, atol=1e-6)
    assert not torch.allclose(expected, _merge("ram", thetas, base))
    _close(_merge("ramplus_tl", thetas, base, {"r": 0.0}), _merge("ram", thetas, base))


def test_ram_disjoint_changes_add_and_shared_ones_average():
    base = torch.zeros(1, 4, dtype=torch.float64)
    a = _t([[1.0, 0.0, 2.0, 0.0]])
    b = _t([[0.0, 3.0, 4.0, 0.0]])
    _close(_merge("ram", [a, b], base), _t([[1.0, 3.0, 3.0, 0.0]]))


# -- recipe errors ---------------------------------------------------------------------------


def _sds(n):
    return [{"w": _rand(2, 3, seed=i)} for i in range(n)]


@pytest.mark.parametrize(
    ("method", "n", "with_base", "expected"),
    [
        ("nuslerp", 3, False, "exactly 2"),
        ("nuslerp", 1, True, "exactly 2"),
        ("nearswap", 2, True, "exactly 1"),
        ("arcee_fusion", 2, True, "exactly 1"),
    ],
)
def test_wrong_model_counts_are_recipe_errors(method, n, with_base, expected):
    base = {"w": _rand(2, 3, seed=9)} if with_base else None
    with pytest.raises(RecipeError, match=rf"'{method}' merges {expected} model\(s\).*got {n}"):
        merge_state_dicts(
            method, _sds(n), base=base, parameters={"t": 0.1} if method == "nearswap" else {}
        )


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        (
            "sce",
            {"select_topk": 1.5},
            "'select_topk' = 1.5 is invalid: Input should be less than or equal to 1",
        ),
        ("sce", {"select_topk": -0.1}, "'select_topk' = -0.1 is invalid"),
        ("nearswap", {"t": -1}, "'t' = -1 is invalid: Input should be greater than or equal to 0"),
        ("ramplus_tl", {"epsilon": 0}, "'epsilon' = 0 is invalid: Input should be greater than 0"),
        ("ram", {"epsilon": "small"}, "'epsilon' = 'small' is invalid"),
        ("multislerp", {"eps": -1e-8}, "'eps' = -1e-08 is invalid"),
        ("nuslerp", {"nuslerp_flaten": True}, "Did you mean 'nuslerp_flatten'"),
    ],
)
def test_bad_parameters_are_recipe_errors(method, params, expected):
    n = {"nearswap": 1, "nuslerp": 2}.get(method, 2)
    with pytest.raises(RecipeError) as e:
        merge_state_dicts(method, _sds(n), base={"w": _rand(2, 3, seed=9)}, parameters=params)
    assert expected in str(e.value)


def test_nearswap_without_t_names_the_parameter():
    with pytest.raises(RecipeError, match="needs parameter 't'"):
        merge_state_dicts("nearswap", _sds(1), base={"w": _rand(2, 3, seed=9)})


# -- through the CLI, from mergekit YAML ------------------------------------------------------

NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """base, ft1..ft3 as safetensors directories: fine-tunes change a random 60 % of entries."""
    root = tmp_path_factory.mktemp("mk_more")
    g = torch.Generator().manual_seed(0)
    shapes = {NAMES[0]: (16, 8), NAMES[1]: (8, 8), NAMES[2]: (8,), NAMES[3]: (8,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = {}
    for i, name in enumerate(("base", "ft1", "ft2", "ft3")):
        sd = {
            k: v
            + (
                0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.6)
                if i
                else 0
            )
            for k, v in base.items()
        }
        d = root / name
        d.mkdir()
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
        paths[name] = d
    return paths


CLI_CASES = {
    # method: (models in the YAML, base_model?, global parameters, per-model weights)
    "nuslerp": (["ft1", "ft2"], False, {"nuslerp_flatten": False}, [0.3, 0.7]),
    "multislerp": (["base", "ft1", "ft2", "ft3"], True, {}, [None, 0.5, 0.3, 0.2]),
    "sce": (["ft1", "ft2", "ft3"], True, {"select_topk": 0.5}, None),
    "nearswap": (["base", "ft1"], True, {"t": 0.005}, None),
    "arcee_fusion": (["base", "ft2"], True, {}, None),
    "ram": (["ft1", "ft2", "ft3"], True, {"epsilon": 0.001}, None),
    "ramplus_tl": (["ft1", "ft2", "ft3"], True, {"r": 0.5, "alpha": 0.3}, None),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(CLI_CASES))
def test_mergekit_yaml_through_the_cli(run_cli, tmp_path, tiny_models, method, dtype):
    names, with_base, params, weights = CLI_CASES[method]
    entries = []
    for i, n in enumerate(names):
        e = {"model": str(tiny_models[n])}
        if weights and weights[i] is not None:
            e["parameters"] = {"weight": weights[i]}
        entries.append(e)
    recipe = {"merge_method": method, "models": entries, "parameters": params, "dtype": dtype}
    if with_base:
        recipe["base_model"] = str(tiny_models["base"])
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("merge", write_yaml(tmp_path / "mk.yaml", recipe), out, "-q")
    assert code == 0, stdout + stderr
    got = load_file(out / "model.safetensors")
    # the same merge through the Python API, computing in the recipe's dtype as mergekit does
    sds = {k: load_file(p / "model.safetensors") for k, p in tiny_models.items()}
    others = [n for n in names if not (with_base and n == "base")]
    ws = [
        w for n, w in zip(names, weights or [None] * len(names)) if not (with_base and n == "base")
    ]
    expected = merge_state_dicts(
        method,
        [{k: v.to(getattr(torch, dtype)) for k, v in sds[n].items()} for n in others],
        base={k: v.to(getattr(torch, dtype)) for k, v in sds["base"].items()}
        if with_base
        else None,
        parameters=params,
        model_parameters=[{"weight": w} for w in ws] if weights else None,
        compute_dtype="input",
    )
    assert set(got) == set(NAMES)
    for k in NAMES:
        assert got[k].dtype == getattr(torch, dtype), k
        assert torch.equal(got[k], expected[k]), k
    moved = sum(int((got[k] != sds["base"][k].to(got[k].dtype)).sum()) for k in NAMES)
    assert moved > 0, "the merge left every entry at the base"


def test_mergekit_yaml_wrong_count_exits_2_and_names_the_models(run_cli, tmp_path, tiny_models):
    text = f"""\
merge_method: nuslerp
base_model: {tiny_models["base"]}
models:
  - model: {tiny_models["base"]}
  - model: {tiny_models["ft1"]}
parameters:
  weight: 1.0
"""
    out = tmp_path / "out"
    code, _, stderr = run_cli("merge", write_yaml(tmp_path / "mk.yaml", text), out, "-q")
    assert code == 2
    assert "'nuslerp' merges exactly 2 model(s) besides the base; got 1" in stderr
    assert str(tiny_models["ft1"]) in stderr
    assert not out.exists()


def test_mergekit_slices_nuslerp_and_a_wrong_count_per_slice(run_cli, tmp_path, tiny_models):
    def recipe(sources):
        src = "".join(
            f"      - model: {tiny_models[n]}\n        layer_range: [0, 1]\n" for n in sources
        )
        return f"merge_method: nuslerp\nslices:\n  - sources:\n{src}parameters:\n  weight: 1.0\n"

    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        "merge", write_yaml(tmp_path / "a.yaml", recipe(["ft1", "ft2"])), out, "-q"
    )
    assert code == 0, stdout + stderr
    sds = {k: load_file(p / "model.safetensors") for k, p in tiny_models.items()}
    expected = merge_state_dicts("nuslerp", [sds["ft1"], sds["ft2"]], compute_dtype="input")
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in NAMES)
    bad = write_yaml(tmp_path / "b.yaml", recipe(["ft1", "ft2", "ft3"]))
    code, _, stderr = run_cli("merge", bad, tmp_path / "out2", "-q")
    assert (
        code == 2
        and "slices[0].sources: method 'nuslerp' merges exactly 2 model(s); got 3" in stderr
    )
