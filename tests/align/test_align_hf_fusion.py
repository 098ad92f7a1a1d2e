"""OT fusion and ZipIt on Hugging Face transformers, in Python and from model directories.

Properties (STYLE.md §5): exact OT of B onto A (equal widths) is a permutation and B' computes
B's function (1e-5) on tiny Llama, GPT-2 and BERT, with and without the residual stream; OT
of a randomly permuted copy of A recovers the permutation and A's weights (weight and
activation cost); a copy of A whose FFN units are duplicated (outgoing weights halved) is
transported back into A's widths and computes A's function; zipping A with a permuted copy
gives A; the written outputs load in transformers (A's shapes for other widths); inputs are
untouched. Reference (§6): a zipped norm's weight is ``M [w_A; w_B]`` and a zipped FFN input
row is ``M [W_A U_A^res; W_B U_B^res]``. Streamed file weight matching equals in-memory
weight matching.
"""

from __future__ import annotations

import json

import pytest
import torch

import brickwork
from brickwork.align.ot_fusion import fusion_spec, plan_is_permutation
from brickwork.align.spec import apply_permutations
from brickwork.errors import AlignError

pytest.importorskip("transformers")
pytest.importorskip("ot")

KINDS = ["llama", "gpt2", "bert"]


def _config(kind: str, **kw):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if kind == "llama":
        args = dict(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False,
        )  # fmt: skip
        return LlamaConfig(**{**args, **kw})
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
            eos_token_id=0, **kw,
        )  # fmt: skip
    args = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    return BertConfig(**{**args, **kw})


def _model(kind: str, seed: int, **kw):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    cfg = _config(kind, **kw)
    cfg._attn_implementation = "eager"
    cls = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def _out(model, ids):
    """Logits, or BERT's pooler output (the stream itself is permuted with residual=True)."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def _ids(seed: int = 0, n: int = 2):
    return torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(seed))


def _batches():
    out = []
    for s in range(3):
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[:2, 9:] = 0  # some padding
        out.append({"input_ids": _ids(s, 8), "attention_mask": mask})
    return out


def _permuted(model, spec, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    perms = {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}
    p = _model(_kind(model), 0)
    p.load_state_dict(apply_permutations(model.state_dict(), spec, perms))
    return p, perms


def _kind(model) -> str:
    return {"llama": "llama", "gpt2": "gpt2", "bert": "bert"}[model.config.model_type]


@pytest.fixture(scope="module")
def pairs():
    return {k: (_model(k, 0), _model(k, 1)) for k in KINDS}


def _sd_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- OT, Python ------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_ot_emd_is_a_permutation_and_keeps_b(pairs, kind, residual):
    a, b = pairs[kind]
    before = _sd_copy(b)
    b2, plans = brickwork.align(a, b, method="ot", residual=residual)
    spec = fusion_spec(a, residual=residual)
    assert set(plans) == {g.name for g in spec.groups}
    assert ("residual" in plans) == residual
    perms = {k: plan_is_permutation(p.double()) for k, p in plans.items()}
    assert all(p is not None for p in perms.values())
    assert sum(int((p != torch.arange(len(p))).sum()) for p in perms.values()) > 0
    ids = _ids()
    torch.testing.assert_close(_out(b2, ids), _out(b, ids), atol=1e-5, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())  # B untouched


@pytest.mark.parametrize("with_data", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_ot_of_a_permuted_copy_recovers_permutation_and_weights(pairs, kind, with_data):
    a, _ = pairs[kind]
    residual = not with_data  # weight cost with the stream, activation cost without it
    spec = fusion_spec(a, residual=residual)
    p, perms = _permuted(a, spec)
    data = _batches() if with_data else None
    a2, plans = brickwork.align(a, p, method="ot", data=data, residual=residual)
    for name, perm in perms.items():
        assert torch.equal(plan_is_permutation(plans[name].double()), torch.argsort(perm)), name
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in a2.state_dict().items())


def test_ot_fusion_spec_has_no_nested_groups_and_heads_as_kv_blocks(pairs):
    a, _ = pairs["llama"]
    spec = fusion_spec(a)
    assert all(g.parent is None for g in spec.groups)
    heads = spec["model.layers.0.heads"]
    assert heads.size == 2  # two KV groups, each with its two query heads
    assert {m.block for m in heads.members} == {8, 16}  # head_dim 8; 2 query heads x 8


def test_sinkhorn_is_a_soft_map_that_no_longer_computes_b(pairs):
    a, b = pairs["llama"]
    b2, plans = brickwork.align(a, b, method="ot", solver="sinkhorn", reg=0.5)
    plan = plans["model.layers.0.mlp"].double()
    assert plan_is_permutation(plan) is None
    torch.testing.assert_close(plan.sum(0), torch.full((48,), 1 / 48, dtype=torch.float64))
    assert (_out(b2, _ids()) - _out(b, _ids())).abs().max() > 1e-3


def _widened(a, factor: int = 2):
    """A with every FFN unit repeated ``factor`` times and its down-projection column divided
    by ``factor``: the same function at ``factor`` times the FFN width."""
    cfg = a.config.to_dict()
    w = _model("llama", 3, intermediate_size=cfg["intermediate_size"] * factor)
    sd = {}
    for k, v in a.state_dict().items():
        if k.endswith(("gate_proj.weight", "up_proj.weight")):
            v = v.repeat_interleave(factor, 0)
        elif k.endswith("down_proj.weight"):
            v = v.repeat_interleave(factor, 1) / factor
        sd[k] = v
    w.load_state_dict(sd)
    return w


def test_a_widened_copy_is_transported_back_into_a(pairs):
    a, _ = pairs["llama"]
    w = _widened(a)
    ids = _ids()
    torch.testing.assert_close(_out(w, ids), _out(a, ids), atol=1e-5, rtol=0)  # premise
    back, plans = brickwork.align(a, w, method="ot")
    assert tuple(plans["model.layers.0.mlp"].shape) == (96, 48)
    assert back.config.intermediate_size == 48
    torch.testing.assert_close(_out(back, ids), _out(a, ids), atol=1e-5, rtol=0)


def test_ot_refuses_other_layer_structures(pairs):
    a, _ = pairs["llama"]
    with pytest.raises(AlignError, match="layer structures"):
        brickwork.align(a, _model("llama", 1, num_hidden_layers=3), method="ot")


# -- ZipIt, Python ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_zipping_a_with_a_permuted_copy_gives_a(pairs, kind):
    a, _ = pairs[kind]
    spec = fusion_spec(a, residual=True)
    p, _ = _permuted(a, spec)
    z, merges = brickwork.align(a, p, method="zip", data=_batches())
    assert "residual" in merges and len(merges) == len(spec.groups)
    for name, m in merges.items():  # each merged unit averages one unit of A and one of P
        torch.testing.assert_close(m.sum(1), torch.ones(m.shape[0]))
        n = m.shape[0]
        assert ((m[:, :n] > 0).sum(1) == 1).all() and ((m[:, n:] > 0).sum(1) == 1).all(), name
    torch.testing.assert_close(_out(z, _ids()), _out(a, _ids()), atol=1e-5, rtol=0)


def test_zipped_norm_and_ffn_input_are_the_merge_formula(pairs):
    from brickwork.align.zipit import zip_transformers

    a, b = pairs["llama"]
    z, merges = zip_transformers([a, b], _batches())
    sa, sb, sz = a.state_dict(), b.state_dict(), z.state_dict()
    m_res = merges["residual"].double()  # (32, 64)
    n = m_res.shape[0]
    # unmerge U = M^T normalised so each merged unit maps back to its members: U[f, c] = 1
    u_res = (m_res > 0).double().T  # (64, 32)
    norm = "model.layers.1.post_attention_layernorm.weight"
    want = m_res @ torch.cat([sa[norm], sb[norm]]).double()
    torch.testing.assert_close(sz[norm].double(), want, atol=1e-6, rtol=0)
    m_ffn = merges["model.layers.0.mlp"].double()  # (48, 96)
    up = "model.layers.0.mlp.up_proj.weight"
    stacked = torch.cat([sa[up].double() @ u_res[:n], sb[up].double() @ u_res[n:]])  # (96, 32)
    torch.testing.assert_close(sz[up].double(), m_ffn @ stacked, atol=1e-6, rtol=0)
    assert (_out(z, _ids()) - _out(a, _ids())).abs().max() > 1e-3  # a merge, not A


def test_heads_false_reaches_ot_and_zip_and_spec_is_refused(pairs):
    """``brickwork.align(heads=False)`` leaves the heads out of OT and ZipIt as the file path
    does (no head group in the maps); ``spec=`` is refused for both, not ignored."""
    a, b = pairs["llama"]
    with_heads = {g.name for g in fusion_spec(a).groups}
    without = {g.name for g in fusion_spec(a, heads=False).groups}
    assert without < with_heads
    _, plans = brickwork.align(a, b, method="ot", heads=False)
    assert set(plans) == without
    _, merges = brickwork.align(a, b, method="zip", data=_batches(), heads=False)
    assert set(merges) == {g.name for g in fusion_spec(a, residual=True, heads=False).groups}
    for method in ("ot", "zip"):
        with pytest.raises(AlignError, match="spec= is used by method='weight'"):
            brickwork.align(a, b, method=method, data=_batches(), spec=fusion_spec(a))


def test_zip_needs_data(pairs):
    from brickwork.errors import DataError

    a, b = pairs["gpt2"]
    with pytest.raises(DataError, match="calibration data"):
        brickwork.align(a, b, method="zip")


# -- model directories -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, pairs):
    root = tmp_path_factory.mktemp("hf-fusion")
    out = {}
    for kind, (a, b) in pairs.items():
        for name, m in (("A", a), ("B", b)):
            m.save_pretrained(root / kind / name)
            out[kind, name] = root / kind / name
    a = pairs["llama"][0]
    _widened(a).save_pretrained(root / "llama" / "W")
    out["llama", "W"] = root / "llama" / "W"
    return out


def _digest(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def _load(kind, path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def _ids_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"input_ids": _ids(3, 48)}, tmp_path / "ids.safetensors")
    return tmp_path / "ids.safetensors"


@pytest.mark.parametrize("kind", KINDS)
def test_cli_ot_writes_b_transported_that_computes_b(run_cli, tmp_path, dirs, kind):
    a_dir, b_dir = dirs[kind, "A"], dirs[kind, "B"]
    before = (_digest(a_dir), _digest(b_dir))
    code, out, err = run_cli("align", a_dir, b_dir, tmp_path / "out", "--method", "ot", "-q")
    assert code == 0, out + err
    b, b2 = _load(kind, b_dir), _load(kind, tmp_path / "out")
    torch.testing.assert_close(_out(b2, _ids()), _out(b, _ids()), atol=1e-5, rtol=0)
    prov = json.loads((tmp_path / "out" / "brickwork.json").read_text())
    s = prov["alignment"]
    assert s["method"] == "ot" and s["solver"] == "emd" and s["computes_b_exactly"] is True
    assert s["config"] == "B" and s["units_moved"] > 0 and "reg" not in s
    plans = json.loads((tmp_path / "out" / "brickwork_transport.json").read_text())
    assert len(plans) == s["groups"] and all(p["permutation"] for p in plans.values())
    assert (_digest(a_dir), _digest(b_dir)) == before


def test_cli_ot_transports_other_ffn_widths_into_a(run_cli, tmp_path, dirs):
    a_dir, w_dir = dirs["llama", "A"], dirs["llama", "W"]
    code, out, err = run_cli("align", a_dir, w_dir, tmp_path / "out", "--method", "ot", "-q")
    assert code == 0, out + err
    a, back = _load("llama", a_dir), _load("llama", tmp_path / "out")
    assert back.config.intermediate_size == 48
    assert {k: v.shape for k, v in back.state_dict().items()} == {
        k: v.shape for k, v in a.state_dict().items()
    }
    torch.testing.assert_close(_out(back, _ids()), _out(a, _ids()), atol=1e-5, rtol=0)
    s = json.loads((tmp_path / "out" / "brickwork.json").read_text())["alignment"]
    assert s["config"] == "A" and s["computes_b_exactly"] is False


def test_cli_ot_sinkhorn_and_activation_cost(run_cli, tmp_path, dirs):
    a_dir, b_dir = dirs["gpt2", "A"], dirs["gpt2", "B"]
    args = ("align", a_dir, b_dir)
    code, out, err = run_cli(
        *args, tmp_path / "s", "--method", "ot", "--solver", "sinkhorn", "--reg", "0.5", "-q"
    )
    assert code == 0, out + err
    s = json.loads((tmp_path / "s" / "brickwork.json").read_text())["alignment"]
    assert s["solver"] == "sinkhorn" and s["reg"] == 0.5 and s["computes_b_exactly"] is False
    b, bs = _load("gpt2", b_dir), _load("gpt2", tmp_path / "s")  # loads; only approximates B
    assert (_out(bs, _ids()) - _out(b, _ids())).abs().max() > 1e-3
    ids = _ids_file(tmp_path)
    code, out, err = run_cli(*args, tmp_path / "d", "--method", "ot", "--data", ids, "-q")
    assert code == 0, out + err
    s = json.loads((tmp_path / "d" / "brickwork.json").read_text())["alignment"]
    assert s["cost"] == "activation" and s["computes_b_exactly"] is True
    torch.testing.assert_close(
        _out(_load("gpt2", tmp_path / "d"), _ids()), _out(b, _ids()), atol=1e-5, rtol=0
    )


def test_cli_help_says_sinkhorn_is_soft(run_cli):
    code, out, _ = run_cli("align", "--help")
    assert code == 0 and "sinkhorn" in out and "soft map" in out and "zip" in out


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_cli_zip_writes_a_merge_with_a_config_and_its_losses(run_cli, tmp_path, dirs, kind):
    a_dir, b_dir = dirs[kind, "A"], dirs[kind, "B"]
    ids = _ids_file(tmp_path)
    code, out, err = run_cli(
        "align", a_dir, b_dir, tmp_path / "z", "--method", "zip", "--data", ids, "-q"
    )
    assert code == 0, out + err
    z, a = _load(kind, tmp_path / "z"), _load(kind, a_dir)
    assert z.config.to_dict()["hidden_size"] == a.config.hidden_size
    assert (_out(z, _ids()) - _out(a, _ids())).abs().max() > 1e-4  # a merge, neither input
    prov = json.loads((tmp_path / "z" / "brickwork.json").read_text())
    assert prov["kind"] == "zip" and prov["alignment"]["method"] == "zip"
    loss = prov["alignment"]["calibration_loss"]
    if kind == "llama":
        assert all(isinstance(loss[k], float) for k in ("A", "B", "average", "zipped"))
    else:
        assert loss["zipped"] is None and "no language-model head" in loss["note"]


def test_cli_zip_needs_data(run_cli, tmp_path, dirs):
    code, _, err = run_cli(
        "align", dirs["llama", "A"], dirs["llama", "B"], tmp_path / "z", "--method", "zip"
    )
    assert code != 0 and "--data" in err and not (tmp_path / "z").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_file_weight_matching_equals_in_memory_matching(dirs, kind, pairs):
    from brickwork.align.files import AlignOptions, align_checkpoints, checkpoint_spec
    from brickwork.align.weight_matching import weight_matching
    from brickwork.checkpoint.reader import open_checkpoint

    a, b = pairs[kind]
    ck_a, ck_b = open_checkpoint(dirs[kind, "A"]), open_checkpoint(dirs[kind, "B"])
    options = AlignOptions(seed=3, within_head=kind == "llama")  # nested groups: one kind
    spec = checkpoint_spec(ck_a, "A", options)
    assert all(g.name != "residual" for g in spec.groups)  # the streamed path
    got = align_checkpoints(ck_a, ck_b, options).perms
    want = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3).perms
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in want.values())


def test_cli_ot_errors_name_the_problem(run_cli, tmp_path, dirs):
    from safetensors.torch import load_file, save_file

    a_dir = dirs["llama", "A"]
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(dirs["llama", "B"] / "model.safetensors"), bare)
    code, _, err = run_cli("align", a_dir, bare, tmp_path / "o1", "--method", "ot")
    assert code != 0 and "config.json" in err
    _model("llama", 1, num_hidden_layers=3).save_pretrained(tmp_path / "deep")
    code, _, err = run_cli("align", a_dir, tmp_path / "deep", tmp_path / "o2", "--method", "ot")
    assert code != 0 and "layer structures" in err and "model B" in err
    args = ("align", a_dir, dirs["llama", "B"], tmp_path / "o3", "--method", "ot")
    code, _, err = run_cli(*args, "--solver", "sinkorn")
    assert code != 0 and "sinkhorn" in err and "emd" in err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_zip_without_heads_merges_stream_and_ffn_only(pairs):
    from brickwork.align.zipit import zip_transformers

    a, _ = pairs["llama"]
    p, _ = _permuted(a, fusion_spec(a, residual=True, heads=False))
    z, merges = zip_transformers([a, p], _batches(), heads=False)
    assert sorted(merges) == ["model.layers.0.mlp", "model.layers.1.mlp", "residual"]
    torch.testing.assert_close(_out(z, _ids()), _out(a, _ids()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("residual", [False, True])
def test_file_ot_per_component_equals_whole_spec_transport(dirs, residual):
    from brickwork.align.files import AlignOptions, _spec_tensors, _weight_transport
    from brickwork.align.ot_fusion import hf_fusion_spec, transport_maps_of_states
    from brickwork.checkpoint.reader import open_checkpoint

    a, b = open_checkpoint(dirs["llama", "A"]), open_checkpoint(dirs["llama", "W"])
    spec_a = hf_fusion_spec(a.config, a.names, residual=residual)
    spec_b = hf_fusion_spec(b.config, b.names, residual=residual)
    options = AlignOptions(method="ot", solver="sinkhorn", reg=0.1)
    got = _weight_transport(a, b, spec_a, spec_b, options)
    sd_a, sd_b = _spec_tensors(a, spec_a), _spec_tensors(b, spec_b)
    want = transport_maps_of_states(spec_a, spec_b, sd_a, sd_b, solver="sinkhorn", reg=0.1)
    assert got.plan.keys() == want.plan.keys()
    for k in want.plan:
        torch.testing.assert_close(got.plan[k], want.plan[k], atol=1e-12, rtol=0)
