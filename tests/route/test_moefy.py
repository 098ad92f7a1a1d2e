"""MoEfication: all experts active == the dense model; balanced splits; trained routers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brickwork.errors import BrickworkError, CheckpointError, RecipeError
from brickwork.route.cluster import balanced_assign, balanced_kmeans
from brickwork.route.moe import MoEBlock, MoELayer
from brickwork.route.moefy import (
    FFNSpec,
    expert_mass,
    ffn_weights,
    find_ffns,
    moefy,
    split_neurons,
)

transformers = pytest.importorskip("transformers")


def _bert(hidden_act: str = "gelu"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, hidden_act=hidden_act,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _decoder(kind: str = "Llama"):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()


def _llama():
    return _decoder("Llama")


class Block(nn.Module):
    """A residual block whose FFN is a named pair fc1 -> act -> fc2 (no Sequential)."""

    def __init__(self, d: int = 16, f: int = 48) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, f), nn.GELU(approximate="tanh"), nn.Linear(f, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """fc1 -> act -> fc2 children, but a residual forward: not the FFN it looks like."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 16))
        self.block = Block()

    def forward(self, x):
        return self.block(self.mlp(self.inp(x)))


def _ids(seed=0, shape=(4, 12)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _out(model, x):
    with torch.no_grad():
        o = model(x)
    return o if isinstance(o, torch.Tensor) else o[0]


_BLOCK_SPEC = FFNSpec("block.fc1", "block.fc1", "block.fc2", "gelu_tanh", identity=("block.act", "block.fc2"))  # fmt: skip
CASES = {
    "bert": (_bert, lambda: _ids(), None),
    "llama": (_llama, lambda: _ids(), None),
    "mistral": (lambda: _decoder("Mistral"), lambda: _ids(), None),
    "qwen2": (lambda: _decoder("Qwen2"), lambda: _ids(), None),
    "generic": (
        lambda: Net().eval(),
        lambda: torch.randn(64, 8, generator=torch.Generator().manual_seed(0)),
        ["mlp", _BLOCK_SPEC],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("clustering", ["kmeans", "coactivation"])
def test_all_experts_active_reproduce_the_dense_model(case, clustering):
    make, data, ffns = CASES[case]
    model, x = make(), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = moefy(model, n_experts=4, top_k=4, calibration=[x], ffns=ffns, clustering=clustering, steps=5)  # fmt: skip
    blocks = [m for m in r.model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2 and all(b.moe.n_experts == 4 for b in blocks)
    torch.testing.assert_close(_out(r.model, x), _out(model, x), atol=2e-5, rtol=1e-5)
    # the input model is untouched
    assert not any(isinstance(m, MoEBlock) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_found_ffns_per_architecture():
    bert = find_ffns(_bert())
    assert [s.replace for s in bert] == [f"encoder.layer.{i}.intermediate" for i in range(2)]
    assert bert[0].identity == ("encoder.layer.0.output.dense",) and bert[0].activation == "gelu"
    llama = find_ffns(_llama())
    assert [s.replace for s in llama] == [f"model.layers.{i}.mlp" for i in range(2)]
    assert llama[0].activation == "swiglu" and llama[0].gate == "model.layers.0.mlp.gate_proj"
    # the Sequential (dropout skipped); Block is not recognised (it also holds a LayerNorm)
    net = find_ffns(Net())
    assert [(s.replace, s.up, s.down, s.activation) for s in net] == [
        ("mlp", "mlp.0", "mlp.3", "relu")
    ]
    with pytest.raises(
        RecipeError,
        match=r"'block' is not a recognised FFN \(children: Linear, GELU, Linear, LayerNorm\)",
    ):
        find_ffns(Net(), ["block"])


def test_a_wrong_guess_is_caught_not_returned():
    # ResidualMLP looks like Linear -> act -> Linear, but its forward adds a residual: the
    # end-to-end check (all experts active == dense model) must refuse the result.
    model = nn.Sequential(nn.Linear(4, 8), ResidualMLP())
    assert [s.replace for s in find_ffns(model)] == ["1"]
    with pytest.raises(BrickworkError, match="differs from the dense one"):
        moefy(model, n_experts=2, top_k=2, calibration=torch.randn(16, 4), steps=1)
    ok = moefy(model, n_experts=2, top_k=1, calibration=torch.randn(16, 4), steps=1, check=False)
    assert isinstance(ok.model[1], MoEBlock)


@pytest.mark.parametrize(("n", "k"), [(64, 1), (64, 4), (48, 6), (60, 5), (12, 12)])
def test_balanced_kmeans_gives_equal_clusters_covering_every_point_once(n, k):
    x = torch.randn(n, 7, generator=torch.Generator().manual_seed(n + k))
    labels = balanced_kmeans(x, k, seed=1)
    assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < k
    assert torch.bincount(labels, minlength=k).tolist() == [n // k] * k
    assert torch.equal(balanced_kmeans(x, k, seed=1), labels)  # deterministic


def test_split_neurons_partitions_every_neuron_exactly_once():
    model = _llama()
    spec = find_ffns(model)[0]
    parts = split_neurons(ffn_weights(model, spec), 8, clustering="kmeans", seed=0)
    assert parts.shape == (8, 8)
    assert torch.equal(parts.flatten().sort().values, torch.arange(64))


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4) * 10  # (4, 4), far apart
    truth = torch.arange(4).repeat_interleave(6)[torch.randperm(24, generator=g)]
    x = centers[truth] + 0.1 * torch.randn(24, 4, generator=g)
    labels = balanced_kmeans(x, 4, seed=3)
    # same partition up to renaming: each planted cluster maps to exactly one label
    pairs = {(int(t), int(lab)) for t, lab in zip(truth, labels)}
    assert len(pairs) == 4


def test_balanced_assign_honours_capacity_and_takes_free_optima():
    cost = torch.tensor([[0.0, 5.0], [0.1, 5.0], [0.2, 0.3], [9.0, 0.0]])  # 3 prefer column 0
    labels = balanced_assign(cost, 2)
    assert labels.tolist() == [0, 0, 1, 1]  # the third point, least hurt, moves to column 1
    with pytest.raises(RecipeError, match="do not fill"):
        balanced_assign(cost, 3)


def _relu_mlp_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
    return model, torch.randn(3000, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("router", ["linear", "mlp"])
def test_trained_router_keeps_more_activation_mass_than_a_random_router(router):
    model, x = _relu_mlp_data()
    r = moefy(model, n_experts=8, top_k=2, calibration=x, router=router, router_hidden=32, seed=0)
    (rep,) = r.report
    assert rep.tokens == 600  # the 20 % held out
    # a random router of the same shape, measured with the same yardstick
    w = ffn_weights(model, r.specs[0])
    xs = x[:600]
    idx = r.partitions[0]  # (8, 8): the dense neurons of each expert
    mass = expert_mass(w, xs, idx)
    rand = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    picked = (xs @ rand).topk(2, dim=-1).indices
    random_kept = float((mass.gather(1, picked).sum(-1) / mass.sum(-1)).mean())
    assert rep.kept_mass > max(random_kept, rep.random_kept_mass) + 0.1
    assert rep.router_recall > 2 / 8 + 0.2
    assert rep.kept_mass <= rep.oracle_kept_mass + 1e-6
    # and its output is closer to the dense FFN's than with the random router's choice
    moe = r.model.moe
    ref = model(xs)
    moe.router = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        moe.router.weight.copy_(rand.t())
        err_random = float((moe(xs).output - ref).norm() / ref.norm())
    assert rep.output_rel_error < err_random


def test_moelayer_sum_combine_with_shared_bias_matches_dense_reference():
    torch.manual_seed(0)
    for act in ("relu", "gelu_tanh", "silu", "swiglu"):
        moe = MoELayer(8, 6, 5, top_k=3, activation=act, combine="sum", out_bias="shared",
                       router_hidden=4)  # fmt: skip
        with torch.no_grad():
            moe.bias.normal_()
            if moe.b_in is not None:
                moe.b_in.normal_()
        x = torch.randn(2, 7, 8)
        sparse = moe(x)
        with torch.no_grad():
            sparse_inf = moe(x).output
        dense = moe.forward_dense_reference(x)
        torch.testing.assert_close(sparse.output, dense.output)
        torch.testing.assert_close(sparse_inf, dense.output)
        # weights are 1: the output is bias + the plain sum of the chosen experts
        flat = x.reshape(-1, 8)
        idx = moe.router(flat).topk(3, dim=-1).indices
        manual = torch.stack(
            [
                moe.bias + sum(moe.expert(int(e), flat[t : t + 1])[0] for e in idx[t])
                for t in range(14)
            ]
        )
        torch.testing.assert_close(sparse.output.reshape(-1, 8), manual)
        assert MoELayer(**moe.config()).state_dict().keys() == moe.state_dict().keys()


def test_bad_arguments_raise_clear_errors():
    model = _llama()
    with pytest.raises(
        RecipeError, match=r"d_ff=64 is not divisible by n_experts=5; choose one of 1, 2, 4"
    ):
        moefy(model, n_experts=5, top_k=1, calibration=_ids())
    with pytest.raises(RecipeError, match="top_k must be in"):
        moefy(model, n_experts=4, top_k=5, calibration=_ids())
    with pytest.raises(CheckpointError, match="Did you mean 'model.layers.0.mlp'"):
        moefy(model, n_experts=4, top_k=2, calibration=_ids(), ffns=["model.layers.0.mpl"])
    with pytest.raises(RecipeError, match="not a recognised FFN"):
        moefy(model, n_experts=4, top_k=2, calibration=_ids(), ffns=["model.layers.0.self_attn"])
    with pytest.raises(RecipeError, match="calibration is empty"):
        moefy(model, n_experts=4, top_k=2, calibration=[])


def test_moefied_relu_ffn_follows_the_papers_formula():
    # MoEfication: F(x) = sum over the chosen experts e in S(x) of
    #   W2[:, P_e] relu(W1[P_e] x + b1[P_e]), plus b2 once; S(x) = the router's top-k.
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)).eval()
    x = torch.randn(40, 6)
    r = moefy(dense, n_experts=3, top_k=2, calibration=x, steps=20)
    (w1, b1), (w2, b2) = (dense[0].weight, dense[0].bias), (dense[2].weight, dense[2].bias)
    parts, router = r.partitions[0], r.model.moe.router
    with torch.no_grad():
        chosen = router(x).topk(2, dim=-1).indices  # (40, 2)
        expected = torch.stack(
            [
                b2
                + sum(
                    w2[:, parts[e]] @ torch.relu(w1[parts[e]] @ x[t] + b1[parts[e]])
                    for e in chosen[t]
                )
                for t in range(40)
            ]
        )
        torch.testing.assert_close(r.model(x), expected)
        assert not torch.allclose(expected, dense(x), atol=1e-3)  # a real approximation


def test_bfloat16_model_stays_bfloat16_and_close_to_dense():
    model = _llama().to(torch.bfloat16)
    r = moefy(model, n_experts=4, top_k=4, calibration=_ids(), steps=5)  # the check passes
    assert {p.dtype for p in r.model.parameters()} == {torch.bfloat16}
    ref, got = _out(model, _ids(3)).float(), _out(r.model, _ids(3)).float()
    assert float((got - ref).abs().max() / ref.abs().max()) < 3e-2


@pytest.mark.parametrize(
    ("hidden_act", "activation"),
    [
        ("gelu_new", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("relu", "relu"),
        ("silu", "silu"),
    ],
)
def test_bert_activations_are_recognised_and_reproduced(hidden_act, activation):
    model = _bert(hidden_act)
    assert {s.activation for s in find_ffns(model)} == {activation}
    r = moefy(model, n_experts=2, top_k=2, calibration=_ids(), steps=2)
    torch.testing.assert_close(_out(r.model, _ids(4)), _out(model, _ids(4)), atol=2e-5, rtol=1e-5)


def test_an_unsupported_activation_is_named_not_skipped():
    model = _bert("quick_gelu")
    with pytest.raises(RecipeError) as e:
        find_ffns(model)
    for layer in (0, 1):
        assert f"'encoder.layer.{layer}': BERT-style FFN with activation QuickGELU" in str(e.value)
    assert "ffns=[...] to leave these out" in str(e.value)
    with pytest.raises(RecipeError, match="supported: gelu, gelu_tanh"):
        moefy(model, n_experts=2, top_k=1, calibration=_ids(), ffns=["encoder.layer.1"])
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    with pytest.raises(RecipeError, match=r"'': Linear -> Tanh -> Linear"):
        find_ffns(net)


def test_collect_inputs_drops_padding_and_keeps_a_bounded_sample():
    from brickwork.route.moefy import collect_inputs

    model, path = _bert(), "encoder.layer.0.intermediate"
    ids = _ids(shape=(4, 12))
    mask = torch.ones_like(ids)
    mask[:2, 7:] = 0  # two padded rows: 2 * 5 padding positions
    batch = {"input_ids": ids, "attention_mask": mask}
    (full,) = collect_inputs(model, [path], [batch]).values()
    assert full.shape == (48 - 10, 32)
    (capped,) = collect_inputs(model, [path], [batch, batch], max_tokens=25, seed=1).values()
    assert capped.shape == (25, 32)
    assert bool((capped[:, None] == full[None]).all(-1).any(1).all())  # real tokens only
    (again,) = collect_inputs(model, [path], [batch, batch], max_tokens=25, seed=1).values()
    assert torch.equal(again, capped)
