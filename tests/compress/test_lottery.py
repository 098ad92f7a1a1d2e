"""Lottery tickets (brickwork.compress.lottery): IMP with rewinding on a tiny MLP, random data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brickwork.compress.lottery import (
    Masks,
    find_ticket,
    magnitude_masks,
    mask_optimizer,
    prunable_parameters,
    random_masks,
    reinitialized,
)
from brickwork.errors import IncompatibleModelsError, RecipeError, UnknownNameError

HIDDEN = ("0.weight", "2.weight")
OUT = "4.weight"


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(),
                         nn.Linear(16, 5))  # fmt: skip


def data(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def fit(model: nn.Module, masks: Masks | None, opt: torch.optim.Optimizer, steps: int, cb=None):
    x, y = data()
    if masks is not None:
        mask_optimizer(opt, masks, model)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (16,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cb is not None:
            cb(step)


def train_fn(steps: int = 20):
    def train(model, masks, callback):
        fit(model, masks, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps,
            callback)  # fmt: skip
        return sum(int((p == 0).sum()) for p in model.parameters())

    return train


def test_prunable_parameters_are_linear_weights_only():
    assert prunable_parameters(mlp()) == [*HIDDEN, OUT]
    assert prunable_parameters(mlp(), ["2.weight", "2.bias"]) == ["2.weight", "2.bias"]
    with pytest.raises(UnknownNameError, match="2.wieght.*Did you mean '2.weight'"):
        prunable_parameters(mlp(), ["2.wieght"])


def test_layer_scope_prunes_rate_of_remaining_and_output_at_half_rate():
    model = mlp()
    masks = Masks.dense(model)
    n = {k: v.numel() for k, v in masks.items()}
    expect = dict(n)
    for _ in range(5):
        masks = magnitude_masks(model, 0.2, current=masks)
        for k in masks:
            r = 0.1 if k == OUT else 0.2
            expect[k] -= round(r * expect[k])  # exactly round(rate * remaining) per round
            assert masks.kept()[k] == expect[k]
    for k in HIDDEN:  # 1 - 0.8^k up to per-round rounding
        assert abs(masks.density(k) - 0.8**5) < 5 / n[k]
    assert abs(masks.density(OUT) - 0.9**5) < 5 / n[OUT]


def test_masks_keep_the_largest_magnitudes_and_are_nested():
    model = mlp()
    m1 = magnitude_masks(model, 0.2)
    with torch.no_grad():  # weights change: round 2 prunes by the new magnitudes, within m1
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    m2 = magnitude_masks(model, 0.5, current=m1)
    w = dict(model.named_parameters())
    for k in m2:
        assert not (m2[k] & ~m1[k]).any()  # pruned weights stay pruned
        kept, dropped = w[k].abs()[m2[k]], w[k].abs()[m1[k] & ~m2[k]]
        assert kept.min() >= dropped.max()


def test_global_scope_pools_hidden_layers_with_one_threshold():
    model = mlp()
    masks = magnitude_masks(model, 0.3, scope="global")
    w = dict(model.named_parameters())
    total = sum(w[k].numel() for k in HIDDEN)
    assert sum(masks.kept()[k] for k in HIDDEN) == total - round(0.3 * total)
    kept = torch.cat([w[k].abs()[masks[k]] for k in HIDDEN])
    dropped = torch.cat([w[k].abs()[~masks[k]] for k in HIDDEN])
    assert kept.min() >= dropped.max()
    # global sparsities differ per layer (a per-layer rule would give 0.3 each)
    assert len({round(masks.sparsity(k), 3) for k in HIDDEN}) == 2
    assert masks.kept()[OUT] == w[OUT].numel() - round(0.15 * w[OUT].numel())


def test_output_rate_and_output_name():
    model = mlp()
    masks = magnitude_masks(model, 0.5, output_rate=0.0)
    assert masks.density(OUT) == 1.0 and masks.density("0.weight") == 0.5
    masks = magnitude_masks(model, 0.5, output="0.weight")
    assert masks.density("0.weight") == 0.75 and masks.density(OUT) == pytest.approx(0.5)


def test_inputs_not_modified():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    current = magnitude_masks(model, 0.2)
    cur_before = {k: v.clone() for k, v in current.items()}
    magnitude_masks(model, 0.2, current=current)
    find_ticket(model, train_fn(), rounds=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(cur_before[k], v) for k, v in current.items())


def test_bad_input_errors():
    model = mlp()
    with pytest.raises(RecipeError, match=r"rate must be in \[0, 1\).*got 1.0"):
        magnitude_masks(model, 1.0)
    with pytest.raises(UnknownNameError, match="Known: global, layer"):
        magnitude_masks(model, 0.2, scope="globl")
    other = nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 16), nn.ReLU(),
                          nn.Linear(16, 5))  # fmt: skip
    with pytest.raises(IncompatibleModelsError, match="'0.weight' has shape"):
        Masks.dense(model).apply_(other)
    with pytest.raises(IncompatibleModelsError, match="not among the optimiser"):
        mask_optimizer(torch.optim.SGD(other.parameters(), lr=0.1), Masks.dense(model), model)
    with pytest.raises(RecipeError, match="never reported that step"):
        find_ticket(model, train_fn(5), rounds=1, rewind_step=50)


def _trained_then_pruned(opt_cls, **kw):
    """Train densely (the optimiser accumulates momentum), then prune 50 %."""
    model = mlp()
    opt = opt_cls(model.parameters(), **kw)
    fit(model, None, opt, 10)
    masks = magnitude_masks(model, 0.5)
    return model, opt, masks


@pytest.mark.parametrize(
    "opt_cls,kw",
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
     (torch.optim.Adam, {"lr": 1e-2}), (torch.optim.AdamW, {"lr": 1e-2})],
)  # fmt: skip
def test_momentum_does_not_revive_pruned_weights(opt_cls, kw):
    model, opt, masks = _trained_then_pruned(opt_cls, **kw)
    masks.apply_(model)
    fit(model, masks, opt, 15)  # same optimiser, its state from dense training kept
    w = dict(model.named_parameters())
    for k, m in masks.items():
        assert torch.count_nonzero(w[k][~m]) == 0
        assert torch.count_nonzero(w[k][m]) == int(m.sum())  # kept weights still train
        for v in opt.state[w[k]].values():
            if v.shape == m.shape:
                assert torch.count_nonzero(v[~m]) == 0  # no stale momentum / moments


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                        (torch.optim.Adam, {"lr": 1e-2})])  # fmt: skip
def test_without_mask_optimizer_momentum_revives_them(opt_cls, kw):
    """The failure the hook prevents: masking once, or masking only the gradients, leaves the
    optimiser's momentum to move the pruned weights again."""
    model, opt, masks = _trained_then_pruned(opt_cls, **kw)
    masks.apply_(model)
    w = dict(model.named_parameters())
    for k, m in masks.items():  # gradients masked, optimiser state not
        w[k].register_hook(lambda g, m=m: g * m)
    x, y = data()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    revived = sum(int(torch.count_nonzero(w[k][~m])) for k, m in masks.items())
    assert revived > 0.9 * sum(int((~m).sum()) for m in masks.values())


def test_rewinding_restores_step_k_weights_on_kept_entries():
    seen = {}

    def train(model, masks, callback):
        x, y = data()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        mask_optimizer(opt, masks, model)
        if masks.density() < 1:  # rounds >= 1 start from the rewound weights
            seen.setdefault("start", []).append({k: v.clone() for k, v in
                                                 model.state_dict().items()})  # fmt: skip
        for step in range(1, 21):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            callback(step)
            if masks.density() == 1 and step == 7:
                seen["k"] = {k: v.clone() for k, v in model.state_dict().items()}

    ticket = find_ticket(mlp(), train, rounds=2, rewind_step=7, seed=0)
    assert ticket.rewind_step == 7 and len(ticket.masks) == 3 and len(seen["start"]) == 2
    for r, start in enumerate(seen["start"], 1):
        for k, v in start.items():
            m = ticket.masks[r].get(k)
            if m is None:  # biases: rewound exactly
                assert torch.equal(v, seen["k"][k])
            else:
                assert torch.equal(v[m], seen["k"][k][m]) and not v[~m].any()
    assert all(torch.equal(ticket.rewind[k], v) for k, v in seen["k"].items())
    assert not torch.equal(ticket.rewind["0.weight"], ticket.init["0.weight"])
    built = ticket.model(2)
    m = ticket.masks[2]["0.weight"]
    assert torch.equal(built[0].weight[m], seen["k"]["0.weight"][m])


def test_imp_sparsity_sequence_is_one_minus_0_8_to_the_k():
    ticket = find_ticket(mlp(), train_fn(), rounds=6, rate=0.2, seed=0)
    n = {k: v.numel() for k, v in ticket.masks[0].items()}
    for r, masks in enumerate(ticket.masks):
        for k in HIDDEN:
            assert abs(masks.sparsity(k) - (1 - 0.8**r)) <= r / n[k]
        assert abs(masks.sparsity(OUT) - (1 - 0.9**r)) <= r / n[OUT]
    # the masked weights really are zero after each round's training
    assert ticket.results[-1] >= sum(int((~m).sum()) for m in ticket.masks[-1].values())


def test_find_ticket_deterministic_with_seed_and_factory():
    a = find_ticket(lambda: mlp(3), train_fn(), rounds=2, seed=1)
    b = find_ticket(lambda: mlp(3), train_fn(), rounds=2, seed=1)
    c = find_ticket(lambda: mlp(3), train_fn(), rounds=2, seed=2)
    assert all(torch.equal(a.masks[-1][k], b.masks[-1][k]) for k in a.masks[-1])
    assert any(not torch.equal(a.masks[-1][k], c.masks[-1][k]) for k in a.masks[-1])


def test_random_pruning_control_keeps_per_layer_counts():
    masks = magnitude_masks(mlp(), 0.6)
    rnd = random_masks(masks, seed=0)
    assert rnd.kept() == masks.kept()
    assert any(not torch.equal(rnd[k], masks[k]) for k in masks)
    assert all(torch.equal(rnd[k], random_masks(masks, seed=0)[k]) for k in masks)


def test_reinitialized_is_a_fresh_copy():
    model = mlp()
    before = model[0].weight.clone()
    state = torch.random.get_rng_state()
    new = reinitialized(model, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(model[0].weight, before)
    assert not torch.equal(new[0].weight, before)
    assert torch.equal(new[0].weight, reinitialized(model, seed=5)[0].weight)


def test_zero_rate_prunes_nothing_and_conv_weights_are_pruned():
    model = mlp()
    assert magnitude_masks(model, 0.0, output_rate=0.0).density() == 1.0
    x = torch.randn(3, 12)
    assert torch.equal(magnitude_masks(model, 0.0).apply_(mlp())(x), model(x))
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    masks = magnitude_masks(conv, 0.5)
    assert list(masks) == ["0.weight", "3.weight"] and masks.density("0.weight") == 0.5
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    mask_optimizer(opt, masks, conv)
    for _ in range(3):
        opt.zero_grad()
        conv(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
    assert torch.count_nonzero(conv[0].weight[~masks["0.weight"]]) == 0
