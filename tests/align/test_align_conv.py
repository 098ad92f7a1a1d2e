"""Alignment of CNNs and residual networks (issue 11): derived specs for convs, norms, pooling,
flatten and residual adds; weight / activation matching on them; REPAIR and BN-statistics reset.

Properties (STYLE.md §5): permuting a ResNet by its spec keeps its function; aligning it onto a
randomly permuted copy recovers the permutation and the weights; REPAIR gives the merged model
its target statistics and leaves an endpoint (weights (1, 0)) unchanged; inputs untouched.
Reference (§6): REPAIR's fold on one Linear against the paper's formula written out, and
reset_bn_stats against BatchNorm statistics computed by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import permuted_copy
from torch import nn

import brickwork
from brickwork.align import permutation_spec, repair, reset_bn_stats
from brickwork.align.repair import _measure, _producers
from brickwork.errors import AlignError


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class _ResNet(nn.Module):
    """Stem conv-BN-ReLU (4), an identity block (4), a downsampling block (4 -> 8, 1x1 conv
    shortcut), global average pool, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block1 = _Block(4, 4, 1)
        self.block2 = _Block(4, 8, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomise_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial norm parameters and statistics, so they must move
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.1, 0.4)  # positive: no unit is dead after the ReLU
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_norms(_ResNet())


def _images(n_batches: int = 4, seed: int = 1, shape=(1, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, *shape, generator=g) for _ in range(n_batches)]


def _pairs(group) -> set[tuple[str, int]]:
    return {(m.tensor, m.axis) for m in group.members}


def _bn(name: str) -> set[tuple[str, int]]:
    return {(f"{name}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")}


def test_resnet_spec_merges_each_residual_stream_into_one_group():
    spec = permutation_spec(_resnet(0))
    assert [(g.name, g.size) for g in spec.groups] == [
        ("stem", 4),  # stem + block1 (identity shortcut)
        ("block1.conv1", 4),
        ("block2.conv1", 8),
        ("block2.conv2", 8),  # block2's branch + its 1x1 downsample shortcut
    ]
    stream = spec["stem"]
    assert _pairs(stream) == (
        {("stem.weight", 0), ("stem.bias", 0), ("block1.conv2.weight", 0)}
        | _bn("bn")
        | _bn("block1.bn2")
        | {("block1.conv1.weight", 1), ("block2.conv1.weight", 1), ("block2.down.0.weight", 1)}
    )
    assert stream.consumers == ("block1.conv1", "block2.conv1", "block2.down.0")
    assert stream.producers == ("bn", "block1.bn2")  # the BN after each conv
    out = spec["block2.conv2"]
    assert _pairs(out) == (
        {("block2.conv2.weight", 0), ("block2.down.0.weight", 0), ("fc.weight", 1)}
        | _bn("block2.bn2")
        | _bn("block2.down.1")
    )
    assert out.producers == ("block2.bn2", "block2.down.1") and out.consumers == ("fc",)
    assert _pairs(spec["block1.conv1"]) == (
        {("block1.conv1.weight", 0), ("block1.conv2.weight", 1)} | _bn("block1.bn1")
    )
    assert all(m.block == 1 for g in spec.groups for m in g.members)


class _FlattenNet(nn.Module):
    """conv -> GroupNorm(2 groups of 3) -> max pool -> x.view(N, -1) -> Linear: the Linear's
    input unit is a channel's 4x4 pixels; a unit is one norm group of 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise: per channel
        self.conv2 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5 * 16, 7)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        h = self.dw(torch.relu(self.norm(self.conv(x))))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)  # (N, 5, 4, 4)
        return self.head(torch.tanh(self.fc(h.view(h.size(0), -1))))


class _MeanNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(-1))


def test_flatten_block_groupnorm_block_depthwise_and_mean_pool():
    torch.manual_seed(0)
    model = _randomise_norms(_FlattenNet())
    spec = permutation_spec(model)
    assert [(g.name, g.size) for g in spec.groups] == [("conv", 2), ("conv2", 5), ("fc", 7)]
    blocks = {(m.tensor, m.axis): m.block for m in spec["conv"].members}
    assert blocks == {
        ("conv.weight", 0): 3,
        ("conv.bias", 0): 3,
        ("norm.weight", 0): 3,
        ("norm.bias", 0): 3,
        ("dw.weight", 0): 3,
        ("dw.bias", 0): 3,
        ("conv2.weight", 1): 3,
    }
    assert spec["conv"].producers == ("norm",)
    fc_in = [m for m in spec["conv2"].members if m.tensor == "fc.weight"]
    assert fc_in == [fc_in[0]._replace(axis=1, block=16)]
    permuted, _ = permuted_copy(model, seed=4)
    x = torch.randn(5, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=0)
        assert not torch.equal(permuted.fc.weight, model.fc.weight)
    mean_spec = permutation_spec(_MeanNet())
    assert [(g.name, g.size, g.consumers) for g in mean_spec.groups] == [("conv", 6, ("fc",))]


@pytest.mark.parametrize("seed", [3, 4])
def test_permuting_a_resnet_preserves_its_function(seed):
    model = _resnet(0)
    permuted, perms = permuted_copy(model, seed)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=0)
    assert not torch.equal(permuted.block1.conv2.weight, model.block1.conv2.weight)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_aligning_a_resnet_onto_a_permuted_copy_recovers_perms_and_weights(method):
    model = _resnet(0)
    permuted, true = permuted_copy(model, seed=5)
    data = _images()
    before = {k: v.clone() for k, v in permuted.state_dict().items()}
    aligned, perms = brickwork.align(model, permuted, method=method, data=data)
    assert all(torch.equal(before[k], v) for k, v in permuted.state_dict().items())
    for name, p in true.items():
        assert torch.equal(perms[name], torch.argsort(p)), name
    for key, value in model.state_dict().items():
        torch.testing.assert_close(aligned.state_dict()[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_aligned_resnet_computes_b(method):
    model_a, model_b = _resnet(0), _resnet(1)
    aligned, perms = brickwork.align(model_a, model_b, method=method, data=_images())
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    x = _images(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), model_b(x), atol=1e-5, rtol=0)


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.grouped(torch.relu(self.conv(x))).mean((2, 3)))


class _AddInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) + x)


class _PoolLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.pool = nn.MaxPool1d(2)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.pool(self.fc1(x)))


@pytest.mark.parametrize(
    ("model", "names"),
    [
        (_Grouped(), ["grouped", "groups=2", "depthwise"]),
        (_AddInput(), ["add", "'fc1'", "'x'", "not permuted"]),
        (_PoolLinear(), ["pool", "MaxPool1d", "'fc1'"]),
    ],
    ids=["grouped-conv", "add-raw-input", "pool-of-features"],
)
def test_underivable_specs_are_errors_naming_the_node(model, names):
    with pytest.raises(AlignError) as info:
        permutation_spec(model)
    for name in names:
        assert name in str(info.value)


# ---------------------------------------------------------------------------------- REPAIR


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()


def _mix(a: nn.Module, b: nn.Module, t: float) -> nn.Module:
    out = copy.deepcopy(a)
    sa, sb = a.state_dict(), b.state_dict()
    out.load_state_dict(
        {k: (1 - t) * v + t * sb[k] if v.is_floating_point() else v for k, v in sa.items()}
    )
    return out


def _mlp_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(64, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_repair_gives_every_producer_its_target_statistics(kind):
    make, data = (_mlp, _mlp_data()) if kind == "mlp" else (_resnet, _images())
    a = make(0)
    b, _ = brickwork.align(a, make(1), data=data)
    merged = _mix(a, b, 0.3)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    repaired = repair(merged, [a, b], data, weights=(0.7, 0.3))
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items())
    assert set(repaired.state_dict()) == set(merged.state_dict())  # same architecture
    names = _producers(merged)
    assert len(names) == (2 if kind == "mlp" else 6)
    stats = [_measure(m, names, data) for m in (a, b, merged, repaired)]
    moved = 0.0
    for name in names:
        (ma, sa), (mb, sb), (m0, s0), (mr, sr) = (s[name].mean_std() for s in stats)
        torch.testing.assert_close(mr, 0.7 * ma + 0.3 * mb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sr, 0.7 * sa + 0.3 * sb, atol=1e-4, rtol=1e-4)
        moved = max(moved, float((s0 - sr).abs().max()))
    assert moved > 1e-2  # the merged model's statistics were off to begin with


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_repair_of_an_endpoint_with_weights_1_0_is_that_endpoint(kind):
    make, data = (_mlp, _mlp_data()) if kind == "mlp" else (_resnet, _images())
    a, b = make(0), make(1)
    repaired = repair(a, [a, b], data, weights=[1.0, 0.0])
    x = data[0]
    with torch.no_grad():
        torch.testing.assert_close(repaired(x), a(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(repair(a, [a, b], data)(x), a(x), atol=1e-3)


def test_repair_fold_is_the_papers_formula_on_one_linear():
    """Jordan et al. §4: the merged unit's output z is replaced by
    (z - μ_merged) / σ_merged · σ_target + μ_target, folded into W and b."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(3)]
    a, b, merged = (m.eval() for m in layers)
    x = torch.randn(50, 3)
    with torch.no_grad():
        za, zb, zm = a[0](x), b[0](x), merged[0](x)
        mu_t = (za.mean(0) + zb.mean(0)) / 2
        sd_t = (za.std(0, unbiased=False) + zb.std(0, unbiased=False)) / 2
        s = sd_t / zm.std(0, unbiased=False)
        weight = merged[0].weight * s[:, None]
        bias = (merged[0].bias - zm.mean(0)) * s + mu_t
    out = repair(merged, [a, b], [x[:20], x[20:]])
    torch.testing.assert_close(out[0].weight, weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0].bias, bias, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[2].weight, merged[2].weight)  # the output layer is not touched


def test_repair_errors_name_the_problem():
    a = _mlp(0)
    with pytest.raises(AlignError, match="2 weights for 1 endpoints"):
        repair(a, [a], _mlp_data(), weights=(0.5, 0.5))
    with pytest.raises(AlignError, match="non-negative"):
        repair(a, [a, a], _mlp_data(), weights=(1.5, -0.5))
    nobias = nn.Sequential(nn.Linear(8, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(AlignError, match=r"'0' \(Linear, bias=False\)"):
        repair(nobias, [nobias], _mlp_data())


def test_reset_bn_stats_equals_statistics_computed_by_hand():
    model = _resnet(0)
    model.train()
    data = _images(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = reset_bn_stats(model, data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out.training and out.bn.momentum == model.bn.momentum
    # the stem BN sees the stem conv's output: mean of the batch means and of the batch
    # (unbiased) variances, per channel
    with torch.no_grad():
        z = [model.stem(x) for x in data]  # (N, 4, 8, 8) each
    mean = torch.stack([t.mean((0, 2, 3)) for t in z]).mean(0)
    var = torch.stack([t.transpose(0, 1).reshape(4, -1).var(1) for t in z]).mean(0)
    torch.testing.assert_close(out.bn.running_mean, mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.bn.running_var, var, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.bn.running_var, model.bn.running_var)
    # a deeper BN: its input is the batch normalised (train mode) by the norms before it
    probe = copy.deepcopy(out).train()
    seen = []
    probe.block2.bn1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for x in data:
            probe(x)
    deep = torch.stack([t.mean((0, 2, 3)) for t in seen]).mean(0)
    torch.testing.assert_close(out.block2.bn1.running_mean, deep, atol=1e-5, rtol=1e-5)
