"""Data-aware merges: the statistics collector, its cache, regmean / fisher /
regmean_plusplus against their papers' formulas written out plainly, the errors, and a
``brickwork merge`` run with a ``data:`` block on a tiny random GPT-2 with a tokenizer trained
offline."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _helpers import write_yaml
from torch import nn

import brickwork
from brickwork.errors import DataError, RegularizedWarning
from brickwork.merge.api import merge_state_dicts
from brickwork.merge.registry import get_method, list_methods
from brickwork.stats import statistics_for
from brickwork.stats.collect import collect_fisher, collect_gram
from brickwork.stats.store import TensorStatistics


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRICKWORK_CACHE", str(tmp_path / "cache"))


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _linear(w, b=None):
    m = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=b is not None))
    with torch.no_grad():
        m[0].weight.copy_(w)
        if b is not None:
            m[0].bias.copy_(b)
    return m


class _Stats:
    """A StatisticsSource stand-in: given per-model statistics of each tensor."""

    def __init__(self, per_model):
        self.per_model = per_model
        self.notes = []

    def for_tensor(self, model, name):
        return self.per_model[model].get(name)


# -- registry ------------------------------------------------------------------------------


def test_data_aware_methods_are_registered_apart():
    assert {"regmean", "fisher", "regmean_plusplus", "adamerging"} <= set(
        list_methods(data_aware=True)
    )
    assert not {"regmean", "fisher", "regmean_plusplus", "adamerging"} & set(list_methods())
    assert get_method("regmean").statistics == ("gram",)
    assert get_method("fisher").statistics == ("fisher",)
    assert [p.name for p in get_method("regmean").params] == ["alpha", "gram", "check_rows"]
    ada = get_method("adamerging")  # imported lazily from brickwork.merge.adamerging
    assert ada.level == "module" and ada.needs_base
    assert {"mode", "init", "steps", "lr"} <= {p.name for p in ada.params}
    assert get_method("regmean_plusplus").level == "module"


# -- RegMean ---------------------------------------------------------------------------------


def test_regmean_of_two_least_squares_fits_is_the_fit_on_the_union():
    """Jin et al. eq. 2: with G_i = X_iᵀX_i (gram: sum) and alpha = 1, the merge of two
    linear models fit on disjoint data is the least-squares fit on their union."""
    x1 = torch.randn(40, 5, generator=_g(0), dtype=torch.float64)
    x2 = torch.randn(70, 5, generator=_g(1), dtype=torch.float64) + 0.5
    y1 = x1 @ torch.randn(5, 3, generator=_g(2), dtype=torch.float64)
    y2 = x2 @ torch.randn(5, 3, generator=_g(3), dtype=torch.float64)
    w1 = torch.linalg.lstsq(x1, y1).solution.T.float()  # (out, in)
    w2 = torch.linalg.lstsq(x2, y2).solution.T.float()
    out = brickwork.merge_modules(
        "regmean",
        [_linear(w1), _linear(w2)],
        data=[[x1.float()], [x2.float()]],
        parameters={"alpha": 1.0, "gram": "sum"},
    )
    union = torch.linalg.lstsq(torch.cat([x1, x2]), torch.cat([y1, y2])).solution.T
    torch.testing.assert_close(out[0].weight.detach().double(), union, atol=1e-4, rtol=1e-4)


def test_regmean_closed_form_with_alpha_and_mean_grams():
    """W = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, G̃ = α G + (1-α) diag(G), G_i = X_iᵀX_i / n_i; bias averaged."""
    xs = [torch.randn(n, 6, generator=_g(i)) for i, n in enumerate((20, 30))]
    ws = [torch.randn(4, 6, generator=_g(10 + i)) for i in range(2)]
    bs = [torch.randn(4, generator=_g(20 + i)) for i in range(2)]
    alpha = 0.7
    grams = []
    for x in xs:
        g = (x.double().T @ x.double()) / x.shape[0]
        off = g - torch.diag(torch.diag(g))
        grams.append(torch.diag(torch.diag(g)) + alpha * off)
    expected = torch.linalg.solve(sum(grams), sum(g @ w.double().T for g, w in zip(grams, ws))).T
    out = brickwork.merge_modules(
        "regmean",
        [_linear(w, b) for w, b in zip(ws, bs)],
        data=[[x] for x in xs],
        parameters={"alpha": alpha},
    )
    torch.testing.assert_close(out[0].weight.detach().double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0].bias.detach(), (bs[0] + bs[1]) / 2)


def test_conv1d_is_the_transpose_of_linear():
    """GPT-2's Conv1D holds W as (in, out): its Gram and merge match nn.Linear's, transposed."""
    from transformers.pytorch_utils import Conv1D

    xs = [torch.randn(30, 6, generator=_g(i)) for i in range(2)]
    ws = [torch.randn(4, 6, generator=_g(10 + i)) for i in range(2)]
    convs = []
    for w in ws:
        c = Conv1D(4, 6)
        with torch.no_grad():
            c.weight.copy_(w.T)  # (in, out)
            c.bias.zero_()
        convs.append(nn.Sequential(c))
    grams = collect_gram(convs[0], [xs[0]])
    assert grams["0.weight"].input_axis == 0 and grams["0.weight"].sum.shape == (6, 6)
    torch.testing.assert_close(grams["0.weight"].sum, xs[0].double().T @ xs[0].double())
    via_conv = brickwork.merge_modules("regmean", convs, data=[[x] for x in xs])
    via_linear = brickwork.merge_modules(
        "regmean", [_linear(w, torch.zeros(4)) for w in ws], data=[[x] for x in xs]
    )
    torch.testing.assert_close(via_conv[0].weight.T, via_linear[0].weight, atol=1e-5, rtol=1e-5)


def test_copies_give_the_model_back():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(40, 6, generator=_g(0))
    for name in ("regmean", "fisher", "regmean_plusplus"):
        out = brickwork.merge_modules(name, [model, model], data=[[x], [x]])
        for (k, a), b in zip(out.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name}: {k}")


# -- Fisher ----------------------------------------------------------------------------------


def test_fisher_weighted_average_by_hand():
    """θ* = Σ λ_i F_i θ_i / Σ λ_i F_i, F floored at fisher_floor, plus epsilon."""
    thetas = [torch.randn(3, 4, generator=_g(i)) for i in range(2)]
    fishers = [torch.rand(3, 4, generator=_g(5 + i)) for i in range(2)]
    fishers[0][0, 0] = 0.0  # floored
    lam, floor, eps = [1.0, 2.0], 0.01, 1e-3
    f = [x.clamp(min=floor) + eps for x in fishers]
    expected = (lam[0] * f[0] * thetas[0] + lam[1] * f[1] * thetas[1]) / (
        lam[0] * f[0] + lam[1] * f[1]
    )
    stats = _Stats(
        {f"model{i}": {"w": TensorStatistics(fisher=fishers[i], fisher_norm=1.0)} for i in (0, 1)}
    )
    out = merge_state_dicts(
        "fisher",
        [{"w": t} for t in thetas],
        model_parameters=[{"weight": x} for x in lam],
        parameters={"fisher_floor": floor, "epsilon": eps},
        statistics=stats,
    )
    torch.testing.assert_close(out["w"], expected)
    # normalize: each model's Fisher divided by its norm over every parameter
    stats.per_model["model1"]["w"] = TensorStatistics(fisher=fishers[1], fisher_norm=4.0)
    out = merge_state_dicts(
        "fisher", [{"w": t} for t in thetas], parameters={"normalize": True, "fisher_floor": 0.0},
        statistics=stats,
    )  # fmt: skip
    g = [fishers[0] / 1.0, fishers[1] / 4.0]
    torch.testing.assert_close(out["w"], (g[0] * thetas[0] + g[1] * thetas[1]) / (g[0] + g[1]))


class _Wrapped(nn.Module):
    """A classifier whose forward takes keyword inputs, as HF models do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, input, labels=None):
        return self.lin(input)


def test_per_example_fisher_is_not_the_squared_batch_gradient():
    """Empirical Fisher: 1/N Σ_n (∇ log p(y_n|x_n))², not (Σ_n ∇ log p(y_n|x_n))² / N."""
    torch.manual_seed(0)
    model = _Wrapped()
    x = torch.randn(2, 3, generator=_g(1))
    y = torch.tensor([0, 2])
    per_example = []
    for n in range(2):
        model.zero_grad()
        torch.log_softmax(model(x[n : n + 1]), -1)[0, y[n]].backward()
        per_example.append(model.lin.weight.grad.clone())
    expected = (per_example[0] ** 2 + per_example[1] ** 2) / 2
    batch = (per_example[0] + per_example[1]) ** 2 / 2  # what FusionBench computes
    grad_before = model.lin.weight.grad.clone()
    f = collect_fisher(model, [{"input": x, "labels": y}], estimate="empirical")
    torch.testing.assert_close(f.values["lin.weight"], expected)
    assert not torch.allclose(f.values["lin.weight"], batch)
    assert torch.equal(model.lin.weight.grad, grad_before)  # the module's .grad untouched


def test_exact_fisher_sums_over_the_label_set():
    torch.manual_seed(0)
    model = _Wrapped()
    x = torch.randn(3, 3, generator=_g(1))
    expected = torch.zeros_like(model.lin.weight)
    for n in range(3):
        logp = torch.log_softmax(model(x[n : n + 1]), -1)[0]
        for c in range(4):
            (g,) = torch.autograd.grad(logp[c], model.lin.weight, retain_graph=True)
            expected += logp[c].exp().item() * g**2
    f = collect_fisher(model, [{"input": x}], estimate="exact")
    torch.testing.assert_close(f.values["lin.weight"], expected / 3)
    sampled = collect_fisher(model, [{"input": x}], estimate="sampled", seed=0)
    again = collect_fisher(model, [{"input": x}], estimate="sampled", seed=0)
    torch.testing.assert_close(sampled.values["lin.weight"], again.values["lin.weight"])


# -- padding, cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    return BertModel(cfg).eval()


def test_padding_tokens_change_nothing(tiny_bert):
    a = torch.tensor([[2, 5, 9, 11, 3]])
    b = torch.tensor([[2, 7, 3]])
    alone = collect_gram(tiny_bert, [{"input_ids": a}, {"input_ids": b}])
    for pad in (0, 42):  # whatever the padding ids are, they are masked out
        padded = {
            "input_ids": torch.tensor([[2, 5, 9, 11, 3], [2, 7, 3, pad, pad]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        }
        got = collect_gram(tiny_bert, [padded])
        for name, g in alone.items():
            assert got[name].rows == g.rows, name
            torch.testing.assert_close(got[name].sum, g.sum, atol=1e-4, rtol=1e-4, msg=name)
    assert alone["encoder.layer.0.attention.self.query.weight"].rows == 8  # tokens
    assert alone["pooler.dense.weight"].rows == 2  # the pooler sees [CLS] only


def test_statistics_cache_hit_and_miss(tiny_bert, tmp_path):
    data = [{"input_ids": torch.tensor([[2, 5, 9, 3]])}]
    first = statistics_for(tiny_bert, data, "gram")
    assert not first.hit and first.path.is_relative_to(tmp_path / "cache")
    again = statistics_for(tiny_bert, data, "gram")
    assert again.hit and again.path == first.path
    other = statistics_for(tiny_bert, [{"input_ids": torch.tensor([[2, 6, 9, 3]])}], "gram")
    assert not other.hit and other.path != first.path
    fisher = statistics_for(tiny_bert, data, "fisher", logits_fn=lambda out: out.pooler_output)
    assert not fisher.hit and fisher.path != first.path
    assert [p.name for p in first.path.parent.iterdir() if p.name.startswith(".")] == []


# -- errors ----------------------------------------------------------------------------------


def test_no_data_is_an_error():
    m = _linear(torch.randn(2, 3))
    with pytest.raises(DataError, match=r"'regmean' needs calibration data: pass data="):
        brickwork.merge_modules("regmean", [m, m])
    with pytest.raises(DataError, match="2 models but data holds 1"):
        brickwork.merge_modules("regmean", [m, m], data=[[torch.randn(5, 3)]])
    with pytest.raises(DataError, match="needs statistics"):
        merge_state_dicts("regmean", [m.state_dict(), m.state_dict()])


def test_too_few_examples_for_a_gram_matrix_says_how_many():
    m = _linear(torch.randn(2, 8))
    with pytest.raises(DataError, match=r"from 5 non-padding input rows.*width 8.*at least 8"):
        brickwork.merge_modules("regmean", [m, m], data=[[torch.randn(5, 8)]] * 2)
    out = brickwork.merge_modules(  # alpha < 1 keeps the system solvable: merged anyway
        "regmean", [m, m], data=[[torch.randn(5, 8)]] * 2, parameters={"check_rows": False}
    )
    torch.testing.assert_close(out[0].weight, m[0].weight, atol=1e-5, rtol=1e-5)


def test_singular_system_gets_a_ridge_warned_and_recorded():
    x = torch.randn(20, 4, generator=_g(0))
    x[:, 2] = 0.0  # an input feature that never fires: Σ G is singular
    m1, m2 = _linear(torch.randn(3, 4, generator=_g(1))), _linear(torch.randn(3, 4))
    with pytest.warns(RegularizedWarning, match="ridge"):
        out = brickwork.merge_modules(
            "regmean", [m1, m2], data=[[x], [x]], parameters={"alpha": 1.0}
        )
    assert torch.isfinite(out[0].weight).all()


def test_data_that_does_not_fit_the_model(tiny_bert):
    with pytest.raises(DataError, match=r"forward pass failed on calibration batch 0"):
        collect_gram(tiny_bert, [{"input_ids": torch.tensor([[2, 99, 3]])}], where="model 'x'")
    with pytest.raises(DataError, match="no logits"):
        collect_fisher(tiny_bert, [{"input_ids": torch.tensor([[2, 9, 3]])}])


# -- regmean_plusplus ----------------------------------------------------------------------------


class _Stack(nn.Module):
    def __init__(self, w0, w1):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)])
        with torch.no_grad():
            self.layers[0].weight.copy_(w0)
            self.layers[1].weight.copy_(w1)

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def _closed_form(grams, ws):
    g = [gi.double() for gi in grams]
    return torch.linalg.solve(sum(g), sum(gi @ w.double().T for gi, w in zip(g, ws))).T


def test_regmean_plusplus_collects_layer_inputs_from_the_merged_prefix():
    ws = [[torch.randn(4, 4, generator=_g(10 * i + k)) for k in range(2)] for i in range(2)]
    xs = [torch.randn(25, 4, generator=_g(5 + i)) for i in range(2)]
    models = [_Stack(*w) for w in ws]
    out = brickwork.merge_modules(
        "regmean_plusplus", models, data=[[x] for x in xs], parameters={"alpha": 1.0}
    )
    w0 = _closed_form([x.T @ x / len(x) for x in xs], [w[0] for w in ws])
    hs = [torch.tanh(x.double() @ w0.T) for x in xs]  # the MERGED layer 0's outputs
    w1 = _closed_form([h.T @ h / len(h) for h in hs], [w[1] for w in ws])
    torch.testing.assert_close(out.layers[0].weight.double(), w0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.layers[1].weight.double(), w1, atol=1e-5, rtol=1e-5)
    plain = brickwork.merge_modules(
        "regmean", models, data=[[x] for x in xs], parameters={"alpha": 1.0}
    )
    assert not torch.allclose(plain.layers[1].weight, out.layers[1].weight, atol=1e-4)


# -- the command line ----------------------------------------------------------------------------

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song at dawn",
    "my cat and your dog are friends",
    "rain fell on the quiet town",
    "the sun rose over the hills",
    "children played in the park all day",
    "a song of rain and sun",
] * 3


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    """A tiny random GPT-2 base and two perturbed copies, with a word-level tokenizer trained
    offline by `tokenizers` on the corpus and saved in every model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpt2")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    base = GPT2LMHeadModel(cfg).eval()
    dirs = []
    for i in range(3):
        m = base if i == 0 else GPT2LMHeadModel(cfg)
        if i:
            m.load_state_dict(base.state_dict())
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=_g(i)))
        d = root / f"m{i}"
        m.save_pretrained(d)
        fast.save_pretrained(d)
        dirs.append(d)
    (root / "calib.txt").write_text("\n".join(CORPUS) + "\n")
    return dirs, root / "calib.txt"


def test_cli_regmean_with_a_data_block(run_cli, tmp_path, gpt2_family):
    from transformers import AutoModelForCausalLM

    (m0, m1, m2), text = gpt2_family
    data = {"path": str(text), "n_examples": 24, "batch_size": 8, "max_length": 16}
    r = write_yaml(
        tmp_path / "r.yaml",
        {"method": "regmean", "models": [{"model": str(m1), "data": data},
                                         {"model": str(m2), "data": data}]},
    )  # fmt: skip
    code, out, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 0, out + err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(merged(torch.tensor([[2, 3, 4]])).logits).all()
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    stats = prov["statistics"]
    assert {s["model"] for s in stats} == {str(m1), str(m2)}
    assert all(s["kind"] == "gram" and s["examples"] == 24 and s["data_hash"] for s in stats)
    assert prov["regularized"] == []
    assert prov["recipe"]["models"][0]["data"]["n_examples"] == 24
    # nothing was written next to the inputs: the statistics live in the cache
    assert sorted(p.name for p in m1.iterdir()) == sorted(p.name for p in m0.iterdir())
    # the same run again reads the cached statistics
    code, out, err = run_cli("merge", r, tmp_path / "out2", "-q")
    assert code == 0, out + err
    prov2 = json.loads((tmp_path / "out2" / "brickwork.json").read_text())
    assert [s["cache_file"] for s in prov2["statistics"]] == [s["cache_file"] for s in stats]


def test_cli_fisher_with_input_ids_and_errors(run_cli, tmp_path, gpt2_family):
    from safetensors.torch import save_file

    (m0, m1, m2), _ = gpt2_family
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(2, 40, (6, 8), generator=_g(0))}, ids)
    entry = lambda m: {"model": str(m), "data": {"path": str(ids), "batch_size": 3}}  # noqa: E731
    r = write_yaml(tmp_path / "f.yaml", {"method": "fisher", "models": [entry(m1), entry(m2)]})
    code, out, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 0, out + err
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    assert {s["kind"] for s in prov["statistics"]} == {"fisher"}
    assert prov["statistics"][0]["options"]["estimate"] == "sampled"

    # no data block
    r = write_yaml(
        tmp_path / "n.yaml", {"method": "fisher", "models": [entry(m1), {"model": str(m2)}]}
    )
    code, out, err = run_cli("merge", r, tmp_path / "o2", "-q")
    assert code == 2 and "has no 'data:' block" in err and str(m2) in err
    # token ids the model's vocabulary does not have
    save_file({"input_ids": torch.tensor([[2, 300, 4]])}, tmp_path / "bad.safetensors")
    bad = {"model": str(m1), "data": {"path": str(tmp_path / "bad.safetensors")}}
    r = write_yaml(tmp_path / "b.yaml", {"method": "fisher", "models": [bad, entry(m2)]})
    code, out, err = run_cli("merge", r, tmp_path / "o3", "-q")
    assert code == 2 and "token id 300" in err and "64 entries" in err
    # a misspelt key of the data block
    r = write_yaml(tmp_path / "k.yaml", {"method": "fisher", "models": [
        {"model": str(m1), "data": {"path": str(ids), "n_exemples": 3}}, entry(m2)]})  # fmt: skip
    code, out, err = run_cli("merge", r, tmp_path / "o4", "-q")
    assert code == 2 and "n_exemples" in err and "n_examples" in err


def test_cli_plain_safetensors_cannot_run_data(run_cli, tmp_path, gpt2_family):
    from safetensors.torch import load_file, save_file

    (m0, m1, _), text = gpt2_family
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(m1 / "model.safetensors"), plain)
    data = {"path": str(text), "n_examples": 24}
    r = write_yaml(tmp_path / "r.yaml", {"method": "regmean", "models": [
        {"model": str(plain), "data": data}, {"model": str(m0), "data": data}]})  # fmt: skip
    code, out, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 2 and "no config.json" in err and "merge_modules" in err
    assert not (tmp_path / "out").exists()


def test_cli_regmean_plusplus(run_cli, tmp_path, gpt2_family):
    from transformers import AutoModelForCausalLM

    (m0, m1, m2), text = gpt2_family
    data = {"path": str(text), "n_examples": 24, "max_length": 16}
    r = write_yaml(tmp_path / "r.yaml", {"method": "regmean_plusplus", "models": [
        {"model": str(m1), "data": data}, {"model": str(m2), "data": data}]})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 0, out + err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(merged(torch.tensor([[2, 3, 4]])).logits).all()
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    assert prov["method_info"]["stages"] >= 3 and len(prov["statistics"]) == 2


def test_adamerging_runs_through_merge_modules():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    fts = []
    for i in range(2):
        m = nn.Sequential(nn.Linear(4, 3))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            m[0].weight.add_(torch.randn(3, 4, generator=_g(i)))
        fts.append(m)
    data = [[torch.randn(8, 4, generator=_g(10 + i))] for i in range(2)]
    out = brickwork.merge_modules(
        "adamerging", fts, base=base, data=data, parameters={"steps": 2, "mode": "task"}
    )
    assert out[0].weight.shape == (3, 4) and torch.isfinite(out[0].weight).all()
    with pytest.raises(brickwork.BrickworkError, match="stepz"):
        brickwork.merge_modules("adamerging", fts, base=base, data=data, parameters={"stepz": 2})


def test_cli_jsonl_data_and_a_model_without_tokenizer(run_cli, tmp_path, gpt2_family):
    (m0, m1, m2), _ = gpt2_family
    rows = tmp_path / "calib.jsonl"
    rows.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(CORPUS)))
    data = {"path": str(rows), "field": "body", "n_examples": 20}
    r = write_yaml(tmp_path / "r.yaml", {"method": "regmean", "models": [
        {"model": str(m1), "data": data}, {"model": str(m2), "data": data}]})  # fmt: skip
    code, out, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 0, out + err
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    assert {s["examples"] for s in prov["statistics"]} == {20}
    # the wrong field names the line, the field and what is there
    bad = {**data, "field": "text"}
    r = write_yaml(tmp_path / "f.yaml", {"method": "regmean", "models": [
        {"model": str(m1), "data": bad}, {"model": str(m2), "data": data}]})  # fmt: skip
    code, out, err = run_cli("merge", r, tmp_path / "o2", "-q")
    assert code == 2 and "line 1: no text field 'text' (found: body, id)" in err
    # text data for a model directory without tokenizer files
    from transformers import GPT2LMHeadModel

    bare = tmp_path / "bare"
    GPT2LMHeadModel.from_pretrained(m1).save_pretrained(bare)
    r = write_yaml(tmp_path / "t.yaml", {"method": "regmean", "models": [
        {"model": str(bare), "data": data}, {"model": str(m2), "data": data}]})  # fmt: skip
    code, out, err = run_cli("merge", r, tmp_path / "o3", "-q")
    assert code == 2 and "no tokenizer files" in err and "input_ids" in err


def test_cli_data_block_for_a_data_free_method_and_existing_output(run_cli, tmp_path, gpt2_family):
    (m0, m1, m2), text = gpt2_family
    data = {"path": str(text), "n_examples": 24}
    models = [{"model": str(m1), "data": data}, {"model": str(m2), "data": data}]
    r = write_yaml(tmp_path / "r.yaml", {"method": "linear", "models": models})
    code, out, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 2 and "uses no calibration data" in err
    (tmp_path / "taken").mkdir()
    r = write_yaml(tmp_path / "g.yaml", {"method": "regmean", "models": models})
    code, out, err = run_cli("merge", r, tmp_path / "taken", "-q")
    assert code == 2 and "already exists" in err


def test_cli_ridge_is_one_warning_line_and_in_the_provenance(run_cli, tmp_path, gpt2_family):
    from safetensors.torch import save_file

    (m0, m1, m2), _ = gpt2_family
    ids = tmp_path / "few.safetensors"  # 8 tokens for layers 16 wide: singular Gram matrices
    save_file({"input_ids": torch.randint(2, 40, (2, 4), generator=_g(0))}, ids)
    models = [{"model": str(m), "data": {"path": str(ids)}} for m in (m1, m2)]
    r = write_yaml(tmp_path / "r.yaml", {"method": "regmean", "models": models,
                                         "parameters": {"alpha": 1.0, "check_rows": False}})  # fmt: skip
    code, out, err = run_cli("merge", r, tmp_path / "out", "-q")
    assert code == 0, out + err
    lines = [line for line in err.splitlines() if "ridge" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: regmean: ")
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    assert prov["regularized"] and all("ridge" in r["note"] for r in prov["regularized"])
    # Σ_i G_i of two models' 8 rows each is singular where a layer is wider than 16
    assert {r["tensor"] for r in prov["regularized"]} >= {"transformer.h.0.mlp.c_proj.weight"}
