"""Data-free state-of-the-art merges (issue 10): TSV-M, Iso-C, Iso-CTS, PCB, WUDI.

Reference tests (STYLE.md §6) write each paper's formula out plainly — whitening by
(AᵀA)^(-1/2) instead of the SVD's polar factor, loops over tasks and entries, autograd and
``torch.optim.Adam`` instead of the closed-form gradient — and compare with
``merge_state_dicts``. Property tests (STYLE.md §5) check known answers, permutation
invariance, the 1-D rule, shapes and determinism.
"""

from __future__ import annotations

import math

import pytest
import torch

from brickwork.merge.api import merge_state_dicts

SOTA = ["tsv_m", "iso_c", "iso_cts", "pcb", "wudi"]


def _rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _inputs(shape=(8, 6), n=3, seed=0, scale=1.0, dtype=torch.float64):
    base = _rand(*shape, seed=seed)
    thetas = [base + _rand(*shape, seed=seed + 1 + i, scale=scale) for i in range(n)]
    return base.to(dtype), [t.to(dtype) for t in thetas]


def _merge(method, base, thetas, compute_dtype="float64", **params):
    out = merge_state_dicts(
        method,
        [{"w": t} for t in thetas],
        base={"w": base},
        parameters=params,
        compute_dtype=compute_dtype,
    )
    return out["w"]


def _close(a, b, atol=1e-9):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-7)


def _inv_sqrt(gram):
    """gram^(-1/2) of a symmetric positive definite matrix, by its eigendecomposition."""
    w, q = torch.linalg.eigh(gram)
    assert w.min() > 1e-8  # full rank: the whitening is unique, the test meaningful
    return q @ torch.diag(w.rsqrt()) @ q.T


def _whiten_columns(a):
    return a @ _inv_sqrt(a.T @ a)  # A (AᵀA)^(-1/2): orthonormal columns


def _whiten_rows(b):
    return _inv_sqrt(b @ b.T) @ b  # (BBᵀ)^(-1/2) B: orthonormal rows


# -- TSV-M ------------------------------------------------------------------------------------


def test_tsv_m_formula():
    base, thetas = _inputs((8, 6), n=3)
    alpha = 0.9
    k = 6 // 3  # top 1/T of r = min(8, 6) singular vectors per task
    us, ss, vs = [], [], []
    for t in thetas:
        u, s, vh = torch.linalg.svd(t - base)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_hat = _whiten_columns(torch.cat(us, dim=1))  # (8, 6)
    v_hat = _whiten_columns(torch.cat(vs, dim=1))  # (6, 6)
    expected = base + alpha * u_hat @ torch.diag(torch.cat(ss)) @ v_hat.T
    _close(_merge("tsv_m", base, thetas, alpha=alpha), expected)


def test_tsv_m_one_model_is_task_arithmetic():
    base, thetas = _inputs((7, 5), n=1)
    _close(_merge("tsv_m", base, thetas, alpha=0.6), base + 0.6 * (thetas[0] - base))


def test_tsv_m_orthogonal_low_rank_task_vectors_are_summed():
    """Task vectors of rank ≤ k in mutually orthogonal row and column spaces do not
    interfere: whitening changes nothing and TSV-M is task arithmetic."""
    base = _rand(9, 6, seed=0)
    taus = []
    for i in range(3):  # rows 3i..3i+2, columns 2i..2i+1: rank ≤ 2 = ⌊6/3⌋
        tau = torch.zeros(9, 6, dtype=torch.float64)
        tau[3 * i : 3 * i + 3, 2 * i : 2 * i + 2] = _rand(3, 2, seed=10 + i)
        taus.append(tau)
    out = _merge("tsv_m", base, [base + t for t in taus])
    _close(out, base + sum(taus))


def test_tsv_m_differs_from_task_arithmetic_when_tasks_interfere():
    base, thetas = _inputs((8, 6), n=3)
    ta = base + sum(t - base for t in thetas)
    assert (_merge("tsv_m", base, thetas) - ta).abs().max() > 0.1


# -- Iso-C / Iso-CTS ----------------------------------------------------------------------------


def test_iso_c_formula():
    base, thetas = _inputs((8, 6), n=3)
    alpha = 1.3
    total = sum(t - base for t in thetas)
    sigma_mean = torch.linalg.matrix_norm(total, ord="nuc") / 6  # mean singular value
    expected = base + alpha * sigma_mean * _whiten_columns(total)  # U Vᵀ = A (AᵀA)^(-1/2)
    _close(_merge("iso_c", base, thetas, alpha=alpha), expected)


def test_iso_c_spectrum_is_flat_and_keeps_the_nuclear_norm():
    base, thetas = _inputs((8, 6), n=3)
    delta = _merge("iso_c", base, thetas) - base
    s = torch.linalg.svdvals(delta)
    total = sum(t - base for t in thetas)
    _close(s, torch.full_like(s, float(torch.linalg.svdvals(total).mean())))


def test_iso_c_identical_fine_tunes_scale_with_their_number():
    base, (theta,) = _inputs((6, 6), n=1)
    one = _merge("iso_c", base, [theta]) - base
    three = _merge("iso_c", base, [theta, theta.clone(), theta.clone()]) - base
    _close(three, 3 * one)


def _iso_cts_reference(base, thetas, fraction, alpha):
    """Iso-CTS (Marczak et al. 2025, Alg. 1) with r = min(rows, cols)."""
    n = len(thetas)
    taus = [t - base for t in thetas]
    r = min(base.shape)
    k_c = int(r * fraction)
    k_t = round((r - k_c) / n)
    k_c = r - n * k_t
    u, s, vh = torch.linalg.svd(sum(taus))
    u_c, s_c, v_c = u[:, :k_c], s[:k_c], vh[:k_c].T
    cols_u, cols_v, sv = [u_c], [v_c], [s_c]
    for tau in taus:
        residual = tau - u_c @ u_c.T @ tau  # the part outside the common subspace
        ut, st, vht = torch.linalg.svd(residual)
        cols_u.append(ut[:, :k_t])
        cols_v.append(vht[:k_t].T)
        sv.append(st[:k_t])
    u_hat = _whiten_columns(torch.cat(cols_u, dim=1))
    v_hat = _whiten_columns(torch.cat(cols_v, dim=1))
    return base + alpha * torch.cat(sv).mean() * u_hat @ v_hat.T


def test_iso_cts_formula():
    base, thetas = _inputs((10, 8), n=3)
    # r = 8: k_c = ⌊8·0.5⌋ = 4, k_t = round(4/3) = 1, so k_c becomes 5
    expected = _iso_cts_reference(base, thetas, 0.5, 1.2)
    out = _merge("iso_cts", base, thetas, alpha=1.2, common_space_fraction=0.5)
    _close(out, expected)


def test_iso_cts_default_fraction_formula():
    base, thetas = _inputs((12, 12), n=2)
    # r = 12: k_c = ⌊9.6⌋ = 9, k_t = round(3/2) = 2 (banker's rounding as in Python), k_c = 8
    _close(_merge("iso_cts", base, thetas), _iso_cts_reference(base, thetas, 0.8, 1.0))


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.8), (3, 1.0)])
def test_iso_cts_reduces_to_iso_c(n, fraction):
    """One model (its residual holds the rest of its own SVD), or no task-specific space."""
    base, thetas = _inputs((8, 6), n=n)
    _close(
        _merge("iso_cts", base, thetas, common_space_fraction=fraction, alpha=1.1),
        _merge("iso_c", base, thetas, alpha=1.1),
    )


def test_iso_cts_differs_from_iso_c_with_task_specific_space():
    base, thetas = _inputs((10, 8), n=3)
    a = _merge("iso_cts", base, thetas, common_space_fraction=0.5)
    assert (a - _merge("iso_c", base, thetas)).abs().max() > 1e-3


# -- PCB ----------------------------------------------------------------------------------------


def _pcb_reference(base, thetas, ratio, lam, clip):
    """PCB-Merging (Du et al. 2024, §3.2 and the authors' code), entry by entry."""
    n = len(thetas)
    taus = [(t - base).reshape(-1).tolist() for t in thetas]
    d = len(taus[0])
    total = [sum(tau[j] for tau in taus) for j in range(d)]

    def norm(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in xs]

    clipped, weights = [], []
    for tau in taus:
        mags = sorted(abs(x) for x in tau)
        c = math.floor(d * clip)
        lo, hi = mags[c], mags[d - 1 - c]
        mag = [min(max(abs(x), lo), hi) for x in tau]
        clipped.append([math.copysign(m, x) for m, x in zip(mag, tau)])
        intra = [math.exp(n * v**2) for v in norm(mag)]
        inter = [math.tanh(x * s) for x, s in zip(tau, total)]
        score = [a * b for a, b in zip(intra, inter)]
        keep = math.ceil(d * ratio)
        floor = sorted(score)[d - keep - 1]
        weights.append(norm([max(x, floor) for x in score]))
    out = base.reshape(-1).clone()
    for j in range(d):
        den = sum(w[j] for w in weights)
        num = sum(w[j] * c[j] for w, c in zip(weights, clipped))
        out[j] += lam * num / max(den, 1e-12)
    return out.reshape(base.shape)


@pytest.mark.parametrize("shape", [(6, 5), (30,)])
def test_pcb_formula(shape):
    base, thetas = _inputs(shape, n=3)
    params = {"pcb_ratio": 0.2, "lambda": 1.3, "clip_ratio": 0.05}  # clips 1 entry per end
    expected = _pcb_reference(base, thetas, 0.2, 1.3, 0.05)
    _close(_merge("pcb", base, thetas, **params), expected)


def test_pcb_one_model_keeps_the_top_entries():
    base = torch.zeros(4, 5, dtype=torch.float64)
    tau = _rand(4, 5, seed=3)
    out = _merge("pcb", base, [base + tau], pcb_ratio=0.25, clip_ratio=0.0)
    top = tau.abs().reshape(-1).argsort(descending=True)[:5]  # ⌈20·0.25⌉ = 5
    expected = torch.zeros(20, dtype=torch.float64)
    expected[top] = tau.reshape(-1)[top]
    _close(out.reshape(-1), expected)


def test_pcb_identical_fine_tunes_are_one_fine_tune():
    base, (theta,) = _inputs((5, 6), n=1)
    one = _merge("pcb", base, [theta], **{"lambda": 1.2})
    three = _merge("pcb", base, [theta, theta.clone(), theta.clone()], **{"lambda": 1.2})
    _close(three, one)


def test_pcb_shape_does_not_matter():
    """PCB works on the flattened entries: a matrix and its flattening merge alike."""
    base, thetas = _inputs((6, 5), n=3)
    flat = _merge("pcb", base.reshape(-1), [t.reshape(-1) for t in thetas])
    _close(_merge("pcb", base, thetas).reshape(-1), flat)


# -- WUDI ---------------------------------------------------------------------------------------


def _wudi_reference(base, thetas, iterations, lr):
    """WUDI (Cheng et al. 2025, Eq. 9): Adam on Σ_i ‖(τ_m − τ_i) τ_iᵀ‖² / ‖τ_i‖² from Σ τ_i."""
    taus = [t - base for t in thetas]
    merged = torch.nn.Parameter(sum(taus).clone())
    opt = torch.optim.Adam([merged], lr=lr)
    with torch.enable_grad():
        for _ in range(iterations):
            loss = sum(((merged - tau) @ tau.T).square().sum() / tau.square().sum() for tau in taus)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return base + merged.detach()


def _wudi_loss(delta, taus):
    return sum(float(((delta - t) @ t.T).square().sum() / t.square().sum()) for t in taus)


@pytest.mark.parametrize("shape", [(8, 6), (3, 20)])  # Gram matrix / stacked task vectors
def test_wudi_formula(shape):
    base, thetas = _inputs(shape, n=3)
    out = _merge("wudi", base, thetas, iterations=25, lr=0.01)
    _close(out, _wudi_reference(base, thetas, 25, 0.01), atol=1e-8)


def test_wudi_lowers_the_interference_loss():
    base, thetas = _inputs((8, 6), n=3)
    taus = [t - base for t in thetas]
    out = _merge("wudi", base, thetas, iterations=50, lr=0.01)
    assert _wudi_loss(out - base, taus) < 0.8 * _wudi_loss(sum(taus), taus)


def test_wudi_without_steps_is_the_sum_and_one_model_is_the_fine_tune():
    base, thetas = _inputs((8, 6), n=3)
    _close(_merge("wudi", base, thetas, iterations=0), base + sum(t - base for t in thetas))
    # one model: the loss is 0 at the start (τ_m = τ) and its gradient vanishes
    _close(_merge("wudi", base, thetas[:1], lr=0.1), thetas[0])


def test_wudi_skips_zero_task_vectors():
    base, thetas = _inputs((8, 6), n=2)
    with_zero = _merge("wudi", base, [*thetas, base.clone()], iterations=10, lr=0.01)
    _close(with_zero, _merge("wudi", base, thetas, iterations=10, lr=0.01))


# -- properties of all five ---------------------------------------------------------------------


@pytest.mark.parametrize("method", SOTA)
def test_model_order_does_not_matter(method):
    base, thetas = _inputs((10, 8), n=3)
    params = {"common_space_fraction": 0.5} if method == "iso_cts" else {}
    if method == "wudi":
        params = {"iterations": 10, "lr": 0.01}
    a = _merge(method, base, thetas, **params)
    b = _merge(method, base, thetas[::-1], **params)
    _close(a, b, atol=1e-8)
    assert (a - base).abs().max() > 0.1  # the merge moved: the comparison means something


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "wudi"])
def test_one_dimensional_tensors_get_the_mean_task_vector(method):
    base, thetas = _inputs((7,), n=3)
    scaled = {"wudi": 1.0}.get(method, 0.7)
    params = {} if method == "wudi" else {"alpha": 0.7}
    expected = base + scaled * sum(t - base for t in thetas) / 3
    _close(_merge(method, base, thetas, **params), expected)
    base3, thetas3 = _inputs((2, 3, 4), n=3)  # ≥3-D kernels too
    expected3 = base3 + scaled * sum(t - base3 for t in thetas3) / 3
    _close(_merge(method, base3, thetas3, **params), expected3)


@pytest.mark.parametrize("method", SOTA)
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_shape_dtype_and_determinism(method, compute_dtype):
    base, thetas = _inputs((9, 4), n=4, dtype=torch.float32, scale=0.1)
    a = _merge(method, base, thetas, compute_dtype=compute_dtype)
    b = _merge(method, base, thetas, compute_dtype=compute_dtype)
    assert a.shape == base.shape and a.dtype == base.dtype
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    ref = _merge(method, base.double(), [t.double() for t in thetas]).float()
    tol = 1e-4 if compute_dtype == "float32" else 0.05  # bfloat16: rounded in and out
    torch.testing.assert_close(a, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("method", SOTA)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (2, 2)])
def test_tiny_matrices_and_more_tasks_than_rank(method, shape):
    base, thetas = _inputs(shape, n=3, dtype=torch.float32)
    out = _merge(method, base, thetas, compute_dtype="float32")
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.equal(out, base)  # every method moves a non-zero task vector somewhere


@pytest.mark.parametrize("method", SOTA)
def test_registered_with_paper_base_and_a_small_search_space(method):
    from brickwork.merge.registry import get_method

    m = get_method(method)
    assert m.needs_base and "arXiv:" in m.reference
    combos = math.prod(len(v) for v in m.search_space.values())
    assert 1 < combos <= 4, m.search_space
    for name, values in m.search_space.items():  # every value passes the parameter's checks
        for v in values:
            m.param(name).validate(v, where=method)
