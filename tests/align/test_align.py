"""Alignment (issue 11, first step): derived specs for MLPs, weight and activation matching.

Properties (STYLE.md §5): the aligned model computes B's function; aligning a model onto a
randomly permuted copy of itself recovers the permutation and the original weights; inputs
are never modified. Reference (§6): weight matching's similarity matrix against the paper's
formula written out for a 2-layer MLP.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import permuted_copy
from torch import nn

import brickwork
from brickwork.align import apply_permutations, permutation_spec
from brickwork.align.api import _METHODS
from brickwork.align.calibration import Moments
from brickwork.align.weight_matching import _similarity, weight_matching
from brickwork.errors import AlignError, DataError, UnknownNameError


def _mlp(kind: str, seed: int, width: int = 24) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "relu":
        layers = [nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
    elif kind == "batchnorm":
        layers = [nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU()]
        layers += [nn.Linear(width, width), nn.ReLU(), nn.BatchNorm1d(width)]
    elif kind == "layernorm":
        layers = [nn.Linear(8, width), nn.GELU(), nn.LayerNorm(width), nn.Dropout(0.1)]
        layers += [nn.Linear(width, width), nn.Tanh(), nn.LayerNorm(width)]
    else:
        raise ValueError(kind)
    model = nn.Sequential(*layers, nn.Linear(width, 5))
    with torch.no_grad():  # non-trivial norm parameters and statistics, so they must move
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)  # small: no unit is dead on the data
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _pairs(group) -> tuple[tuple[str, int], ...]:
    return tuple((m.tensor, m.axis) for m in group.members)


def _data(n_batches: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 8, generator=g) for _ in range(n_batches)]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


KINDS = ["relu", "batchnorm", "layernorm"]
METHODS = list(_METHODS)  # every method gets every property test


def test_spec_of_784_512_512_10_mlp_has_two_groups_with_right_members():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    spec = permutation_spec(model)
    assert [(g.name, g.size) for g in spec.groups] == [("1", 512), ("3", 512)]
    assert _pairs(spec["1"]) == (("1.weight", 0), ("1.bias", 0), ("3.weight", 1))
    assert _pairs(spec["3"]) == (("3.weight", 0), ("3.bias", 0), ("5.weight", 1))
    assert spec["1"].consumers == ("3",) and spec["3"].consumers == ("5",)


def test_spec_places_norm_parameters_and_buffers_in_the_group():
    spec = permutation_spec(_mlp("batchnorm", 0))
    assert _pairs(spec["0"]) == (
        ("0.weight", 0),
        ("0.bias", 0),
        ("1.weight", 0),
        ("1.bias", 0),
        ("1.running_mean", 0),
        ("1.running_var", 0),
        ("3.weight", 1),
    )
    assert ("5.running_var", 0) in _pairs(spec["3"]) and ("6.weight", 1) in _pairs(spec["3"])
    ln = permutation_spec(_mlp("layernorm", 0))
    assert ("2.weight", 0) in _pairs(ln["0"]) and ("2.bias", 0) in _pairs(ln["0"])


class _Residual(nn.Module):
    """A residual add of the stream with a constant: the constant's entries are not permuted
    (a residual add of two hidden-unit tensors is supported, see test_align_conv.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.register_buffer("offset", torch.randn(16))

    def forward(self, x):
        return self.inner(x) + self.offset


class _Reshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc2(self.fc1(x).view(-1, 4, 4))


@pytest.mark.parametrize(
    ("model", "names"),
    [
        (
            nn.Sequential(nn.Linear(8, 16), _Residual(), nn.Linear(16, 2)),
            ["add", "'1'", "_Residual"],
        ),
        (_Reshape(), ["view", "fc1"]),
        (nn.Sequential(nn.Linear(8, 16), nn.Softmax(-1), nn.Linear(16, 2)), ["Softmax", "'0'"]),
    ],
    ids=["residual-add", "reshape", "softmax"],
)
def test_unsupported_operation_is_an_error_naming_it(model, names):
    with pytest.raises(AlignError) as info:
        permutation_spec(model)
    for name in names:
        assert name in str(info.value)


def test_layernorm_over_other_units_is_an_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm((2, 16)), nn.Linear(16, 2))
    with pytest.raises(AlignError, match="normalises"):
        permutation_spec(model)


@pytest.mark.parametrize("kind", KINDS)
def test_permuting_units_preserves_the_function(kind):
    model = _mlp(kind, 0)
    permuted, _ = permuted_copy(model, seed=3)
    x = _data(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=0)
        assert not torch.equal(permuted[0].weight, model[0].weight)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_aligned_model_computes_b_and_inputs_are_untouched(kind, method):
    model_a, model_b = _mlp(kind, 0), _mlp(kind, 1)
    model_b.train()  # activation matching must not update B's BatchNorm statistics
    before_a, before_b = _snapshot(model_a), _snapshot(model_b)
    aligned, perms = brickwork.align(model_a, model_b, method=method, data=_data())
    for before, model in ((before_a, model_a), (before_b, model_b)):
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert model_b.training and not model_a.training
    assert set(perms) == {g.name for g in permutation_spec(model_b).groups}
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    model_b.eval()
    aligned.eval()
    x = _data(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), model_b(x), atol=1e-5, rtol=0)
    assert aligned is not model_b
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(aligned.state_dict().values(), model_b.state_dict().values())
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_aligning_onto_a_permuted_copy_recovers_permutation_and_weights(kind, method):
    model = _mlp(kind, 0)
    # units constant on the data cannot be told apart by their activations (any order of them
    # computes the same function), so the fixture must have none
    x = torch.cat(_data())
    with torch.no_grad():
        for group in permutation_spec(model).groups:
            consumer = int(group.consumers[0])
            assert (model[:consumer](x).std(0) > 1e-3).all()
    permuted, true = permuted_copy(model, seed=5)
    aligned, perms = brickwork.align(model, permuted, method=method, data=_data())
    for name, p in true.items():
        # permuted unit i = original unit p[i]; undoing it reads unit argsort(p)[i]
        assert torch.equal(perms[name], torch.argsort(p))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(aligned.state_dict()[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_permutations(method):
    model_a, model_b = _mlp("relu", 0, width=32), _mlp("relu", 1, width=32)
    kw = dict(method=method, data=_data())
    _, first = brickwork.align(model_a, model_b, seed=11, **kw)
    _, second = brickwork.align(model_a, model_b, seed=11, **kw)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_weight_matching_objective_never_decreases():
    model_a, model_b = _mlp("batchnorm", 0, width=32), _mlp("batchnorm", 1, width=32)
    spec = permutation_spec(model_a)
    result = weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=0)
    assert result.iterations >= 2
    assert len(result.objective) == result.iterations + 1
    steps = torch.tensor(result.objective).diff()
    assert (steps >= -1e-9).all() and result.objective[-1] > result.objective[0]


def test_weight_matching_similarity_is_the_papers_formula():
    """Σ for the first hidden layer of a 2-layer MLP, written out (Ainsworth et al. eq. 2):
    Σ = W1_a W1_bᵀ + b1_a b1_bᵀ + W2_aᵀ W2_b (the output units are not permuted)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = permutation_spec(a)
    sim = _similarity(spec, "0", a.state_dict(), b.state_dict(), {"0": torch.arange(4)})
    w1a, b1a, w2a = (t.double().detach() for t in (a[0].weight, a[0].bias, a[2].weight))
    w1b, b1b, w2b = (t.double().detach() for t in (b[0].weight, b[0].bias, b[2].weight))
    expected = w1a @ w1b.T + torch.outer(b1a, b1b) + w2a.T @ w2b
    torch.testing.assert_close(sim, expected)


def test_activation_matching_needs_data_and_known_method():
    model = _mlp("relu", 0)
    with pytest.raises(DataError, match="calibration data"):
        brickwork.align(model, model, method="activation")
    with pytest.raises(UnknownNameError, match="Did you mean 'weight'"):
        brickwork.align(model, model, method="weights")


def test_models_with_different_groups_are_an_error():
    with pytest.raises(AlignError, match="different permutation groups"):
        brickwork.align(_mlp("relu", 0, width=24), _mlp("relu", 0, width=16))


def test_align_package_and_function_are_both_callable():
    import brickwork.align.spec  # binds brickwork.align to the package

    model = _mlp("relu", 0)
    aligned, perms = brickwork.align(model, model)
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms.values())


class _FunctionalMLP(nn.Module):
    """Named layers, functional activations, a bias-free Linear and keyword inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 20, bias=False)
        self.norm = nn.LayerNorm(20)
        self.fc2 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x, scale: float = 1.0):
        h = torch.nn.functional.relu(self.norm(self.fc1(x * scale)))
        return self.head(torch.tanh(self.fc2(h)))


@pytest.mark.parametrize("method", METHODS)
def test_functional_module_with_dict_batches(method):
    torch.manual_seed(0)
    model = _FunctionalMLP()
    spec = permutation_spec(model)
    assert _pairs(spec["fc1"]) == (
        ("fc1.weight", 0),
        ("norm.weight", 0),
        ("norm.bias", 0),
        ("fc2.weight", 1),
    )
    assert [g.name for g in spec.groups] == ["fc1", "fc2"]
    permuted, true = permuted_copy(model, seed=2)
    data = [{"x": x, "scale": 2.0} for x in _data()]
    aligned, perms = brickwork.align(model, permuted, method=method, data=data)
    assert all(torch.equal(perms[k], torch.argsort(p)) for k, p in true.items())
    x = _data(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), model(x), atol=1e-5, rtol=0)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_module_called_twice_is_an_error():
    with pytest.raises(AlignError, match="'fc' a second time"):
        permutation_spec(_Shared())


def test_activation_correlation_is_pearsons_over_batches():
    """The streamed correlation (two batches) equals Pearson's r of the stacked activations."""
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(50, 6, generator=g), torch.randn(50, 6, generator=g)
    z_b[:, 2] += 3 * z_a[:, 4]
    moments = Moments()
    moments.add(z_a[:20], z_b[:20])
    moments.add(z_a[20:], z_b[20:])
    expected = torch.corrcoef(torch.cat([z_a, z_b], 1).T.double())[:6, 6:]
    torch.testing.assert_close(moments.correlation(), expected, atol=1e-9, rtol=1e-9)


def test_block_and_offset_members_move_whole_units_of_one_slice():
    """A unit of ``block`` indices starting at ``offset`` moves as one; the rest stays."""
    from brickwork.align.spec import Member, PermutationGroup, PermutationSpec

    group = PermutationGroup("heads", 3, (Member("w", 0, block=2, offset=1),), ())
    spec = PermutationSpec((group,))
    w = torch.arange(8.0).view(8, 1)  # rows: 0 | (1 2) (3 4) (5 6) | 7
    out = apply_permutations({"w": w}, spec, {"heads": torch.tensor([2, 0, 1])})["w"]
    assert out.flatten().tolist() == [0, 5, 6, 1, 2, 3, 4, 7]
    sim = _similarity(spec, "heads", {"w": w}, {"w": w}, {"heads": torch.arange(3)})
    blocks = w[1:7].double().view(3, 2)
    torch.testing.assert_close(sim, blocks @ blocks.T)
