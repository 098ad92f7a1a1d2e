"""OT fusion (Singh & Jaggi 2020) and ZipIt! (Stoica et al. 2024) for MLPs.

Properties (STYLE.md §5): exact OT of a model onto a permuted copy of itself is the permutation
(the Hungarian answer) and recovers the weights and the function; a copy widened by duplicating
units fuses back into the original function; weights (1, 0) give the target; zipping a model
with a permuted copy gives the model's function back; ``stop_at=0`` is the output ensemble;
inputs are never modified. Reference (§6): the transport formula Ŵ = T̃ᵀ W T̂_prev and ZipIt's
merge / unmerge matrices written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import permuted_copy
from scipy.optimize import linear_sum_assignment
from torch import nn

import brickwork
from brickwork.align import permutation_spec
from brickwork.align.ot_fusion import ot_fusion, solve, transport_maps, transport_state_dict
from brickwork.align.zipit import ZippedEnsemble, match, zipit
from brickwork.errors import AlignError, DataError, UnknownNameError

KINDS = ["relu", "batchnorm", "layernorm"]


def _mlp(kind: str, seed: int, width: int = 16, width2: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    w2 = width if width2 is None else width2
    if kind == "relu":
        layers = [nn.Linear(8, width), nn.ReLU(), nn.Linear(width, w2), nn.ReLU()]
    elif kind == "batchnorm":
        layers = [nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU()]
        layers += [nn.Linear(width, w2), nn.ReLU(), nn.BatchNorm1d(w2)]
    elif kind == "layernorm":
        layers = [nn.Linear(8, width), nn.GELU(), nn.LayerNorm(width)]
        layers += [nn.Linear(width, w2), nn.Tanh(), nn.LayerNorm(w2)]
    else:
        raise ValueError(kind)
    model = nn.Sequential(*layers, nn.Linear(w2, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def _data(n_batches: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 8, generator=g, dtype=torch.float64) for _ in range(n_batches)]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _widened(model: nn.Module, kind: str) -> nn.Module:
    """``model`` with every unit of both hidden layers duplicated (2×16 → 2×32 units), the
    outgoing weights of each copy halved: exactly the same function."""
    wide = _mlp(kind, 99, width=32)
    sd, new = model.state_dict(), {}
    idx = torch.arange(16).repeat_interleave(2)  # wide unit 2i and 2i+1 are unit i
    moves = permutation_spec(model).members_of()
    for name, t in sd.items():
        for _group, member in moves.get(name, []):
            t = t.index_select(member.axis, idx)
            if member.axis == 1:  # a consumer's input: the two copies share the weight
                t = t / 2
        new[name] = t
    wide.load_state_dict(new)
    return wide.eval()


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------ OT fusion


@pytest.mark.parametrize("with_data", [False, True], ids=["weight", "activation"])
@pytest.mark.parametrize("kind", KINDS)
def test_ot_emd_onto_a_permuted_copy_is_the_permutation(kind, with_data):
    model = _mlp(kind, 0)
    permuted, true = permuted_copy(model, seed=5)
    moved, plans = brickwork.align(
        model, permuted, method="ot", data=_data() if with_data else None
    )
    for name, p in true.items():
        n = len(p)
        plan = plans[name].double() * n  # (B's units, A's units)
        # B's unit j is A's unit p[j]: the plan moves all of its mass there
        assert torch.equal(plan.argmax(1), p)
        torch.testing.assert_close(plan, torch.eye(n, dtype=torch.float64)[p], atol=1e-6, rtol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(moved.state_dict()[key], value, atol=1e-12, rtol=0)
    x = _data(1, seed=7)[0]
    torch.testing.assert_close(_out(moved, x), _out(permuted, x), atol=1e-5, rtol=0)


def test_emd_with_equal_widths_is_the_hungarian_solution():
    g = torch.Generator().manual_seed(0)
    for n in (3, 7, 20):
        cost = torch.rand(n, n, generator=g, dtype=torch.float64)
        plan = solve(cost, solver="emd") * n
        rows, cols = linear_sum_assignment(cost.numpy())
        expected = torch.zeros(n, n, dtype=torch.float64)
        expected[rows, cols] = 1.0
        torch.testing.assert_close(plan, expected, atol=1e-9, rtol=0)


def test_sinkhorn_with_small_reg_approaches_emd():
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(12, 9, generator=g, dtype=torch.float64)  # also unequal widths
    exact = solve(cost, solver="emd")
    gaps = []
    for reg in (0.3, 0.03, 0.003):
        plan = solve(cost, solver="sinkhorn", reg=reg)
        torch.testing.assert_close(plan.sum(1), torch.full((12,), 1 / 12, dtype=torch.float64))
        torch.testing.assert_close(plan.sum(0), torch.full((9,), 1 / 9, dtype=torch.float64))
        gaps.append(float((plan - exact).abs().sum()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05, gaps
    # the transport cost tends to the optimum as well
    costs = [float((solve(cost, solver="sinkhorn", reg=r) * cost).sum()) for r in (0.3, 0.003)]
    optimum = float((exact * cost).sum())
    assert costs[0] > costs[1] >= optimum - 1e-9 and costs[1] - optimum < 1e-3


def test_given_marginals_are_respected():
    cost = torch.rand(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mu = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    nu = torch.full((6,), 1 / 6, dtype=torch.float64)
    plan = solve(cost, source=mu, target=nu)
    torch.testing.assert_close(plan.sum(1), mu)
    torch.testing.assert_close(plan.sum(0), nu)
    with pytest.raises(AlignError, match="source marginal must be 4"):
        solve(cost, source=torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_a_widened_copy_fuses_back_into_the_original_function(kind):
    model = _mlp(kind, 0)
    wide = _widened(model, kind)
    x = _data(1, seed=7)[0]
    torch.testing.assert_close(_out(wide, x), _out(model, x), atol=1e-10, rtol=0)
    fused = ot_fusion([model, wide])  # into A's 16 units
    assert {k: v.shape for k, v in fused.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    torch.testing.assert_close(_out(fused, x), _out(model, x), atol=1e-5, rtol=0)
    into_wide = ot_fusion([wide, model])  # into the wide model's 32 units
    assert into_wide[0].weight.shape == (32, 8)
    torch.testing.assert_close(_out(into_wide, x), _out(model, x), atol=1e-5, rtol=0)
    moved, plans = brickwork.align(model, wide, method="ot", solver="sinkhorn", reg=1e-3)
    assert plans["0"].shape == (32, 16)
    assert moved[0].weight.shape == (16, 8)


def test_models_of_different_widths_fuse_into_the_target_widths():
    a, b, c = _mlp("relu", 0, 16, 10), _mlp("relu", 1, 24, 6), _mlp("relu", 2, 12, 14)
    for target, ref in ((0, a), (1, b), (2, c)):
        fused = ot_fusion([a, b, c], target=target, solver="sinkhorn", reg=0.05)
        shapes = {k: v.shape for k, v in fused.state_dict().items()}
        assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
        assert all(torch.isfinite(v).all() for v in fused.state_dict().values())


def test_transport_is_the_papers_formula():
    """Ŵ⁽ˡ⁾ = T̃⁽ˡ⁾ᵀ W_b⁽ˡ⁾ T̂⁽ˡ⁻¹⁾, T̃ = T diag(1/ν) (columns sum to 1, the paper's
    diag(1/β) Tᵀ), T̂ = diag(1/μ) T (rows sum to 1), written out for a 3-layer MLP with
    Sinkhorn plans (no permutations)."""
    a, b = _mlp("relu", 0, 6, 5), _mlp("relu", 1, 8, 4)
    spec_a, spec_b, maps = transport_maps(a, b, solver="sinkhorn", reg=0.1)
    t1, t2 = maps.plan["0"], maps.plan["2"]  # (8, 6), (4, 5)
    col1, col2 = t1 / t1.sum(0), t2 / t2.sum(0)
    row1, row2 = t1 / t1.sum(1, keepdim=True), t2 / t2.sum(1, keepdim=True)
    sd = {k: v.detach() for k, v in b.state_dict().items()}
    expected = {
        "0.weight": col1.T @ sd["0.weight"],
        "0.bias": col1.T @ sd["0.bias"],
        "2.weight": col2.T @ sd["2.weight"] @ row1,
        "2.bias": col2.T @ sd["2.bias"],
        "4.weight": sd["4.weight"] @ row2,
        "4.bias": sd["4.bias"],
    }
    got = transport_state_dict(b.state_dict(), spec_b, maps)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-12, rtol=0)
    # the weight-based ground cost of the first layer: squared distance of [W | b] rows
    rows_a = torch.cat([a[0].weight, a[0].bias[:, None]], 1).detach()
    rows_b = torch.cat([b[0].weight, b[0].bias[:, None]], 1).detach()
    cost = torch.cdist(rows_b, rows_a) ** 2
    torch.testing.assert_close(t1, solve(cost, solver="sinkhorn", reg=0.1))


def test_fusion_weights_one_zero_give_the_target_and_inputs_are_untouched():
    a, b = _mlp("batchnorm", 0), _mlp("batchnorm", 1)
    b.train()
    before_a, before_b = _snapshot(a), _snapshot(b)
    x = _data(1, seed=7)[0]
    fused = ot_fusion([a, b], weights=(1, 0))
    for key, value in a.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    fused = ot_fusion([a, b], weights=(0.5, 0.5), data=_data())
    assert fused is not a and not torch.equal(fused[0].weight, a[0].weight)
    assert _unchanged(a, before_a) and _unchanged(b, before_b)
    assert b.training and not a.training
    assert torch.isfinite(_out(fused.eval(), x)).all()
    # a model fused with permuted copies of itself is itself
    p1, _ = permuted_copy(a, 1)
    p2, _ = permuted_copy(a, 2)
    torch.testing.assert_close(_out(ot_fusion([a, p1, p2]), x), _out(a, x), atol=1e-5, rtol=0)


def test_ot_fusion_errors():
    a = _mlp("relu", 0)
    with pytest.raises(AlignError, match="at least one model"):
        ot_fusion([])
    with pytest.raises(AlignError, match="2 weights for 3 models"):
        ot_fusion([a, a, a], weights=(1, 1))
    with pytest.raises(AlignError, match="non-negative"):
        ot_fusion([a, a], weights=(1, -1))
    with pytest.raises(AlignError, match="out of range"):
        ot_fusion([a, a], target=2)
    with pytest.raises(UnknownNameError, match="Did you mean 'sinkhorn'"):
        ot_fusion([a, a], solver="sinkhorm")
    with pytest.raises(AlignError, match="Sinkhorn needs reg > 0"):
        ot_fusion([a, a], solver="sinkhorn", reg=0)
    with pytest.raises(AlignError, match="different layer structures"):
        ot_fusion([a, _mlp("layernorm", 0)])
    other_input = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    other_input.append(nn.Linear(16, 5))
    with pytest.raises(AlignError, match="tensor '0.weight' has shape"):
        ot_fusion([a, other_input.double()])


# -------------------------------------------------------------------------------- ZipIt!


@pytest.mark.parametrize("kind", KINDS)
def test_zipping_a_model_with_a_permuted_copy_gives_the_model(kind):
    model = _mlp(kind, 0)
    permuted, _ = permuted_copy(model, seed=3)
    before = _snapshot(permuted)
    x = _data(1, seed=7)[0]
    for stop_at in (None, 1):
        zipped = zipit([model, permuted], _data(), stop_at=stop_at)
        torch.testing.assert_close(_out(zipped, x), _out(model, x), atol=1e-5, rtol=0)
    zipped = zipit([model, permuted], _data())
    assert type(zipped) is type(model)
    for key, value in model.state_dict().items():  # clusters in model 0's order
        torch.testing.assert_close(zipped.state_dict()[key], value, atol=1e-12, rtol=0)
    assert _unchanged(permuted, before)


def test_merge_and_unmerge_matrices_of_a_hand_worked_two_unit_example():
    # features: A0, A1, B0, B1 (2 models, 2 units each)
    corr = torch.tensor(
        [
            [1.0, 0.2, 0.1, 0.9],
            [0.2, 1.0, 0.5, 0.3],
            [0.1, 0.5, 1.0, 0.0],
            [0.9, 0.3, 0.0, 1.0],
        ]
    )
    # most correlated: A0–B1 (0.9); then A1–B0 (0.5)
    merge, unmerge = match(corr, 2, alpha=0.0, beta=0.0)
    u = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]], dtype=torch.float64)
    assert torch.equal(unmerge, u)
    assert torch.equal(merge, torch.tensor([[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]).double())
    # within-model merges: A0–A1 most correlated; allowed with a budget (beta=1: one merge per
    # model), then B0–B1 is what is left; forbidden with beta=0, which pairs across models
    corr = torch.tensor(
        [
            [1.0, 0.95, 0.6, 0.1],
            [0.95, 1.0, 0.2, 0.7],
            [0.6, 0.2, 1.0, 0.3],
            [0.1, 0.7, 0.3, 1.0],
        ]
    )
    _, unmerge = match(corr, 2, alpha=0.0, beta=1.0)
    assert torch.equal(unmerge, torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]).double())
    _, unmerge = match(corr, 2, alpha=0.0, beta=0.0)  # A1–B1 0.7, then A0–B0 0.6
    assert torch.equal(unmerge, torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]).double())
    # beta=0.5 is a budget of int(0.5 · 2 / 2) = 0 within-model merges per model; alpha=1 lets
    # a cluster merge again: A1–B1 (0.7), then (A1, B1)–A0 = min(0.95, 0.1) < A0–B0 0.6
    merge, unmerge = match(corr, 2, alpha=1.0, beta=0.5)
    assert torch.equal(unmerge, torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]).double())
    corr3 = corr.clone()
    corr3[0, 3] = corr3[3, 0] = 0.9  # A0–B1 0.9 first; then (A0, B1)–A1 = min(0.95, 0.7) = 0.7
    merge, unmerge = match(corr3, 2, alpha=1.0, beta=0.0)
    assert torch.equal(unmerge, torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0]]).double())
    third = torch.tensor([1 / 3, 1 / 3, 0, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(merge[0], third)


def test_partial_zipping_with_stop_at_zero_is_the_output_ensemble():
    a, b = _mlp("batchnorm", 0), _mlp("batchnorm", 1)
    x = _data(1, seed=7)[0]
    ensemble = zipit([a, b], _data(), stop_at=0)
    assert isinstance(ensemble, ZippedEnsemble)
    torch.testing.assert_close(_out(ensemble, x), (_out(a, x) + _out(b, x)) / 2, atol=1e-12, rtol=0)
    full = zipit([a, b], _data(), stop_at=2)
    torch.testing.assert_close(_out(full, x), _out(zipit([a, b], _data()), x))


def test_partial_zipping_is_the_formula():
    """stop_at=1 on a 2-hidden-layer ReLU MLP: h = relu(M_a W0a x + M_b W0b x + M b0); each
    model's tail reads its own features U_k h; the output is the mean of the two tails."""
    a, b = _mlp("relu", 0), _mlp("relu", 1)
    x = _data(1, seed=7)[0]
    data = _data()
    _, maps = brickwork.align(a, b, method="zip", data=data)
    assert maps["0"].shape == (16, 32) and maps["2"].shape == (16, 32)
    from brickwork.align.zipit import _correlations

    corr = _correlations([a, b], permutation_spec(a), data)
    merge, unmerge = match(corr["0"], 2, alpha=0.5, beta=0.5)
    m_a, m_b, u_a, u_b = merge[:, :16], merge[:, 16:], unmerge[:16], unmerge[16:]
    with torch.no_grad():
        w0 = m_a @ a[0].weight + m_b @ b[0].weight
        b0 = m_a @ a[0].bias + m_b @ b[0].bias
        h = torch.relu(x @ w0.T + b0)  # (batch, 16 zipped features)
        tails = [m[2:](h @ u.T) for m, u in ((a, u_a), (b, u_b))]  # model k reads U_k h
        expected = (tails[0] + tails[1]) / 2
    zipped = zipit([a, b], data, stop_at=1)
    torch.testing.assert_close(_out(zipped, x), expected, atol=1e-10, rtol=0)


def test_zipit_errors_and_untouched_inputs():
    a, b = _mlp("relu", 0), _mlp("relu", 1)
    a.train()
    before = _snapshot(a)
    zipit([a, b, _mlp("relu", 2)], _data(), stop_at=1)  # more than two models
    assert a.training and _unchanged(a, before)
    with pytest.raises(AlignError, match="at least 2 models"):
        zipit([a], _data())
    with pytest.raises(AlignError, match="stop_at=3 is out of range"):
        zipit([a, b], _data(), stop_at=3)
    with pytest.raises(DataError, match="calibration data"):
        brickwork.align(a, b, method="zip")
    with pytest.raises(DataError, match="at least 2 examples"):
        zipit([a, b], [])
    with pytest.raises(AlignError, match="different permutation groups"):
        zipit([a, _mlp("relu", 0, width=12)], _data())


def test_hungarian_reference_is_scipy():
    # guard for the reference above: scipy's solver minimises by default
    cost = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert list(linear_sum_assignment(cost)[1]) == [0, 1]


# ------------------------------------------------------------- CNN with BatchNorm, residual


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class _ResNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(_Block(c), _Block(c))
        self.fc = nn.Linear(c * 2 * 2, 5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = _ResNet().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("with_data", [False, True], ids=["weight", "activation"])
def test_ot_and_zipit_on_a_residual_cnnpermuted_copy(with_data):
    model = _resnet(0)
    spec = permutation_spec(model)
    assert len(spec.groups) == 3  # the residual stream and each block's inner channels
    permuted, _ = permuted_copy(model, seed=4)
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    moved, _ = brickwork.align(model, permuted, method="ot", data=data if with_data else None)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(moved.state_dict()[key], value, atol=1e-12, rtol=0)
    zipped = zipit([model, permuted], data)
    torch.testing.assert_close(_out(zipped, data[0]), _out(model, data[0]), atol=1e-5, rtol=0)
    fused = ot_fusion([model, _resnet(1)], data=data)
    assert torch.isfinite(_out(fused, data[0])).all()
