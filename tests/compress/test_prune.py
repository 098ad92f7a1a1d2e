"""Pruning: magnitude, Wanda, SparseGPT; unstructured and N:M (brickwork.compress.prune)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from brickwork.checkpoint.reader import open_checkpoint
from brickwork.compress.prune import (
    _mask_nm,
    magnitude_mask,
    parse_nm,
    prune_module,
    sparsegpt_prune,
    wanda_mask,
)
from brickwork.errors import DataError, OutputExistsError, RecipeError


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def _in_layers(name: str) -> bool:
    return ".layers." in name or ".h." in name


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.rand(d, generator=g) * 3 + 0.1
    return (z @ mix) * scale  # (n, d): correlated features of unequal scales


def _recon(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))  # ‖WX − ŴX‖_F


# -- tensor-level reference tests ------------------------------------------------------------


def test_magnitude_keeps_the_largest_by_sort():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    keep = magnitude_mask(w, sparsity=0.5)
    assert int((~keep).sum()) == 16 * 12
    order = w.abs().reshape(-1).sort(descending=True).indices
    expected = torch.zeros(w.numel(), dtype=torch.bool)
    expected[order[: 16 * 12]] = True
    assert torch.equal(keep.reshape(-1), expected)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_hold_at_most_n(nm):
    n, m = nm
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(64, 32, 1)
    g = x.T @ x
    for keep in (
        magnitude_mask(w, nm=nm),
        wanda_mask(w, torch.diag(g), nm=nm),
        sparsegpt_prune(w, g, nm=nm) != 0,
    ):
        per_group = keep.reshape(8, 32 // m, m).sum(-1)
        assert int(per_group.max()) <= n and int(per_group.min()) == n
    # magnitude N:M keeps the N largest |w| of each group
    keep = _mask_nm(w.abs(), nm).reshape(8, -1, m)
    top = w.abs().reshape(8, -1, m).topk(n, dim=-1).values.min(-1).values
    dropped = torch.where(keep, torch.inf, w.abs().reshape(8, -1, m)).amin(-1)
    assert torch.all(w.abs().reshape(8, -1, m).masked_fill(~keep, -1).amax(-1) >= top)
    assert torch.all((dropped == torch.inf) | (dropped <= top))


def test_wanda_keeps_the_top_scores_of_each_row():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(50, 20, 2)  # (tokens, in)
    keep = wanda_mask(w, torch.diag(x.T @ x), sparsity=0.5)
    # the paper's score written out: S_ij = |W_ij| * ||X_j||_2, top half of each row kept
    score = w.abs() * torch.sqrt((x**2).sum(0)).unsqueeze(0)
    for i in range(12):
        kept = set(torch.argsort(score[i], descending=True)[:10].tolist())
        assert set(torch.nonzero(keep[i]).flatten().tolist()) == kept


def test_sparsegpt_at_zero_sparsity_is_the_weight():
    w = torch.randn(6, 16)
    x = _correlated_inputs(40, 16, 3)
    assert torch.equal(sparsegpt_prune(w, x.T @ x, sparsity=0.0), w)


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"nm": (2, 4)}, {"sparsity": 0.7}])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    torch.manual_seed(0)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4))  # two blocks of 128
    x = _correlated_inputs(1024, 256, 4)
    g = x.T @ x
    sg = sparsegpt_prune(w, g, **pattern)
    wa = w * wanda_mask(w, torch.diag(g), **pattern)
    mg = w * magnitude_mask(w, **pattern)
    if "sparsity" in pattern:  # exact per-block count: round(s * 32 * 128) per block
        assert float((sg == 0).float().mean()) == pytest.approx(pattern["sparsity"], abs=1e-3)
    e_sg, e_wa, e_mg = _recon(w, sg, x), _recon(w, wa, x), _recon(w, mg, x)
    assert e_sg < e_wa and e_sg < e_mg, (e_sg, e_wa, e_mg)


def test_option_errors():
    with pytest.raises(RecipeError, match="N=4, M=4"):
        parse_nm("4:4")
    with pytest.raises(RecipeError, match="N=0"):
        parse_nm("0:4")
    with pytest.raises(RecipeError, match="not an N:M pattern"):
        parse_nm("2-4")


# -- module level ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    p = tmp_path_factory.mktemp("calib") / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 128, (16, 24), generator=g)}, str(p))
    return p


def _module(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_module_sequential_first_layer_equals_dense_inputs(llama_family, calib):
    model = _module(llama_family.base)
    batches = [{"input_ids": load_file(str(calib))["input_ids"][i : i + 8]} for i in (0, 8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seq = prune_module(model, "sparsegpt", sparsity=0.5, batches=batches, sequential=True)
    par = prune_module(model, "sparsegpt", sparsity=0.5, batches=batches, sequential=False)
    for n in seq.tensors:
        if ".layers.0." in n:
            assert torch.allclose(seq.tensors[n], par.tensors[n], atol=1e-5), n
    assert any(
        not torch.allclose(seq.tensors[n], par.tensors[n]) for n in seq.tensors if ".layers.1." in n
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    # reconstruction on the calibration inputs of the first layer (same for both orders)
    from brickwork import statistics_for

    stats = statistics_for(model, batches, "gram")
    wan = prune_module(model, "wanda", sparsity=0.5, batches=batches)
    mag = prune_module(model, "magnitude", sparsity=0.5)
    for n in seq.tensors:
        if ".layers.0." not in n:
            continue
        g, w = stats.get(n).double(), before[n].double()

        def err(t, g=g, w=w):
            d = w - t.double()
            return float(torch.trace(d @ g @ d.T))

        assert err(seq.tensors[n]) <= min(err(wan.tensors[n]), err(mag.tensors[n])), n


# -- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,args",
    [
        ("magnitude", ["--sparsity", "0.5"]),
        ("wanda", ["--sparsity", "0.5"]),
        ("sparsegpt", ["--sparsity", "0.5"]),
        ("wanda", ["--nm", "2:4"]),
        ("sparsegpt", ["--nm", "4:8"]),
    ],
)
def test_cli_prunes_to_the_target(run_cli, tmp_path, llama_family, calib, method, args):
    from transformers import AutoModelForCausalLM

    base = llama_family.base
    digest = open_checkpoint(base).checksum()
    data = [] if method == "magnitude" else ["--data", calib]
    out = tmp_path / "pruned"
    code, stdout, err = run_cli("compress", "prune", base, out, "--method", method, *args, *data)
    assert code == 0, err
    assert "measured sparsity 0.5000" in stdout
    w, orig = _weights(out), _weights(base)
    rec = json.loads((out / "brickwork.json").read_text())
    pruned = [n for n in orig if _in_layers(n) and orig[n].dim() == 2]
    assert sorted(rec["measured_sparsity"]["per_tensor"]) == sorted(pruned)
    for n, t in w.items():
        if n in pruned:
            assert float((t == 0).float().mean()) == 0.5, n
            assert rec["measured_sparsity"]["per_tensor"][n] == 0.5
            if "--nm" in args:
                n_, m_ = parse_nm(args[1])
                assert int((t != 0).reshape(t.shape[0], -1, m_).sum(-1).max()) <= n_
        else:
            assert torch.equal(t, orig[n]), n  # embeddings, norms, head unchanged
    if method == "magnitude":
        for n in pruned:  # exactly the magnitude mask
            assert torch.equal(w[n] != 0, magnitude_mask(orig[n], sparsity=0.5))
    else:
        assert rec["calibration"]["data_hash"] and rec["calibration"]["files"][0]["sha256"]
        assert rec["sequential"] is (method == "sparsegpt")
    assert rec["method"] == method and (out / "README.md").read_text().startswith("---")
    AutoModelForCausalLM.from_pretrained(str(out))  # loads in transformers
    assert open_checkpoint(base).checksum() == digest  # input untouched


def test_cli_global_magnitude(run_cli, tmp_path, llama_family):
    out = tmp_path / "g"
    code, _, err = run_cli(
        "compress", "prune", llama_family.base, out, "--sparsity", "0.6", "--scope", "global"
    )
    assert code == 0, err
    w, orig = _weights(out), _weights(llama_family.base)
    pruned = [n for n in orig if _in_layers(n) and orig[n].dim() == 2]
    kept = torch.cat([orig[n][w[n] != 0].abs() for n in pruned])
    gone = torch.cat([orig[n][w[n] == 0].abs() for n in pruned])
    total = kept.numel() + gone.numel()
    assert gone.numel() == round(0.6 * total)
    assert float(gone.max()) <= float(kept.min())  # one threshold over all tensors
    per = [float((w[n] == 0).float().mean()) for n in pruned]
    assert max(per) - min(per) > 0.01  # ... so per-tensor sparsities differ


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = ["the cat sat on the mat", "a dog ran in the park", "rain fell on the town"] * 4
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    root = tmp_path_factory.mktemp("gpt2p")
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    m.save_pretrained(root / "m")
    fast.save_pretrained(root / "m")
    (root / "calib.txt").write_text("\n".join(corpus) + "\n")
    return root / "m", root / "calib.txt"


def test_cli_gpt2_conv1d_nm_along_inputs(run_cli, tmp_path, gpt2_dir):
    from transformers import AutoModelForCausalLM

    model, text = gpt2_dir
    out = tmp_path / "o"
    code, _, err = run_cli(
        "compress", "prune", model, out, "--method", "sparsegpt", "--nm", "2:4", "--data", text
    )
    assert code == 0, err
    w = _weights(out)
    pruned = [n for n in w if ".h." in n and n.endswith(".weight") and w[n].dim() == 2]
    assert len(pruned) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    for n in pruned:
        t = w[n].T  # Conv1D stores (in, out): groups run along the input axis 0
        assert int((t != 0).reshape(t.shape[0], -1, 4).sum(-1).max()) <= 2, n
    rec = json.loads((out / "brickwork.json").read_text())
    assert rec["calibration"]["tokens"] > 0 and rec["nm"] == "2:4"
    AutoModelForCausalLM.from_pretrained(str(out))


def test_cli_errors(run_cli, tmp_path, llama_family, calib):
    base = llama_family.base
    digest = open_checkpoint(base).checksum()
    cases = [
        (["--sparsity", "1.0"], "must be in [0, 1)"),
        (["--sparsity", "-0.1"], "must be in [0, 1)"),
        (["--nm", "4:4"], "1 <= N < M"),
        (["--nm", "2:5"], "not divisible by M=5"),
        (["--method", "wanda", "--sparsity", "0.5"], "needs calibration data"),
        (["--method", "sparsegpt", "--nm", "2:4"], "needs calibration data"),
        (["--sparsity", "0.5", "--nm", "2:4"], "exactly one of"),
        ([], "exactly one of"),
        (["--method", "obs", "--sparsity", "0.5"], "Unknown pruning method 'obs'"),
        (
            ["--method", "wanda", "--sparsity", "0.5", "--scope", "global", "--data", calib],
            "global",
        ),
    ]
    for args, msg in cases:
        code, _, err = run_cli("compress", "prune", base, tmp_path / "x", *args)
        assert code != 0 and msg in err, (args, err)
        assert not (tmp_path / "x").exists()
    (tmp_path / "exists").mkdir()
    code, _, err = run_cli("compress", "prune", base, tmp_path / "exists", "--sparsity", "0.5")
    assert code != 0 and "already exists" in err
    code, _, err = run_cli("compress", "prune", base, base / "inner", "--sparsity", "0.5")
    assert code != 0 and "overlaps input" in err
    assert open_checkpoint(base).checksum() == digest


def test_python_errors(llama_family):
    model = _module(llama_family.base)
    with pytest.raises(DataError, match="needs calibration data"):
        prune_module(model, "sparsegpt", sparsity=0.5)
    with pytest.raises(RecipeError, match="not divisible"):
        prune_module(model, "magnitude", nm="3:7")
    with pytest.raises(OutputExistsError):
        from brickwork.compress.prune import prune

        prune(llama_family.base, llama_family.ft1, sparsity=0.5)


def test_cli_config_without_architectures(run_cli, tmp_path, llama_family, calib):
    """A config without ``architectures`` loads as the bare LlamaModel (``layers.0...``); the
    pruned tensors are written under the checkpoint's own names (``model.layers.0...``)."""
    import shutil

    src = tmp_path / "noarch"
    shutil.copytree(llama_family.base, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("architectures", None)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    code, _, err = run_cli(
        "compress", "prune", src, out, "--method", "wanda", "--sparsity", "0.5", "--data", calib
    )
    assert code == 0, err
    w = _weights(out)
    assert float((w["model.layers.0.mlp.up_proj.weight"] == 0).float().mean()) == 0.5


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_zero_sparsity_returns_the_model(llama_family, calib, method):
    model = _module(llama_family.base)
    batches = [{"input_ids": load_file(str(calib))["input_ids"][:8]}]
    res = prune_module(model, method, sparsity=0.0, batches=batches)
    sd = model.state_dict()
    assert res.tensors and all(torch.equal(t, sd[n]) for n, t in res.tensors.items())


def test_ties_at_the_threshold_prune_exactly_the_count():
    w = torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0, 2.0, -1.0, 3.0]])
    keep = magnitude_mask(w, sparsity=0.5)  # 4 of 8: the 0.5 and the first three |1.0|
    assert keep.tolist() == [[False, False, False, False, True, True, True, True]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_magnitude_mask_counts_bits_exactly_like_kthvalue(dtype):
    # 16-bit weights are thresholded on their |w| bit patterns by counting (issue 12: no
    # float32 copy, no kthvalue indices); the mask must be the float32 kthvalue one, ties
    # (many in 16 bits), zeros and -0.0 included.
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 700, generator=g) * 0.02).to(dtype)
    w[0, :50] = 0.0
    w[1, :30] = -0.0
    w[2, :20] = -w[3, :20]
    flat = w.abs().float().reshape(-1)
    for s in (0.0, 0.1, 0.5, 0.77, 1.0):
        n = round(s * w.numel())
        keep = magnitude_mask(w, sparsity=s)
        assert int((~keep).sum()) == n
        if 0 < n < w.numel():
            v = torch.kthvalue(flat, n).values
            ref = flat > v  # below v pruned; among ties the first ones by position
            ties = torch.nonzero(flat == v).flatten()
            ref[ties[n - (flat.numel() - int(ref.sum()) - ties.numel()) :]] = True
            assert torch.equal(keep.reshape(-1), ref), s
        tiny = w[:4, :8].float() * torch.tensor([1.0, -1.0] * 4)  # same mask from float32
        assert torch.equal(magnitude_mask(w[:4, :8], sparsity=s), magnitude_mask(tiny, sparsity=s))
