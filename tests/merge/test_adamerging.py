"""AdaMerging (Yang et al. 2024) on tiny MLPs: shapes, clamp, known answers, the paper's formula."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from brickwork.errors import (
    BrickworkError,
    IncompatibleModelsError,
    MergeComputationError,
    RecipeError,
)
from brickwork.merge.adamerging import adamerging


def _mlp(seed: int, bias: bool = True, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, 3, bias=bias)
    )


def _perturbed(base: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    m = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def _batches(seed: int, n: int = 3, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 4, generator=g) for _ in range(n)]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) = −Σ_c p_c log p_c, averaged over the batch: the paper's loss."""
    p = torch.softmax(logits, -1)
    return -(p * torch.log_softmax(logits, -1)).sum(-1).mean()


def _sd(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.fixture()
def pool():
    base = _mlp(0)
    models = [_perturbed(base, 1), _perturbed(base, 2)]
    data = [_batches(10), _batches(11)]
    return base, models, data


def test_layer_mode_one_lambda_per_task_per_tensor_inside_clamp(pool):
    base, models, data = pool
    merged, rep = adamerging(base, models, data, mode="layer", steps=40, lr=0.05, clamp=(0.2, 0.4))
    names = [n for n, _ in base.named_parameters()]
    assert rep["layers"] == names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(rep["lambdas"]) == 2 and all(list(d) == names for d in rep["lambdas"])
    values = [v for d in rep["lambdas"] for v in d.values()]
    assert all(0.2 <= v <= 0.4 for v in values)
    # with lr 0.05 over 40 steps some λ must have reached a bound: the clamp did something
    assert any(v in (0.2, 0.4) for v in values)
    assert len(set(values)) > 1  # layer-wise: not one value for all
    assert rep["steps"] == 40 and len(rep["loss"]) == 40 and rep["seconds"] >= 0


def test_task_mode_one_lambda_per_task(pool):
    base, models, data = pool
    merged, rep = adamerging(base, models, data, mode="task", steps=40, lr=0.05, clamp=(0.2, 0.4))
    assert len(rep["lambdas"]) == 2 and all(isinstance(v, float) for v in rep["lambdas"])
    assert all(0.2 <= v <= 0.4 for v in rep["lambdas"])
    # every tensor of the result uses the task's one λ
    for (name, p), b in zip(merged.named_parameters(), base.parameters()):
        tv = [dict(m.named_parameters())[name] - b for m in models]
        want = b + rep["lambdas"][0] * tv[0] + rep["lambdas"][1] * tv[1]
        torch.testing.assert_close(p, want)


def test_merged_weights_follow_the_formula(pool):
    base, models, data = pool
    merged, rep = adamerging(base, models, data, steps=15, lr=0.02)
    for name, p in merged.named_parameters():
        b = dict(base.named_parameters())[name]
        want = b + sum(
            rep["lambdas"][i][name] * (dict(m.named_parameters())[name] - b)
            for i, m in enumerate(models)
        )
        torch.testing.assert_close(p, want)


@pytest.mark.parametrize("mode", ["layer", "task"])
def test_first_step_is_adam_on_the_entropy_gradient(pool, mode):
    """Adam's first step moves each λ by exactly lr · sign(∂L/∂λ) (m̂/√v̂ = g/|g|), with L the
    mean over tasks of H(softmax(f(x; θ_base + Σ_i λ_i τ_i))) written out plainly here."""
    base, models, data = pool
    init, lr = 0.5, 0.01
    names = [n for n, _ in base.named_parameters()]
    b = dict(base.named_parameters())
    tv = [
        {n: dict(m.named_parameters())[n].detach() - b[n].detach() for n in names} for m in models
    ]
    lam = torch.full((2, len(names)) if mode == "layer" else (2,), init, requires_grad=True)
    loss = 0
    for i in range(2):
        params = {
            n: b[n].detach()
            + sum((lam[t, j] if mode == "layer" else lam[t]) * tv[t][n] for t in range(2))
            for j, n in enumerate(names)
        }
        loss = loss + _entropy(torch.func.functional_call(base, params, (data[i][0],)))
    (g,) = torch.autograd.grad(loss / 2, [lam])
    _, rep = adamerging(base, models, data, mode=mode, init=init, steps=1, lr=lr)
    got = torch.tensor(
        [list(d.values()) for d in rep["lambdas"]] if mode == "layer" else rep["lambdas"]
    )
    assert torch.all(g != 0)
    torch.testing.assert_close(got, init - lr * torch.sign(g), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(rep["loss"][0]), (loss / 2).detach())


def test_confidence_task_vector_goes_to_the_clamp_and_a_zero_one_stays():
    """Without biases, τ_1 = θ_base scales the logits by (1+λ_0)(1+λ_1): every λ of it lowers
    the entropy, so all rise to the upper bound; τ_2 = 0 has zero gradient, so it stays at init."""
    base = _mlp(0, bias=False)
    confident = copy.deepcopy(base)
    with torch.no_grad():
        for p in confident.parameters():
            p.mul_(2.0)  # θ_1 − θ_base = θ_base
    same = copy.deepcopy(base)
    data = [_batches(3, n=1), _batches(4, n=1)]  # one batch each: the curve must be monotone
    _, rep = adamerging(base, [confident, same], data, steps=80, lr=0.05, clamp=(0.0, 0.8))
    assert list(rep["lambdas"][0].values()) == [0.8, 0.8]
    assert list(rep["lambdas"][1].values()) == pytest.approx([0.3, 0.3], abs=1e-7)
    assert rep["loss"][-1] < rep["loss"][0] - 0.05  # entropy must fall: logits only grow
    assert all(b <= a + 1e-6 for a, b in zip(rep["loss"], rep["loss"][1:]))


def test_one_model_init_zero_no_steps_is_the_base(pool):
    base, models, data = pool
    merged, rep = adamerging(base, models[:1], data[:1], init=0.0, steps=0)
    assert merged is not base
    for k, v in base.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v)
    assert rep["loss"] == [] and rep["lambdas"] == [dict.fromkeys(rep["layers"], 0.0)]


def test_deterministic_with_a_seed_and_callers_rng_untouched(pool):
    base, models, _ = pool
    g = torch.Generator().manual_seed(5)
    sets = [torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g)) for _ in range(2)]
    data = [torch.utils.data.DataLoader(s, batch_size=4, shuffle=True) for s in sets]
    state = torch.get_rng_state()
    m1, r1 = adamerging(base, models, data, steps=12, lr=0.02, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    _, r3 = adamerging(base, models, data, steps=12, lr=0.02, seed=4)
    with torch.no_grad():  # a caller's no_grad does not stop the adaptation
        m2, r2 = adamerging(base, models, data, steps=12, lr=0.02, seed=3)
    assert r1["lambdas"] == r2["lambdas"] and r1["loss"] == r2["loss"]
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert r3["loss"] != r1["loss"]  # another seed shuffles the batches differently


def test_inputs_untouched_heads_fixed_and_modes_kept():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 5))
    models = [_perturbed(base, 1), _perturbed(base, 2)]
    heads = [nn.Linear(5, 3), nn.Linear(5, 2)]
    data = [_batches(1), _batches(2)]
    base.train()
    before = [_sd(m) for m in [base, *models, *heads]]
    merged, rep = adamerging(base, models, data, heads=heads, steps=5, lr=0.05)
    for m, sd in zip([base, *models, *heads], before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
        assert all(p.grad is None for p in m.parameters())
    assert base.training and merged.training and merged[1].training  # train mode kept
    assert all(merged[0].weight.data_ptr() != p.data_ptr() for p in base.parameters())
    # dropout was off during adaptation: the same run again gives the same curve
    _, rep2 = adamerging(base, models, data, heads=heads, steps=5, lr=0.05, seed=9)
    assert rep2["loss"] == rep["loss"]


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.out = nn.Linear(6, 11)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.out(self.emb(input_ids)))  # (batch, tokens, vocab)


def test_causal_lm_padding_is_masked_out():
    base = _TinyLM()
    models = [_perturbed(base, 1), _perturbed(base, 2)]
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    other_pad = ids.clone()
    other_pad[1, 2:] = 7  # different tokens at the padding positions

    def run(ids_, with_mask=True):
        batch = {"input_ids": ids_, **({"attention_mask": mask} if with_mask else {})}
        return adamerging(base, models, [[batch], [batch]], steps=6, lr=0.05)[1]

    a, b = run(ids), run(other_pad)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["lambdas"] == b["lambdas"]
    assert run(ids, with_mask=False)["loss"] != pytest.approx(a["loss"], abs=1e-4)


def test_logits_fn_and_outputs_without_logits():
    class Feat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.lin(x)}

    base = Feat()
    models = [_perturbed(base, 1)]
    with pytest.raises(MergeComputationError, match=r"data\[0\].*no logits.*logits_fn"):
        adamerging(base, models, [_batches(0)], steps=1)
    _, rep = adamerging(base, models, [_batches(0)], steps=2, logits_fn=lambda o: o["scores"])
    assert len(rep["loss"]) == 2


def test_batches_as_dict_and_tuple():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, y):
            return self.lin(x) + self.lin(y)

    base = Two()
    models = [_perturbed(base, 1)]
    x, y = _batches(0, n=2)
    _, r_tuple = adamerging(base, models, [[(x, y)]], steps=3, lr=0.05)
    _, r_dict = adamerging(base, models, [[{"x": x, "y": y}]], steps=3, lr=0.05)
    assert r_tuple["loss"] == r_dict["loss"]


def test_errors(pool):
    base, models, data = pool
    with pytest.raises(RecipeError, match="data has 1 entries for 2 models"):
        adamerging(base, models, data[:1])
    with pytest.raises(RecipeError, match=r"data\[1\] yielded no batches"):
        adamerging(base, models, [data[0], []], steps=0)
    with pytest.raises(RecipeError, match=r"data\[0\] yielded no batches after 1 batches"):
        adamerging(base, models[:1], [iter(data[0][:1])], steps=3)
    with pytest.raises(RecipeError, match="init must lie in clamp"):
        adamerging(base, models, data, init=1.5)
    with pytest.raises(RecipeError, match="mode must be 'task' or 'layer'"):
        adamerging(base, models, data, mode="tensor")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="heads has 1 entries"):
        adamerging(base, models, data, heads=[nn.Identity()])
    wide = _mlp(0, hidden=9)
    with pytest.raises(
        IncompatibleModelsError, match=r"'0.weight'.*\(9, 4\).*models\[1\].*\(8, 4\)"
    ):
        adamerging(base, [models[0], wide], data)
    ints = copy.deepcopy(base)
    ints.register_parameter(
        "count", nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    )
    with pytest.raises(IncompatibleModelsError, match="'count' has dtype torch.int64"):
        adamerging(ints, [copy.deepcopy(ints)], data[:1])
    with pytest.raises(MergeComputationError, match="does not depend on the merged weights"):
        adamerging(base, models, data, steps=1, logits_fn=lambda out: out.detach())
    with pytest.raises(IncompatibleModelsError, match="no parameters"):
        adamerging(nn.ReLU(), [nn.ReLU()], data[:1])
    assert issubclass(IncompatibleModelsError, BrickworkError)
    assert issubclass(MergeComputationError, BrickworkError)


def test_tiny_llama_tied_embeddings_and_padding():
    """A causal LM: entropy per non-padding token; tied tensors get one λ and stay tied."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    models = [_perturbed(base, 1, 0.05), _perturbed(base, 2, 0.05)]
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    other = ids.clone()
    other[1, 3:] = 33  # right padding: causal attention keeps it out of the real tokens too

    def run(ids_):
        batch = {"input_ids": ids_, "attention_mask": mask}
        return adamerging(base, models, [[batch], [batch]], steps=3, lr=0.05)

    merged, rep = run(ids)
    _, rep_other = run(other)
    assert rep["loss"] == pytest.approx(rep_other["loss"], abs=1e-5)
    assert "lm_head.weight" not in rep["layers"]
    assert len(rep["layers"]) == len(list(base.parameters()))
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    name = "model.embed_tokens.weight"
    b = base.get_input_embeddings().weight
    want = b + sum(
        rep["lambdas"][i][name] * (m.get_input_embeddings().weight - b)
        for i, m in enumerate(models)
    )
    torch.testing.assert_close(merged.lm_head.weight, want)
