"""Permutation specs of Hugging Face transformers and alignment on them (issue 11).

Properties (STYLE.md §5): a random permutation of every derived group keeps the model's
outputs; aligning a model onto a randomly permuted copy of itself recovers the permutation and
the weights; inputs are never modified. Tiny random models, float32, eval mode, eager
attention."""

from __future__ import annotations

import copy

import pytest
import torch

from brickwork.align import align
from brickwork.align.hf_activation import feature_matching
from brickwork.align.hf_spec import hf_permutation_spec
from brickwork.align.spec import apply_permutations
from brickwork.align.weight_matching import objective, weight_matching
from brickwork.errors import AlignError

transformers = pytest.importorskip("transformers")

VOCAB = 50
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=64)


def _build(kind: str) -> torch.nn.Module:
    T = transformers
    if kind == "bert":
        cfg = T.BertConfig(
            hidden_size=32, num_attention_heads=4, max_position_embeddings=16, **SMALL
        )
        model = T.BertForSequenceClassification(cfg)
    elif kind == "bert_mlm":
        cfg = T.BertConfig(
            hidden_size=32, num_attention_heads=4, max_position_embeddings=16, **SMALL
        )
        model = T.BertForMaskedLM(cfg)
    elif kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16)
        model = T.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = T.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, **SMALL)
        model = T.LlamaForCausalLM(cfg)
    elif kind == "mistral":  # grouped-query attention: 2 query heads per KV head
        cfg = T.MistralConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, **SMALL)
        model = T.MistralForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v biases, 3 query heads per KV head
        cfg = T.Qwen2Config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, **SMALL)
        model = T.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so no unit ties
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.float().eval()


KINDS = ("bert", "bert_mlm", "gpt2", "llama", "mistral", "qwen2")
ROPE = ("llama", "mistral", "qwen2")
OPTIONS = {
    "default": {},
    "no_within_head": {"within_head": False},
    "no_heads": {"heads": False, "within_head": False},
    "residual": {"residual": True},
}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {kind: _build(kind) for kind in KINDS}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _random_perms(spec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}


def _permuted_copy(model, spec, perms):
    out = copy.deepcopy(model)
    out.load_state_dict(apply_permutations(model.state_dict(), spec, perms))
    return out


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_random_permutation_keeps_the_function(models, kind, option):
    model = models[kind]
    spec = hf_permutation_spec(model.config, model.state_dict().keys(), **OPTIONS[option])
    perms = _random_perms(spec, seed=1)
    assert any((p != torch.arange(len(p))).any() for p in perms.values())
    permuted = _permuted_copy(model, spec, perms)
    moved = [
        k for k, v in model.state_dict().items() if not torch.equal(v, permuted.state_dict()[k])
    ]
    assert moved  # the permutation did change weights
    torch.testing.assert_close(
        _logits(permuted, _batch()), _logits(model, _batch()), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("option", ["default", "residual"])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_matching_recovers_a_permuted_copy(models, kind, option):
    model = models[kind]
    sd = model.state_dict()
    spec = hf_permutation_spec(model.config, sd.keys(), **OPTIONS[option])
    for seed in (0, 1):
        sd_b = apply_permutations(sd, spec, _random_perms(spec, seed=10 + seed))
        result = weight_matching(spec, sd, sd_b, seed=seed)
        back = apply_permutations(sd_b, spec, result.perms)
        for name, tensor in sd.items():
            torch.testing.assert_close(back[name], tensor, atol=0, rtol=0, msg=name)
        steps = torch.diff(torch.tensor(result.objective, dtype=torch.float64))
        assert (steps >= -1e-9).all()


@pytest.mark.parametrize("kind", ["bert", "gpt2", "mistral", "qwen2"])
def test_weight_matching_objective_never_decreases_between_different_models(kind):
    a, b = _build(kind), _build(kind)
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(torch.randn_like(p) * p.std().clamp_min(0.02))
    spec = hf_permutation_spec(a.config, a.state_dict().keys(), residual=True)
    result = weight_matching(spec, a.state_dict(), b.state_dict(), seed=0)
    steps = torch.diff(torch.tensor(result.objective, dtype=torch.float64))
    assert (steps >= -1e-9 * abs(result.objective[0])).all()
    assert result.objective[-1] > result.objective[0]
    final = objective(spec, a.state_dict(), b.state_dict(), result.perms)
    assert final == pytest.approx(result.objective[-1])


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("kind", KINDS)
def test_align_recovers_weights_keeps_function_and_inputs(models, kind, method):
    model = models[kind]
    spec = hf_permutation_spec(model.config, model.state_dict().keys(), residual=True)
    b = _permuted_copy(model, spec, _random_perms(spec, seed=3))
    before_a = {k: v.clone() for k, v in model.state_dict().items()}
    before_b = {k: v.clone() for k, v in b.state_dict().items()}
    data = [_batch(0), _batch(1)]
    aligned, perms = align(model, b, method=method, data=data, residual=True)
    assert set(perms) == {g.name for g in spec.groups}
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(aligned.state_dict()[name], tensor, atol=0, rtol=0)
    torch.testing.assert_close(
        _logits(aligned, _batch(2)), _logits(b, _batch(2)), atol=1e-5, rtol=0
    )
    for name, tensor in before_a.items():
        assert torch.equal(model.state_dict()[name], tensor)
    for name, tensor in before_b.items():
        assert torch.equal(b.state_dict()[name], tensor)


def test_align_passes_options_through(models):
    model = models["bert"]
    b = copy.deepcopy(model)
    _, perms = align(model, b, within_head=False)
    assert not any(name.endswith((".qk", ".vo")) for name in perms)
    assert "residual" not in perms
    _, perms = align(model, b, heads=False, within_head=False, residual=True)
    assert "residual" in perms and not any(".heads" in name for name in perms)
    spec = hf_permutation_spec(model.config, model.state_dict().keys(), heads=False)
    _, perms = align(model, b, spec=spec)
    assert set(perms) == {g.name for g in spec.groups}


def test_spec_groups_of_a_grouped_query_model(models):
    model = models["qwen2"]  # 6 query heads, 2 KV heads, head_dim 8
    spec = hf_permutation_spec(model.config, model.state_dict().keys())
    heads = spec["model.layers.0.heads"]
    assert heads.size == 2
    blocks = {
        (m.tensor.rsplit(".", 2)[-2], m.tensor.rsplit(".", 1)[-1]): m.block for m in heads.members
    }
    assert blocks[("q_proj", "weight")] == 24 and blocks[("q_proj", "bias")] == 24
    assert blocks[("k_proj", "weight")] == 8 and blocks[("v_proj", "bias")] == 8
    assert blocks[("o_proj", "weight")] == 24
    queries = spec["model.layers.0.heads.1.q"]  # query heads inside KV group 1
    assert queries.parent == heads.name and queries.size == 3
    assert {m.offset for m in queries.members} == {24}
    vo = spec["model.layers.0.heads.1.vo"]
    assert vo.parent == heads.name and vo.size == 8
    o_offsets = sorted(m.offset for m in vo.members if m.tensor.endswith("o_proj.weight"))
    assert o_offsets == [24, 32, 40]  # every query head that reads V head 1


@pytest.mark.parametrize("kind", ROPE)
def test_rope_models_have_no_query_key_dimension_groups(models, kind):
    model = models[kind]
    spec = hf_permutation_spec(model.config, model.state_dict().keys())
    assert not any(g.name.endswith(".qk") for g in spec.groups)
    assert any(g.name.endswith(".vo") for g in spec.groups)
    # the reason: one shared permutation of a head's Q and K dimensions changes a RoPE model
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    d = model.config.hidden_size // model.config.num_attention_heads
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    perm = torch.roll(torch.arange(d), 1)
    at = "model.layers.0.self_attn"
    for proj, heads in (("q_proj", g), ("k_proj", 1)):  # the query heads of KV group 0, K head 0
        for part in ("weight", "bias"):
            name = f"{at}.{proj}.{part}"
            for j in range(heads if name in sd else 0):
                sd[name][j * d : (j + 1) * d] = model.state_dict()[name][j * d : (j + 1) * d][perm]
    wrong = copy.deepcopy(model)
    wrong.load_state_dict(sd)
    diff = (_logits(wrong, _batch()) - _logits(model, _batch())).abs().max()
    assert diff > 1e-3


def test_absolute_position_models_share_query_key_dimensions(models):
    model = models["bert"]
    spec = hf_permutation_spec(model.config, model.state_dict().keys())
    qk = spec["bert.encoder.layer.1.heads.2.qk"]
    assert qk.parent == "bert.encoder.layer.1.heads" and qk.size == 8
    assert {(m.tensor.split(".")[-2], m.offset) for m in qk.members} == {("query", 16), ("key", 16)}


def test_nested_group_acts_on_the_head_now_at_its_position(models):
    """Reference for the semantics: the child of head position h permutes the dimensions of
    whichever head the parent moved to h."""
    model = models["bert"]
    sd = model.state_dict()
    spec = hf_permutation_spec(model.config, sd.keys())
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    heads = "bert.encoder.layer.0.heads"
    perms[heads] = torch.tensor([2, 0, 3, 1])
    dims = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    perms[f"{heads}.0.qk"] = dims
    out = apply_permutations(sd, spec, perms)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    d = 8
    expected_head0 = sd[q][2 * d : 3 * d][dims]  # B's head 2 moved to position 0, then reordered
    torch.testing.assert_close(out[q][:d], expected_head0, atol=0, rtol=0)
    torch.testing.assert_close(out[q][d : 2 * d], sd[q][:d], atol=0, rtol=0)  # head 0, in order


def test_activation_matching_ignores_padded_tokens(models):
    model = models["bert"]
    spec = hf_permutation_spec(model.config, model.state_dict().keys())
    b = _permuted_copy(model, spec, _random_perms(spec, seed=5))
    batch = _batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, 6:] = (other["input_ids"][0, 6:] + 7) % VOCAB  # padded positions only
    first = feature_matching(spec, model, b, [batch])
    second = feature_matching(spec, model, b, [other])
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_unknown_model_type_names_it_and_the_supported_ones():
    with pytest.raises(AlignError, match=r"model_type 't5'.*bert, gpt2, llama, mistral, qwen2"):
        hf_permutation_spec(
            {"model_type": "t5"}, ["encoder.block.0.layer.0.SelfAttention.q.weight"]
        )


def test_unplaceable_layer_tensor_is_named(models):
    model = models["llama"]
    names = [*model.state_dict().keys(), "model.layers.1.mlp.extra_proj.weight"]
    with pytest.raises(AlignError, match=r"model.layers.1.mlp.extra_proj.weight.*Known layer"):
        hf_permutation_spec(model.config, names)


def test_layer_beyond_the_config_is_named(models):
    model = models["gpt2"]
    names = [*model.state_dict().keys(), "transformer.h.5.mlp.c_fc.weight"]
    with pytest.raises(AlignError, match=r"transformer.h.5.mlp.c_fc.weight.*layer 5.*2 layers"):
        hf_permutation_spec(model.config, names)


def test_unknown_outside_tensor_refused_only_with_the_residual_stream(models):
    model = models["mistral"]
    names = [*model.state_dict().keys(), "model.extra_head.weight"]
    hf_permutation_spec(model.config, names)  # outside the layers, no layer group touches it
    with pytest.raises(AlignError, match=r"model.extra_head.weight.*residual=False"):
        hf_permutation_spec(model.config, names, residual=True)


def test_names_without_layers_are_refused(models):
    model = models["bert"]
    with pytest.raises(AlignError, match=r"cannot find the layers"):
        hf_permutation_spec(model.config, ["embeddings.word_embeddings.weight"])


def test_components_are_per_layer_without_the_residual_stream(models):
    from brickwork.align.streamed import components

    model = models["mistral"]
    names = model.state_dict().keys()
    parts = components(hf_permutation_spec(model.config, names))
    assert len(parts) == 2 * model.config.num_hidden_layers  # FFN; heads with nested groups
    for part in parts:
        layers = {g.name.split(".")[2] for g in part.groups}
        assert len(layers) == 1
    assert len(components(hf_permutation_spec(model.config, names, residual=True))) == 1


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_streamed_weight_matching_recovers_from_checkpoints(models, kind, tmp_path):
    from safetensors.torch import save_file

    from brickwork.align.streamed import weight_matching_streamed

    model = models[kind]
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    spec = hf_permutation_spec(model.config, sd.keys())
    sd_b = apply_permutations(sd, spec, _random_perms(spec, seed=4))
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(sd_b, str(tmp_path / "b.safetensors"))
    result = weight_matching_streamed(spec, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    back = apply_permutations(sd_b, spec, result.perms)
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor), name
    assert result.objective[-1] > result.objective[0]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "qwen2"])
def test_parent_similarity_accounts_for_the_nested_groups(models, kind):
    """With every other group (the parent's children included) at a random permutation, the
    parent's similarity predicts the objective exactly: objective(P) - objective(Q) =
    Σ_i sim[i, P(i)] - Σ_i sim[i, Q(i)] (Git Re-Basin's linear subproblem, with ⟨A, C(P(B))⟩
    = ⟨C⁻¹(A), P(B)⟩ for the nested groups C)."""
    from brickwork.align.weight_matching import _similarity

    model = models[kind]
    sd_a = model.state_dict()
    spec = hf_permutation_spec(model.config, sd_a.keys())
    sd_b = apply_permutations(sd_a, spec, _random_perms(spec, seed=7))
    perms = _random_perms(spec, seed=8)
    parent = next(g for g in spec.groups if g.name.endswith(".0.heads"))
    assert any(g.parent == parent.name for g in spec.groups)
    sim = _similarity(spec, parent.name, sd_a, sd_b, perms)
    units = torch.arange(parent.size)
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        p, q = (torch.randperm(parent.size, generator=g) for _ in range(2))
        gain = objective(spec, sd_a, sd_b, {**perms, parent.name: p}) - objective(
            spec, sd_a, sd_b, {**perms, parent.name: q}
        )
        predicted = float(sim[units, p].sum() - sim[units, q].sum())
        assert gain == pytest.approx(predicted, rel=1e-9, abs=1e-9)


def test_nested_group_before_its_parent_is_refused(models):
    from brickwork.align.spec import PermutationSpec

    model = models["bert"]
    sd = model.state_dict()
    spec = hf_permutation_spec(model.config, sd.keys())
    child = next(g for g in spec.groups if g.parent is not None)
    wrong = PermutationSpec((child, *(g for g in spec.groups if g is not child)))
    with pytest.raises(AlignError, match=rf"'{child.name}'.*parent '{child.parent}'.*before"):
        weight_matching(wrong, sd, sd)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_residual_stream_of_a_model_without_head_is_refused(kind):
    """A bare encoder / decoder returns the stream itself: permuting it would change the
    function, so residual=True is an error there and fine once a head reads the stream (a
    saved tied LM head shows only in the config's architectures)."""
    from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig

    from brickwork.align import hf_permutation_spec
    from brickwork.errors import AlignError

    cfg = {
        "bert": BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=24),
        "gpt2": GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2),
        "llama": LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=24),
    }[kind]  # fmt: skip
    bare = AutoModel.from_config(cfg)
    names = list(bare.state_dict())
    assert hf_permutation_spec(bare.config, names, residual=False).groups
    with pytest.raises(AlignError, match="without a head.*residual=False"):
        hf_permutation_spec(bare.config, names, residual=True)
    saved = {**bare.config.to_dict(), "architectures": [type(bare).__name__]}
    with pytest.raises(AlignError, match="without a head"):
        hf_permutation_spec(saved, names, residual=True)
    if kind != "bert":  # a saved causal LM with a tied head lists no lm_head tensor
        tied = {**saved, "architectures": ["XForCausalLM"], "tie_word_embeddings": True}
        assert any(
            g.name == "residual" for g in hf_permutation_spec(tied, names, residual=True).groups
        )
