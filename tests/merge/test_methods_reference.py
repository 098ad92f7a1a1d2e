"""Reference tests (STYLE.md §6): each method against its paper's formula, written out
plainly on small tensors, compared with what ``merge_state_dicts`` computes."""

from __future__ import annotations

import math

import pytest
import torch

from brickwork.merge.api import merge_state_dicts


def _rand(*shape, seed):
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).float()


def _sd(t):
    return {"w": t}


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# -- linear (model soups) -------------------------------------------------------------------


def test_linear_is_the_weighted_mean():
    thetas = [_rand(4, 6, seed=i) for i in range(3)]
    w = [1.0, 2.0, 0.5]
    expected = (w[0] * thetas[0] + w[1] * thetas[1] + w[2] * thetas[2]) / (w[0] + w[1] + w[2])
    out = merge_state_dicts(
        "linear", [_sd(t) for t in thetas], model_parameters=[{"weight": x} for x in w]
    )
    _close(out["w"], expected)


def test_linear_without_normalize_is_the_weighted_sum():
    thetas = [_rand(4, 6, seed=i) for i in range(2)]
    out = merge_state_dicts(
        "linear",
        [_sd(t) for t in thetas],
        model_parameters=[{"weight": 0.3}, {"weight": 0.4}],
        parameters={"normalize": False},
    )
    _close(out["w"], 0.3 * thetas[0] + 0.4 * thetas[1])


# -- task arithmetic ------------------------------------------------------------------------


def test_task_arithmetic_formula():
    base = _rand(4, 6, seed=0)
    thetas = [_rand(4, 6, seed=i) for i in (1, 2)]
    w, lam = [0.5, 1.5], 0.7
    expected = base + lam * (w[0] * (thetas[0] - base) + w[1] * (thetas[1] - base))
    out = merge_state_dicts(
        "task_arithmetic",
        [_sd(t) for t in thetas],
        base=_sd(base),
        model_parameters=[{"weight": x} for x in w],
        parameters={"lambda": lam},
    )
    _close(out["w"], expected)


# -- TIES ------------------------------------------------------------------------------------


def _ties_reference(base, thetas, weights, density, lam, normalize, trim=True):
    """TIES-Merging (Yadav et al. 2023), written out entry by entry."""
    n = base.numel()
    k = int(density * n)
    trimmed = []
    for t in thetas:
        tau = (t - base).reshape(-1)
        if trim and density < 1:
            top = set(sorted(range(n), key=lambda j: -abs(tau[j].item()))[:k])
            tau = torch.tensor([tau[j].item() if j in top else 0.0 for j in range(n)])
        trimmed.append(tau)
    out = base.reshape(-1).clone()
    for j in range(n):
        vals = [w * tau[j].item() for w, tau in zip(weights, trimmed)]
        elected = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(vals, weights) if v != 0 and math.copysign(1, v) == elected]
        total = sum(v for v, _ in agree)
        if normalize:
            div = sum(w for _, w in agree)
            total = total / div if div != 0 else total
        out[j] += lam * total
    return out.reshape(base.shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_formula(normalize):
    base = _rand(4, 6, seed=0)
    thetas = [base + _rand(4, 6, seed=i) for i in (1, 2, 3)]
    w, density, lam = [1.0, 0.5, 2.0], 0.5, 0.9
    out = merge_state_dicts(
        "ties",
        [_sd(t) for t in thetas],
        base=_sd(base),
        model_parameters=[{"weight": x} for x in w],
        parameters={"density": density, "lambda": lam, "normalize": normalize},
    )
    _close(out["w"], _ties_reference(base, thetas, w, density, lam, normalize))


def test_ties_trim_keeps_top_k_per_task_vector():
    base = torch.zeros(1, 10)
    tau = torch.tensor([[1.0, -9, 3, 0.5, -7, 2, 8, -4, 0.1, 6]])
    out = merge_state_dicts("ties", [_sd(base + tau)], base=_sd(base), parameters={"density": 0.3})
    # top 3 magnitudes are -9, 8, -7; one model: elected sign is its own, divisor its weight
    expected = torch.tensor([[0.0, -9, 0, 0, -7, 0, 8, 0, 0, 0]])
    _close(out["w"], expected)


# -- DARE ------------------------------------------------------------------------------------


def test_dare_drop_and_rescale_statistics():
    base = _rand(200, 500, seed=0)
    tau = _rand(200, 500, seed=1)
    density = 0.3
    out = merge_state_dicts(
        "dare_linear", [_sd(base + tau)], base=_sd(base), parameters={"density": density}, seed=5
    )["w"]
    delta = out - base
    kept = delta != 0
    # each entry kept with probability `density` (100k entries: 3-sigma ≈ 0.004)
    assert abs(kept.float().mean().item() - density) < 0.01
    # survivors are rescaled by 1/density, dropped ones are exactly the base
    _close(delta[kept], tau[kept] / density, atol=1e-4)
    assert torch.equal(out[~kept], base[~kept])
    # E[rescaled drop] = tau: the mean of delta/tau is 1 within sampling error
    ratio = (delta / tau).mean().item()
    assert abs(ratio - 1) < 0.05


def test_dare_without_rescale_keeps_survivors_as_they_are():
    base, tau = _rand(50, 40, seed=0), _rand(50, 40, seed=1)
    out = merge_state_dicts(
        "dare_linear",
        [_sd(base + tau)],
        base=_sd(base),
        parameters={"density": 0.5, "rescale": False},
    )["w"]
    kept = (out - base) != 0
    _close((out - base)[kept], tau[kept])


@pytest.mark.parametrize(
    ("dare", "plain"), [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")]
)
def test_dare_with_density_one_is_its_deterministic_counterpart(dare, plain):
    base = _rand(4, 6, seed=0)
    models = [_sd(base + _rand(4, 6, seed=i)) for i in (1, 2)]
    kw = dict(
        base=_sd(base),
        model_parameters=[{"weight": 0.6}, {"weight": 1.2}],
        parameters={"lambda": 0.8},
    )
    a = merge_state_dicts(dare, models, seed=1, **kw)
    b = (
        merge_state_dicts(plain, models, **kw)
        if plain == "task_arithmetic"
        else merge_state_dicts(
            plain, models, **{**kw, "parameters": {"lambda": 0.8, "normalize": False}}
        )
    )
    _close(a["w"], b["w"])


# -- Model Breadcrumbs ---------------------------------------------------------------------


def _breadcrumbs_tensor():
    # magnitudes 1..20 in a shuffled order with alternating signs
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    mags = (perm + 1).float()
    signs = torch.tensor([(-1.0) ** i for i in range(20)])
    return (mags * signs).reshape(4, 5)


def test_breadcrumbs_keeps_the_band_below_the_outliers():
    base = torch.zeros(4, 5)
    tau = _breadcrumbs_tensor()
    out = merge_state_dicts(
        "breadcrumbs", [_sd(base + tau)], base=_sd(base), parameters={"density": 0.5, "gamma": 0.1}
    )["w"]
    # n=20: drop the top gamma·n = 2 (|τ| 19, 20) and keep density·n = 10 below them (9..18)
    survivors = sorted(out[out != 0].abs().tolist())
    assert survivors == [float(m) for m in range(9, 19)]
    _close(out[out != 0], tau[out != 0])


def test_breadcrumbs_shrinks_outlier_removal_when_density_demands_it():
    base = torch.zeros(4, 5)
    tau = _breadcrumbs_tensor()
    out = merge_state_dicts(
        "breadcrumbs", [_sd(base + tau)], base=_sd(base), parameters={"density": 0.95, "gamma": 0.1}
    )["w"]
    # keep 19 of 20: only the single largest entry is dropped
    assert sorted(out[out != 0].abs().tolist()) == [float(m) for m in range(1, 20)]


def test_breadcrumbs_ties_is_breadcrumbs_then_sign_election():
    base = torch.zeros(4, 5)
    t1 = _breadcrumbs_tensor()
    t2 = -_breadcrumbs_tensor().flip(0) * 0.5
    kw = dict(base=_sd(base), parameters={"density": 0.5, "gamma": 0.1, "normalize": True})
    out = merge_state_dicts("breadcrumbs_ties", [_sd(t1), _sd(t2)], **kw)["w"]
    s1 = merge_state_dicts("breadcrumbs", [_sd(t1)], **kw)["w"]  # sparsified τ1
    s2 = merge_state_dicts("breadcrumbs", [_sd(t2)], **kw)["w"]
    expected = torch.zeros(4, 5)
    for j in range(20):
        vals = [s1.reshape(-1)[j].item(), s2.reshape(-1)[j].item()]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [v for v in vals if v != 0 and math.copysign(1, v) == sign]
        expected.reshape(-1)[j] = sum(agree) / len(agree) if agree else 0.0
    _close(out, expected)


# -- DELLA -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("della", "plain"), [("della_linear", "task_arithmetic"), ("della", "ties")]
)
def test_della_with_density_one_drops_nothing(della, plain):
    base = _rand(4, 6, seed=0)
    models = [_sd(base + _rand(4, 6, seed=i)) for i in (1, 2)]
    params = {"density": 1.0, "lambda": 0.9}
    a = merge_state_dicts(della, models, base=_sd(base), parameters=params, seed=3)
    plain_params = {
        "lambda": 0.9,
        **({"normalize": True, "density": 1.0} if plain == "ties" else {}),
    }
    b = merge_state_dicts(plain, models, base=_sd(base), parameters=plain_params)
    _close(a["w"], b["w"])


def test_della_keep_probability_grows_with_magnitude_rank():
    rows, m = 4000, 10
    base = torch.zeros(rows, m)
    # every row holds magnitudes 1..10 in the same shuffled column order
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(1))
    tau = (perm + 1).float().repeat(rows, 1)
    density, eps = 0.5, 0.3
    out = merge_state_dicts(
        "della_linear",
        [_sd(base + tau)],
        base=_sd(base),
        parameters={"density": density, "epsilon": eps, "rescale": False},
        seed=0,
    )["w"]
    freq = (out != 0).float().mean(dim=0)  # keep frequency per column
    by_rank = freq[torch.argsort(perm)]  # column of magnitude 1, 2, ..., 10
    assert all(by_rank[i] < by_rank[i + 1] for i in range(m - 1)), by_rank
    # DELLA §3.1: p spread evenly over [density − ε, density + ε] by rank
    expected = torch.tensor([density - eps + 2 * eps * r / (m - 1) for r in range(m)])
    assert (by_rank - expected).abs().max() < 0.04, (by_rank, expected)


def test_della_rescale_keeps_the_expectation():
    base = torch.zeros(2000, 16)
    tau = _rand(2000, 16, seed=4)
    out = merge_state_dicts(
        "della_linear",
        [_sd(tau)],
        base=_sd(base),
        parameters={"density": 0.5, "epsilon": 0.2},
        seed=2,
    )["w"]
    assert abs((out / tau).mean().item() - 1) < 0.05


# -- SLERP -------------------------------------------------------------------------------------


def _orthonormal_pair():
    a = torch.zeros(4, 6)
    b = torch.zeros(4, 6)
    a[0, 0] = 1.0
    b[2, 3] = 1.0
    return a, b


def test_slerp_orthogonal_unit_vectors_at_half():
    a, b = _orthonormal_pair()
    out = merge_state_dicts("slerp", [_sd(b)], base=_sd(a), parameters={"t": 0.5})["w"]
    _close(out, (a + b) / math.sqrt(2))


@pytest.mark.parametrize("t", [0.25, 0.75])
def test_slerp_stays_on_the_great_circle(t):
    a, b = _orthonormal_pair()
    out = merge_state_dicts("slerp", [_sd(b)], base=_sd(a), parameters={"t": t})["w"]
    # angle π/2: slerp(t) = cos(tπ/2)·a + sin(tπ/2)·b
    _close(out, math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b)


def test_slerp_endpoints_and_collinear_fallback():
    a, b = _rand(4, 6, seed=0), _rand(4, 6, seed=1)
    _close(merge_state_dicts("slerp", [_sd(b)], base=_sd(a), parameters={"t": 0.0})["w"], a)
    _close(merge_state_dicts("slerp", [_sd(b)], base=_sd(a), parameters={"t": 1.0})["w"], b)
    out = merge_state_dicts("slerp", [_sd(2 * a)], base=_sd(a), parameters={"t": 0.3})["w"]
    _close(out, 0.7 * a + 0.3 * (2 * a))  # collinear: plain lerp


# -- Karcher mean --------------------------------------------------------------------------------


def test_karcher_of_two_equal_norm_models_is_slerp_half():
    a = _rand(4, 6, seed=0)
    b = _rand(4, 6, seed=1)
    b = b * (a.norm() / b.norm())  # equal norms
    out = merge_state_dicts("karcher", [_sd(a), _sd(b)])["w"]
    slerp = merge_state_dicts("slerp", [_sd(b)], base=_sd(a), parameters={"t": 0.5})["w"]
    _close(out, slerp, atol=1e-4)
    # and plainly: the bisecting direction, at the common norm
    _close(out, (a + b) / (a + b).norm() * a.norm(), atol=1e-4)


def test_karcher_satisfies_the_karcher_condition():
    ts = [_rand(3, 5, seed=i) for i in range(3)]
    w = [1.0, 2.0, 3.0]
    out = merge_state_dicts(
        "karcher",
        [_sd(t) for t in ts],
        model_parameters=[{"weight": x} for x in w],
        parameters={"max_iter": 200, "tol": 1e-9},
    )["w"].double()
    mu = out.reshape(-1) / out.norm()
    # weighted sum of log maps at the mean vanishes: Σ w_i θ_i/sin θ_i (u_i − cos θ_i μ) = 0
    grad = torch.zeros_like(mu)
    for wi, t in zip(w, ts):
        u = t.double().reshape(-1) / t.norm()
        c = torch.dot(mu, u).clamp(-1, 1)
        th = torch.acos(c)
        grad += wi / sum(w) * th / torch.sin(th) * (u - c * mu)
    assert grad.norm() < 1e-4
    # norm: weighted mean of the input norms
    expected_norm = sum(wi * t.double().norm() for wi, t in zip(w, ts)) / sum(w)
    assert abs(out.norm() - expected_norm) < 1e-4


# -- Model Stock ---------------------------------------------------------------------------------


def _model_stock_inputs():
    base = _rand(4, 6, seed=0)
    shared = _rand(4, 6, seed=10)
    thetas = [base + shared + 0.7 * _rand(4, 6, seed=i) for i in (1, 2, 3)]
    return base, thetas


def test_model_stock_formula():
    base, thetas = _model_stock_inputs()
    n = len(thetas)
    taus = [(t - base).reshape(-1) for t in thetas]
    cos = [
        torch.dot(taus[i], taus[j]) / (taus[i].norm() * taus[j].norm())
        for i in range(n)
        for j in range(i + 1, n)
    ]
    c = sum(cos) / len(cos)
    assert c > 0.1  # the inputs share a direction, so the test is meaningful
    t = n * c / (1 + (n - 1) * c)
    expected = t * sum(thetas) / n + (1 - t) * base
    out = merge_state_dicts("model_stock", [_sd(x) for x in thetas], base=_sd(base))["w"]
    _close(out, expected)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base, thetas = _model_stock_inputs()
    n = len(thetas)
    out = merge_state_dicts(
        "model_stock", [_sd(x) for x in thetas], base=_sd(base), parameters={"filter_wise": True}
    )["w"]
    for r in range(base.shape[0]):
        taus = [t[r] - base[r] for t in thetas]
        cos = [
            torch.dot(taus[i], taus[j]) / (taus[i].norm() * taus[j].norm())
            for i in range(n)
            for j in range(i + 1, n)
        ]
        c = float(sum(cos) / len(cos))  # may be negative for a row: no clamp by default
        t = n * c / (1 + (n - 1) * c)
        _close(out[r], t * sum(x[r] for x in thetas) / n + (1 - t) * base[r])


def _opposed():
    """Three fine-tunes whose task vectors point away from each other: mean cosine < 0."""
    base = torch.zeros(2, 3)
    taus = [torch.tensor([[1.0, 0, 0], [0, 1, 0]]), torch.tensor([[-1.0, 0.2, 0], [0, -1, 0.1]])]
    taus.append(torch.tensor([[0.1, -0.9, 0.3], [0.4, 0.2, -1.0]]))
    return base, [base + t for t in taus]


def test_model_stock_negative_cosine_and_clamp_cosine():
    base, thetas = _opposed()
    n = len(thetas)
    taus = [(t - base).reshape(-1) for t in thetas]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    c = sum(float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i, j in pairs) / 3
    assert c < 0  # the case the parameter is about
    raw = merge_state_dicts("model_stock", [{"w": t} for t in thetas], base={"w": base})["w"]
    t = n * c / (1 + (n - 1) * c)  # negative: away from the fine-tunes' average (as mergekit)
    torch.testing.assert_close(raw, t * sum(thetas) / n + (1 - t) * base)
    clamped = merge_state_dicts(
        "model_stock",
        [{"w": t} for t in thetas],
        base={"w": base},
        parameters={"clamp_cosine": True},
    )["w"]
    torch.testing.assert_close(clamped, base)


def test_model_stock_keeps_the_base_where_the_ratio_is_singular():
    base = torch.zeros(1, 2)
    thetas = [torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])]  # cosθ = −1 = −1/(N−1)
    out = merge_state_dicts("model_stock", [{"w": t} for t in thetas], base={"w": base})["w"]
    assert torch.equal(out, base)


def test_model_stock_in_bfloat16_follows_mergekit_order():
    """mergekit's arithmetic, every step in bfloat16: cosines from the task vectors' dot
    product over the product of their norms (clamped at 1e-6), mean, ratio, the fine-tunes
    summed in order and divided by N, then t·avg + (1 − t)·base."""
    bf = torch.bfloat16
    base, thetas = _model_stock_inputs()
    base, thetas = base.to(bf), [t.to(bf) for t in thetas]
    n = len(thetas)
    taus = [(t - base).reshape(-1) for t in thetas]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = torch.norm(taus[i], dim=-1) * torch.norm(taus[j], dim=-1)
            cos.append(((taus[i] * taus[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0)
    t = (n * c) / (1 + (n - 1) * c)
    avg = (thetas[0] + thetas[1] + thetas[2]) / n
    expected = t * avg + (1 - t) * base
    out = merge_state_dicts(
        "model_stock", [_sd(x) for x in thetas], base=_sd(base), compute_dtype="bfloat16"
    )["w"]
    assert out.dtype == bf and torch.equal(out, expected)


# -- passthrough ---------------------------------------------------------------------------------


def test_passthrough_copies_and_scales():
    x = _rand(4, 6, seed=0)
    _close(merge_state_dicts("passthrough", [_sd(x)])["w"], x)
    _close(merge_state_dicts("passthrough", [_sd(x)], parameters={"scale": 0.5})["w"], 0.5 * x)
