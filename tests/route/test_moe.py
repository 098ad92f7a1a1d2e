"""MoELayer: identical experts == dense FFN, top-k semantics, sparse == dense reference."""

from __future__ import annotations

import pytest
import torch
from _helpers import copies_of

from brickwork.errors import BrickworkError
from brickwork.route import FFN, MoELayer, load_balancing_loss

ACTS = ["swiglu", "gelu"]
NORMALISED = [("topk_softmax", True), ("softmax_topk", True)]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize(("routing", "renormalize"), NORMALISED)
@pytest.mark.parametrize("top_k", [1, 3])
def test_identical_experts_equal_dense_ffn_for_any_router(activation, routing, renormalize, top_k):
    torch.manual_seed(top_k)
    ffn = FFN(16, 24, activation=activation)
    moe = MoELayer(
        16, 24, 4, top_k=top_k, activation=activation, routing=routing, renormalize=renormalize
    )
    copies_of(ffn, moe)
    x = torch.randn(3, 7, 16)
    for seed in range(3):  # several random routers
        torch.manual_seed(100 + seed)
        torch.nn.init.normal_(moe.router.weight, std=3.0)
        torch.testing.assert_close(moe(x).output, ffn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize(("routing", "renormalize"), [*NORMALISED, ("softmax_topk", False)])
@pytest.mark.parametrize("shared", [None, 8])
def test_sparse_dispatch_equals_dense_reference(activation, routing, renormalize, shared):
    torch.manual_seed(0)
    moe = MoELayer(
        16, 12, 6, top_k=2, activation=activation, routing=routing,
        renormalize=renormalize, shared_d_ff=shared,
    )  # fmt: skip
    with torch.no_grad():
        if moe.b_in is not None:
            moe.b_in.normal_()
            moe.b_out.normal_()
    x = torch.randn(2, 33, 16)
    sparse, dense = moe(x), moe.forward_dense_reference(x)
    assert sparse.output.shape == x.shape
    torch.testing.assert_close(sparse.output, dense.output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.router_logits, dense.router_logits)
    with torch.inference_mode():  # the no-grad path writes experts into one buffer
        fast = moe(x).output
    torch.testing.assert_close(fast, dense.output.detach(), atol=1e-5, rtol=1e-5)


def test_an_expert_no_token_chooses_is_skipped():
    moe = MoELayer(8, 8, 4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 1.0  # expert 2 for x[0] > 0, else the others tie
    x = torch.randn(5, 8).abs()
    torch.testing.assert_close(moe(x).output, moe.forward_dense_reference(x).output)


def test_top1_picks_argmax_with_weight_one():
    torch.manual_seed(1)
    moe = MoELayer(8, 8, 5, top_k=1)
    x = torch.randn(20, 8)
    r = moe.route(x)
    assert torch.equal(r.indices[:, 0], r.logits.argmax(dim=-1))
    torch.testing.assert_close(r.weights, torch.ones(20, 1))


def test_topk_weights_follow_the_routing_convention():
    torch.manual_seed(2)
    x = torch.randn(10, 8)
    a = MoELayer(8, 8, 5, top_k=2, routing="topk_softmax")
    b = MoELayer(8, 8, 5, top_k=2, routing="softmax_topk", renormalize=True)
    c = MoELayer(8, 8, 5, top_k=2, routing="softmax_topk", renormalize=False)
    for m in (b, c):
        m.load_state_dict(a.state_dict())
    ra, rb, rc = a.route(x), b.route(x), c.route(x)
    top, idx = ra.logits.topk(2, dim=-1)
    assert torch.equal(ra.indices, idx)
    torch.testing.assert_close(ra.weights, top.softmax(-1))  # Mixtral: softmax of top-k logits
    torch.testing.assert_close(ra.weights.sum(-1), torch.ones(10))
    torch.testing.assert_close(rb.weights, ra.weights)  # renormalised == softmax over top-k
    probs = ra.logits.softmax(-1)
    torch.testing.assert_close(rc.weights, probs.gather(1, idx))  # not renormalised
    assert bool((rc.weights.sum(-1) < 1).all())
    assert bool((ra.weights[:, 0] >= ra.weights[:, 1]).all())


def test_gradient_flows_to_router_and_experts():
    torch.manual_seed(3)
    moe = MoELayer(8, 8, 4, top_k=2)
    out = moe(torch.randn(16, 8))
    (out.output.square().sum() + load_balancing_loss(out.router_logits, 2)).backward()
    for p in (moe.router.weight, moe.gate_up, moe.down):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_load_balancing_loss_is_coef_for_uniform_and_larger_when_collapsed():
    uniform = torch.zeros(12, 4)
    torch.testing.assert_close(load_balancing_loss(uniform, 2, coef=0.5), torch.tensor(0.5))
    balanced = torch.eye(4).repeat(3, 1) * 1e-3  # each expert the top choice equally often
    assert abs(load_balancing_loss(balanced, 1).item() - 1.0) < 1e-6
    collapsed = torch.zeros(12, 4)
    collapsed[:, 0] = 20.0
    assert load_balancing_loss(collapsed, 1).item() == pytest.approx(4.0, rel=1e-4)
    layers = [uniform, uniform]  # per-layer list, as transformers returns
    torch.testing.assert_close(load_balancing_loss(layers, 2), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 5}, "top_k must be in"),
        ({"activation": "mish"}, "activation must be"),
        ({"routing": "sinkhorn"}, "routing must be"),
    ],
)
def test_bad_options_raise_brickwork_errors(kwargs, match):
    with pytest.raises(BrickworkError, match=match):
        MoELayer(8, 8, 4, **kwargs)
