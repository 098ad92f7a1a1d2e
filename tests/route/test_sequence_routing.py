"""MoELayer(route_by="sequence"): task-level routing (Kudugunta et al. 2021, "Beyond
Distillation: Task-level Mixture-of-Experts for Efficient Inference")."""

from __future__ import annotations

import pytest
import torch
from _helpers import copies_of
from torch import nn

from brickwork.errors import BrickworkError
from brickwork.route import FFN, MoEBlock, MoELayer, load, save_moe
from brickwork.route.moe import sequence_mask


def _layer(seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    moe = MoELayer(16, 12, 5, **{"top_k": 2, "activation": "gelu", "route_by": "sequence", **kw})
    with torch.no_grad():
        nn.init.normal_(moe.router.weight, std=3.0)
        moe.b_in.normal_()
        moe.b_out.normal_()
    return moe


def _mask() -> torch.Tensor:
    mask = torch.ones(3, 7, dtype=torch.long)  # (batch, tokens)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return mask


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_identical_experts_equal_dense_ffn_for_any_router(activation, top_k, masked):
    torch.manual_seed(top_k)
    ffn = FFN(16, 24, activation=activation)
    moe = MoELayer(16, 24, 4, top_k=top_k, activation=activation, route_by="sequence")
    copies_of(ffn, moe)
    x = torch.randn(3, 7, 16)
    for seed in range(3):  # several random routers
        torch.manual_seed(100 + seed)
        nn.init.normal_(moe.router.weight, std=3.0)
        out = moe(x, mask=_mask() if masked else None).output
        torch.testing.assert_close(out, ffn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
def test_every_token_of_a_sequence_gets_the_same_experts_and_weights(routing):
    moe = _layer(routing=routing)
    x = torch.randn(3, 7, 16)  # (batch, tokens, d_model)
    r = moe.route(x)
    idx = r.indices.reshape(3, 7, 2)  # (batch, tokens, top_k)
    w = r.weights.reshape(3, 7, 2)
    assert torch.equal(idx, idx[:, :1].expand_as(idx))
    assert torch.equal(w, w[:, :1].expand_as(w))
    assert len({tuple(i) for i in idx[:, 0].tolist()}) > 1  # sequences differ (seeded)
    # the choice is the top-k of the mean of the tokens' own router logits
    mean = moe.router(x).mean(dim=1)  # (batch, n_experts)
    assert torch.equal(idx[:, 0], mean.topk(2, dim=-1).indices)
    torch.testing.assert_close(r.logits.reshape(3, 7, 5), mean[:, None].expand(3, 7, 5))
    if routing == "topk_softmax":
        torch.testing.assert_close(w[:, 0], mean.topk(2, dim=-1).values.softmax(-1))
    out = moe(x).output
    torch.testing.assert_close(out, moe.forward_dense_reference(x).output, atol=1e-5, rtol=1e-5)
    # each sequence alone: the same output as in the batch (routing never mixes sequences)
    for b in range(3):
        torch.testing.assert_close(moe(x[b : b + 1]).output, out[b : b + 1], atol=1e-5, rtol=1e-5)


def test_padding_is_left_out_by_the_mask():
    moe = _layer(1)
    x, mask = torch.randn(3, 7, 16), _mask()
    out = moe(x, mask=mask).output
    for b, n in enumerate(mask.sum(1).tolist()):  # the unpadded sequence alone
        alone = moe(x[b : b + 1, :n]).output
        torch.testing.assert_close(out[b : b + 1, :n], alone, atol=1e-5, rtol=1e-5)
    garbage = x.clone()
    garbage[mask == 0] = 1e3  # what sits in padded positions does not change the routing
    r1, r2 = moe.route(x, mask=mask), moe.route(garbage, mask=mask)
    assert torch.equal(r1.indices, r2.indices)
    torch.testing.assert_close(r1.weights, r2.weights)
    with pytest.raises(BrickworkError, match="sequence mask"):
        moe(x, mask=mask[:, :5])


def test_the_context_manager_sets_the_mask_of_blocks_inside_a_model():
    moe = _layer(2)
    model = nn.Sequential(nn.Identity(), MoEBlock(moe))  # the block sees hidden states only
    x, mask = torch.randn(3, 7, 16), _mask()
    with sequence_mask(model, mask):
        assert moe.sequence_mask is mask
        inside = model(x)
    assert moe.sequence_mask is None
    torch.testing.assert_close(inside, moe(x, mask=mask).output)


def test_sequence_mode_equals_token_mode_for_one_token_sequences():
    seq = _layer(3)
    tok = MoELayer(**{**seq.config(), "route_by": "token"})
    tok.load_state_dict(seq.state_dict())
    for x in (torch.randn(9, 16), torch.randn(9, 1, 16)):  # 2-D: one example per row
        a, b = seq(x), tok(x)
        torch.testing.assert_close(a.output, b.output)
        torch.testing.assert_close(a.router_logits, b.router_logits)
    x = torch.randn(3, 7, 16)
    assert not torch.allclose(seq(x).output, tok(x).output)  # longer sequences: they differ


def test_router_gets_gradient_from_every_token():
    moe = _layer(4, top_k=2)
    x = torch.randn(3, 7, 16, requires_grad=True)
    moe(x).output.square().sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert bool((x.grad.abs().sum(-1) > 0).all())


def test_format_round_trip_keeps_sequence_routing(tmp_path):
    moe = _layer(5)
    model = nn.Sequential(nn.Linear(16, 16), MoEBlock(moe))
    assert moe.config()["route_by"] == "sequence" and "route_by=sequence" in repr(moe)
    save_moe(model, tmp_path / "m")
    back = load(tmp_path / "m", base=nn.Sequential(nn.Linear(16, 16), nn.Identity()))
    layer = back[1].moe
    assert layer.route_by == "sequence"
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))


def test_bad_route_by_raises():
    with pytest.raises(BrickworkError, match="route_by must be"):
        MoELayer(8, 8, 4, route_by="example")
