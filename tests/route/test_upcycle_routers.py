"""Router initialisation (hidden, cheap_embed, task) and router training for upcycled MoEs.

Tiny Llamas with a character-level tokenizer; three "domains" of text that a random
model still tells apart: digits, lowercase letters, punctuation.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from _helpers import TINY_LM
from safetensors.torch import load_file

from brickwork.errors import BrickworkError, CheckpointError, RecipeError
from brickwork.route.moe import load_balancing_loss
from brickwork.route.routers import RouterData
from brickwork.route.upcycle import upcycle_moe

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

_KW = TINY_LM
_ALPHABETS = ("0123456789 ", "abcdefghij ", "!?.,;:-+*/")


def char_tokenizer():
    """ASCII characters are their own ids (vocab 128); ``<s>`` is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {chr(i): i for i in range(3, 128)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _texts(alphabet: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(16)) for _ in range(n)]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("routers")
    tok = char_tokenizer()
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_KW)).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    fts = []
    for i in range(3):  # fine-tunes whose FFNs differ a lot, so routing changes the loss
        ft = transformers.LlamaForCausalLM(base.config)
        ft.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in ft.named_parameters():
                if ".mlp." in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        ft.save_pretrained(root / f"ft{i}")
        fts.append(root / f"ft{i}")
    texts = [_texts(a, 8, seed=i) for i, a in enumerate(_ALPHABETS)]
    return root, base, tok, fts, texts


def _mlp_inputs(model, tok, texts):
    """Independent of brickwork: mean post_attention_layernorm output per layer, per text."""
    seen = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out, i=i: seen.__setitem__(i, out)
        )
        for i, layer in enumerate(model.model.layers)
    ]
    rows = []
    with torch.no_grad():
        for t in texts:
            model(tok(t, return_tensors="pt")["input_ids"])
            rows.append(torch.stack([seen[i][0].mean(0) for i in range(len(seen))]))
    for h in hooks:
        h.remove()
    return torch.stack(rows)  # (texts, layers, hidden)


def _gates(out, fmt="block_sparse_moe"):
    sd = load_file(out / "model.safetensors")
    return torch.stack([sd[f"model.layers.{i}.{fmt}.gate.weight"] for i in range(2)])


def _own_expert_share(out, tok, texts) -> torch.Tensor:
    """(domains, experts): share of each domain's tokens whose top-1 expert is e."""
    moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    shares = []
    for domain in texts:
        ids = tok(domain, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = moe(ids, output_router_logits=True).router_logits  # per layer (tokens, E)
        top = torch.cat([x.argmax(-1) for x in logits])
        shares.append(torch.bincount(top, minlength=3).float() / top.numel())
    return torch.stack(shares)


def test_hidden_rows_are_unit_prompt_means_and_route_by_domain(fam, tmp_path):
    root, base, tok, fts, texts = fam
    pos = [t[:4] for t in texts]
    neg = [[], texts[0][4:6], []]  # expert 1: away from digits
    data = RouterData(positive_prompts=pos, negative_prompts=neg)
    out = upcycle_moe(root / "base", fts, tmp_path / "moe", router_init="hidden",
                      router_data=data)  # fmt: skip
    want = torch.stack(
        [
            _mlp_inputs(base, tok, p).mean(0) - (_mlp_inputs(base, tok, n).mean(0) if n else 0)
            for p, n in zip(pos, neg)
        ],
        dim=1,
    )  # (layers, experts, hidden)
    torch.testing.assert_close(_gates(out), torch.nn.functional.normalize(want, dim=-1))
    share = _own_expert_share(out, tok, texts)
    assert bool((share.argmax(1) == torch.arange(3)).all()), share


def test_task_rows_are_scaled_centred_centroids_and_route_by_domain(fam, tmp_path):
    root, base, tok, fts, texts = fam
    data = RouterData(examples=texts, task_scale=2.0)
    out = upcycle_moe(root / "base", fts, tmp_path / "moe", router_init="task",
                      router_data=data)  # fmt: skip
    x = [_mlp_inputs(base, tok, t) for t in texts]  # (n, layers, hidden) each
    c = torch.stack([xi.mean(0) for xi in x], dim=1)  # (layers, experts, hidden)
    centred = c - c.mean(1, keepdim=True)
    gates = _gates(out)
    cos = torch.nn.functional.cosine_similarity(gates, centred, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    logits = torch.einsum("nlh,leh->nle", torch.cat(x), gates)  # (examples, layers, experts)
    spread = logits.std(dim=-1, unbiased=False).mean(0)  # the documented scale, per layer
    torch.testing.assert_close(spread, torch.full((2,), 2.0), atol=1e-4, rtol=1e-4)
    share = _own_expert_share(out, tok, texts)
    assert bool((share.argmax(1) == torch.arange(3)).all()), share
    assert bool((share.diagonal() > 0.5).all()), share


def test_cheap_embed_rows_are_mean_prompt_embeddings(fam, tmp_path):
    root, base, tok, fts, texts = fam
    pos = [t[:3] for t in texts]
    out = upcycle_moe(root / "base", fts, tmp_path / "moe", router_init="cheap_embed",
                      router_data=RouterData(positive_prompts=pos))  # fmt: skip
    emb = base.model.embed_tokens.weight.detach()
    ids = [torch.tensor([i for t in p for i in tok(t)["input_ids"]]) for p in pos]
    want = torch.stack([emb[x].mean(0) for x in ids])  # (experts, hidden)
    gates = _gates(out)
    for layer in range(2):
        torch.testing.assert_close(gates[layer], torch.nn.functional.normalize(want, dim=-1))


def _objective(out, tok, texts, coef: float) -> float:
    """LM loss + coef * load-balancing loss of the exported model, one text at a time."""
    moe = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    k = moe.config.num_experts_per_tok
    total = 0.0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            o = moe(ids, labels=ids, output_router_logits=True)
            lm = o.loss - moe.config.router_aux_loss_coef * o.aux_loss  # transformers adds it
            total += float(lm) + coef * float(load_balancing_loss(o.router_logits, k))
    return total / len(texts)


@pytest.mark.parametrize("shared", [False, True])
def test_train_lowers_its_objective_and_changes_only_routers(fam, tmp_path, shared):
    root, _, tok, fts, texts = fam
    mixed = [t for domain in texts for t in domain]
    common = dict(router_data=RouterData(examples=texts, train_steps=40, train_lr=0.05,
                                         aux_loss_coef=0.1, train_batch_size=4),
                  shared_expert=root / "base" if shared else None, seed=1)  # fmt: skip
    start = upcycle_moe(root / "base", fts, tmp_path / "task", router_init="task", **common)
    trained = upcycle_moe(root / "base", fts, tmp_path / "train", router_init="train", **common)
    a, b = load_file(start / "model.safetensors"), load_file(trained / "model.safetensors")
    assert a.keys() == b.keys()
    routers = {n for n in a if n.endswith("gate.weight") and "shared" not in n}
    assert len(routers) == 2
    for n in a:
        if n in routers:
            assert not torch.equal(a[n], b[n]), n
        else:
            assert torch.equal(a[n], b[n]), n
    stats = json.loads((trained / "brickwork.json").read_text())["settings"]["router_stats"]
    assert stats["train_objective_after"] < stats["train_objective_before"]
    # the same objective, recomputed by transformers on the two checkpoints
    assert _objective(trained, tok, mixed, 0.1) < _objective(start, tok, mixed, 0.1)
    # the in-memory MoE that was trained is the exported one: its objective before training,
    # on the training batches (shuffled by the seed, 4 a batch, right-padded), is the
    # transformers model's on the task-initialised checkpoint
    ids = [tok(t)["input_ids"] for domain in texts for t in domain]
    random.Random(1).shuffle(ids)
    moe = transformers.AutoModelForCausalLM.from_pretrained(start).eval()
    total = []
    with torch.no_grad():
        for s in range(0, len(ids), 4):
            batch = ids[s : s + 4]
            n = max(map(len, batch))
            x = torch.tensor([b + [0] * (n - len(b)) for b in batch])
            mask = torch.tensor([[1] * len(b) + [0] * (n - len(b)) for b in batch])
            o = moe(x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100),
                    output_router_logits=True)  # fmt: skip
            keep = mask.reshape(-1).bool()
            lb = load_balancing_loss([r[keep] for r in o.router_logits], 2)
            lm = o.loss - moe.config.router_aux_loss_coef * o.aux_loss
            total.append(float(lm) + 0.1 * float(lb))
    assert stats["train_objective_before"] == pytest.approx(sum(total) / len(total), rel=1e-4)


def test_missing_text_or_tokenizer_is_a_clear_error_and_writes_nothing(fam, tmp_path):
    root, _, _, fts, texts = fam
    cases = [
        ("hidden", RouterData(positive_prompts=[["a"], [], ["b"]]), "experts\\[1\\].positive_prompts"),
        ("task", RouterData(examples=texts[:2]), "experts\\[2\\].examples"),
        ("cheap_embed", None, "needs text"),
        ("train", RouterData(train_init="random"), "router_train.texts"),
    ]  # fmt: skip
    for mode, data, match in cases:
        with pytest.raises(RecipeError, match=match):
            upcycle_moe(root / "base", fts, tmp_path / "moe", router_init=mode, router_data=data)
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="tokenizer '.*ft0'.*'tokenizer' key"):
        upcycle_moe(root / "base", fts, tmp_path / "moe", router_init="task",
                    router_data=RouterData(examples=texts, tokenizer=fts[0]))  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BrickworkError, match="same centroid"):
        upcycle_moe(root / "base", fts, tmp_path / "moe", router_init="task",
                    router_data=RouterData(examples=[texts[0]] * 3))  # fmt: skip
    assert list(tmp_path.iterdir()) == []
