from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from brickwork.bench import moe_rows as M
from brickwork.errors import UnknownNameError

# the digits encoder: 784 -> 256 -> 128, one MLP; task heads: 10 classes (mod4: 4)
EXPERT = 784 * 256 + 256 + 256 * 128 + 128
HEADS = {"digit": 128 * 10 + 10, "rot90": 128 * 10 + 10, "inverted": 128 * 10 + 10,
         "mod4": 128 * 4 + 4}  # fmt: skip


@contextmanager
def _no_bar(description: str, total: int):
    yield None


@pytest.fixture(scope="module")
def digits(bench_cache):
    """The quick digits suite with its cached fine-tunes: (suite, trainer, fine-tunes)."""
    from brickwork.bench.suites import make_suite
    from brickwork.bench.train import Trainer

    s = make_suite("digits", quick=True, seed=0)
    trainer = Trainer(s)
    return s, trainer, {t.name: trainer.finetune(t) for t in s.tasks}


def _builder(suite, trainer, finetunes, tasks=None):
    from brickwork.bench.evaluate import Evaluator

    ev = Evaluator(suite, trainer)
    b = M._Builder(suite, tasks or suite.tasks, ev, finetunes, seed=0, progress=_no_bar,
                   cfg=M.moe_config(True))  # fmt: skip
    return b, ev


def _rows(results):
    return {r["method"]: r for r in results["rows"]}


def test_moe_rows_exist_with_the_cost_columns(quick_results):
    results, _ = quick_results
    rows = _rows(results)
    for name in M.MOE_ROWS:
        r = rows[name]
        assert r["kind"] == "moe" and r["status"] == "ok", r["reason"]
        assert 0 < r["active_params"] < r["params"]
        assert r["latency_ms"] > 0
        assert set(r["per_task"]) == set(HEADS)
    for r in results["rows"]:  # every row has both columns
        if r["status"] == "ok":
            assert isinstance(r["active_params"], int) and r["latency_ms"] > 0, r["method"]
    assert rows["moe_task"]["hyperparameters"]["top_k"] in (1, 2)
    assert rows["moe_task"]["hyperparameters"]["router"] == "task"
    assert rows["moe_train"]["hyperparameters"]["router"] == "train"
    for name in ("moe_task", "moe_train"):  # every top_k x route_by tried on val
        tried = rows[name]["validation"]["tried"]
        combos = {(t["params"]["top_k"], t["params"]["route_by"]) for t in tried}
        assert combos == {(k, rb) for k in (1, 2) for rb in ("token", "sequence")}
        assert rows[name]["hyperparameters"]["route_by"] in ("token", "sequence")
    trained = {t["params"]["train_route_by"] for t in rows["moe_train"]["validation"]["tried"]}
    assert trained == {"token", "sequence"}  # quick: routers trained once per route_by


def test_active_params_match_a_hand_count(quick_results):
    rows = _rows(quick_results[0])
    head = sum(HEADS.values()) / 4  # one example passes through its task's head
    router = 784 * 4
    for name in ("moe_task", "moe_train"):
        k = rows[name]["hyperparameters"]["top_k"]
        assert rows[name]["active_params"] == round(router + k * EXPERT + head)
        assert rows[name]["params"] == router + 4 * EXPERT + sum(HEADS.values())
    # dense rows: one encoder + one head; ensemble: four encoders
    assert rows["linear"]["active_params"] == round(EXPERT + head)
    assert rows["individual"]["active_params"] == round(EXPERT + head)
    assert rows["ensemble"]["active_params"] == round(4 * EXPERT + head)
    # moefy: 8 experts of 32 neurons, top_k of them; down's bias once; router with bias
    for name, k in (("moefy_top4of8", 4), ("moefy_top2of8", 2)):
        ffn = k * (784 * 32 + 32 + 32 * 128) + 128 + (784 * 8 + 8)
        assert rows[name]["active_params"] == round(ffn + head)
        assert rows[name]["hyperparameters"]["active_neurons"] == k / 8


def test_count_params_and_square_mlp_by_hand():
    from brickwork.route.upcycle_modules import upcycle_module

    torch.manual_seed(0)

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU())

        def forward(self, x):
            return self.net(x)

    encs = [Enc() for _ in range(3)]
    x = torch.randn(5, 6)
    sq = [M.routable(e, x) for e in encs]
    assert isinstance(sq[0], M.SquareMLP)
    assert torch.allclose(sq[0](x), encs[0](x), atol=1e-6)  # same function
    assert M.count_params(sq[0]) == (6 * 4 + 4 + 4 * 3 + 3,) * 2  # padding is not counted
    moe = upcycle_module(sq[0], sq[1:], top_k=1)
    expert = 6 * 4 + 4 + 4 * 3 + 3
    assert M.count_params(moe) == (6 * 2 + expert, 6 * 2 + 2 * expert)
    assert M.count_params(M.set_top_k(moe, 2))[0] == 6 * 2 + 2 * expert


def test_routable_refuses_an_encoder_without_an_ffn():
    from brickwork.errors import RecipeError

    enc = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(RecipeError, match="no FFN"):
        M.routable(enc, torch.randn(2, 6))


def test_moe_task_router_never_reads_test_inputs_or_labels(digits, monkeypatch):
    s, trainer, fts = digits
    reads: list[str] = []
    prepared = trainer.prepared

    def spy(task, split):
        reads.append(split)
        return prepared(task, split)

    monkeypatch.setattr(trainer, "prepared", spy)  # the builder reads inputs only through it
    b, ev = _builder(s, trainer, fts)
    model, hp, val = b.task_moe()
    monkeypatch.undo()
    assert reads and "test" not in reads
    assert ev.calls and all(split == "val" for split, _ in ev.calls)
    routers = [m.router.weight.detach().clone() for m in M.moe_layers(model)]

    # labels of train and test shuffled, test inputs reversed: the same router and choice
    def scramble(t):
        g = torch.Generator().manual_seed(1)
        sp = dict(t.splits)
        for k in ("train", "test"):
            perm = torch.randperm(len(sp[k].labels), generator=g).tolist()
            sp[k] = dataclasses.replace(sp[k], labels=tuple(sp[k].labels[i] for i in perm))
        sp["test"] = dataclasses.replace(sp["test"], inputs=sp["test"].inputs[::-1])
        return dataclasses.replace(t, splits=sp)

    b2, _ = _builder(s, trainer, fts, tasks=[scramble(t) for t in s.tasks])
    model2, hp2, val2 = b2.task_moe()
    assert hp2 == hp and val2 == val
    for r, m in zip(routers, M.moe_layers(model2)):
        assert torch.equal(r, m.router.weight)


def test_moefy_with_every_expert_active_is_the_fine_tune(digits):
    s, trainer, fts = digits
    b, _ = _builder(s, trainer, fts)
    t = s.tasks[0]
    full = M.set_top_k(copy.deepcopy(b.moefied(t)), 8)
    dense = b.finetuned(t)
    with torch.no_grad():
        x = s.collate(trainer.prepared(t, "test"))
        assert torch.allclose(full(x), dense(x), atol=1e-5)
    assert b.accuracy({t.name: full}, "test", [t]) == b.accuracy({t.name: dense}, "test", [t])
    active, total = M.count_params(full)
    assert active == total == EXPERT + 784 * 8 + 8  # all neurons + the router
    assert M.count_params(M.set_top_k(full, 4))[0] < active


def test_methods_narrowing():
    from brickwork.merge.registry import list_methods

    assert M.split_methods(None) == (None, list(M.MOE_ROWS))
    assert M.split_methods(None, moe=False) == (None, [])
    assert M.split_methods(["moefy_top2of8", "linear", "moe_task"]) == (
        ["linear"], ["moe_task", "moefy_top2of8"],
    )  # fmt: skip
    assert M.split_methods(["linear", "moe_task"], moe=False) == (["linear"], [])
    with pytest.raises(UnknownNameError, match="Did you mean 'moe_task'") as e:
        M.split_methods(["moe_tsk"])
    assert all(n in str(e.value) for n in [*M.MOE_ROWS, *list_methods()])


def test_masked_hooks_leave_padding_out_of_sequence_routing_and_survive_deepcopy():
    from brickwork.route.moe import MoEBlock, MoELayer

    class Enc(nn.Module):  # takes a text-suite batch (hidden, mask), as BertTop does
        def __init__(self) -> None:
            super().__init__()
            self.ffn = MoEBlock(MoELayer(8, 12, 3, top_k=1, activation="gelu",
                                         route_by="sequence"))  # fmt: skip

        def forward(self, batch):
            h, mask = batch  # (batch, tokens, d), (batch, tokens)
            return self.ffn(h)[:, 0]

    torch.manual_seed(0)
    enc = Enc()
    nn.init.normal_(enc.ffn.moe.router.weight, std=3.0)
    x = torch.randn(4, 3, 8)
    padded = torch.cat([x, torch.full((4, 5, 8), 50.0)], dim=1)  # 5 pad positions
    mask = torch.cat([torch.ones(4, 3), torch.zeros(4, 5)], dim=1).long()
    with torch.no_grad():
        alone = enc((x, torch.ones(4, 3).long()))
        assert not torch.allclose(enc((padded, mask)), alone)  # padding counted: differs
        for model in (M.masked(enc), copy.deepcopy(enc)):
            torch.testing.assert_close(model((padded, mask)), alone)
            assert model.ffn.moe.sequence_mask is None  # cleared after the forward
