"""The ``digits-scratch`` suite: networks from different initialisations, merged after alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brickwork.bench.report import validate
from brickwork.bench.scratch import ALIGN_ROWS, heads_of, nets
from brickwork.bench.suites import SUITES, make_suite
from brickwork.bench.train import Trainer

TASKS = ["digit", "rot90", "inverted", "mod4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("scratch-cache")
    mp.setenv("BRICKWORK_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def quick(cache, tmp_path_factory: pytest.TempPathFactory):
    """One ``--quick`` run of the suite with its default rows: (results, output dir)."""
    from brickwork.bench import run_bench

    out = tmp_path_factory.mktemp("scratch-out")
    return run_bench("digits-scratch", out=out, quick=True, progress=False), out


@pytest.fixture(scope="module")
def trained(quick):
    """The quick suite's trainer, fine-tunes and evaluator (read from the run's cache)."""
    from brickwork.bench.evaluate import Evaluator

    s = make_suite("digits-scratch", quick=True)
    trainer = Trainer(s)
    finetunes = {t.name: trainer.finetune(t) for t in s.tasks}
    return s, trainer, finetunes, Evaluator(s, trainer)


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten() for k in sorted(state)])


def test_suite_is_registered_and_every_task_starts_from_its_own_init():
    assert "digits-scratch" in SUITES
    s = make_suite("digits-scratch", quick=True)
    assert [t.name for t in s.tasks] == TASKS and not s.shared_base
    inits = [_flat(s.start_encoder([t], 0).state_dict()) for t in s.tasks]
    for i in range(len(inits)):
        for j in range(i):
            assert not torch.equal(inits[i], inits[j])
    again = _flat(s.start_encoder([s.tasks[0]], 0).state_dict())
    torch.testing.assert_close(again, inits[0], rtol=0, atol=0)  # seeded
    assert not torch.equal(_flat(s.start_encoder([s.tasks[0]], 1).state_dict()), inits[0])


def test_models_differ_far_more_than_fine_tunes_of_one_base(trained):
    s, trainer, finetunes, _ = trained
    w = [_flat(finetunes[t.name][0]) for t in s.tasks]
    inits = [_flat(s.start_encoder([t], trainer.seed).state_dict()) for t in s.tasks]
    scratch = min(
        float((w[i] - w[j]).norm() / w[i].norm()) for i in range(len(w)) for j in range(len(w))
        if i != j
    )  # fmt: skip
    for i in range(len(w)):  # each model is nearest to its own initialisation
        d = [float((w[i] - v).norm()) for v in inits]
        assert int(np.argmin(d)) == i, d

    shared = make_suite("digits", quick=True, tasks=["digit", "rot90"])
    st = Trainer(shared)
    ft = [_flat(st.finetune(t)[0]) for t in shared.tasks]
    finetune = float((ft[0] - ft[1]).norm() / ft[0].norm())
    assert scratch > 1.0 and scratch > 5 * finetune, (scratch, finetune)


def test_heads_travel_with_their_models(trained):
    """Model t with its head in its rows of the joint head predicts what model t predicts,
    and so does model t aligned onto model 0 with its rows read back."""
    from brickwork.align.api import align

    s, _, finetunes, ev = trained
    models = nets(s, s.tasks, finetunes)
    for i, t in enumerate(s.tasks):
        want = ev.correct(finetunes[t.name][0], {t.name: finetunes[t.name][1]}, [t], "val")
        got = ev.correct(finetunes[t.name][0], heads_of(models[i], s.tasks), [t], "val")
        np.testing.assert_array_equal(got[t.name], want[t.name])
        if i:
            moved, perms = align(models[0], models[i], method="weight")
            assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
            enc = {k[4:]: v for k, v in moved.state_dict().items() if k.startswith("enc.")}
            got = ev.correct(enc, heads_of(moved, s.tasks, only=t.name), [t], "val")
            np.testing.assert_array_equal(got[t.name], want[t.name])


def test_quick_run_has_every_row_with_intervals(quick):
    results, out = quick
    validate(results)
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["base", "individual", "multitask", "linear", *ALIGN_ROWS]
    for r in results["rows"]:
        assert r["status"] == "ok", (r["method"], r["reason"])
        lo, hi = r["normalized_ci"]
        assert lo <= r["normalized"] <= hi
        if r["kind"] == "merge" and r["method"] != "linear":
            assert r["vs_linear"] in ("better", "worse", "tie")
    md = (out / "results.md").read_text()
    assert "`align+linear`" in md and "Against plain averaging (`linear`)" in md
    assert (out / "normalized.png").read_bytes()[:4] == b"\x89PNG"


def test_alignment_beats_the_naive_average(quick):
    """Unaligned networks average into a poor model; weight matching first does better
    (measured in quick mode: 49.9 % normalized naive, 58.4 % aligned)."""
    rows = {r["method"]: r for r in quick[0]["rows"]}
    assert rows["align+linear"]["normalized"] >= rows["linear"]["normalized"]
    assert rows["align+linear"]["vs_linear"] == "better"
    assert rows["linear"]["normalized"] < rows["individual"]["normalized"] - 0.2


def test_joint_heads_average_to_the_linear_rows_predictions(quick, trained):
    """Averaging the models with their joint heads (each task's head at 1/n) predicts what
    the ``linear`` row's averaged encoder with the original heads predicts."""
    from brickwork.bench.evaluate import from_bits
    from brickwork.bench.scratch import _encoder_state, _mean

    s, _, finetunes, ev = trained
    models = nets(s, s.tasks, finetunes)
    mean = _mean([m.state_dict() for m in models])
    avg = models[0]
    avg.load_state_dict(mean)
    got = ev.correct(_encoder_state(mean), heads_of(avg, s.tasks), s.tasks, "test")
    linear = next(r for r in quick[0]["rows"] if r["method"] == "linear")
    for t in s.tasks:
        np.testing.assert_array_equal(got[t.name], from_bits(linear["correct"][t.name]))


def test_second_run_reads_every_row_from_the_cache(quick, tmp_path):
    from brickwork.bench import run_bench

    again = run_bench("digits-scratch", out=tmp_path, quick=True, progress=False)
    assert again["cache"]["reused_rows"] == [r["method"] for r in quick[0]["rows"]]
    for a, b in zip(again["rows"], quick[0]["rows"]):
        assert a["correct"] == b["correct"] and a["normalized_ci"] == b["normalized_ci"]


def test_alignment_sees_training_inputs_only_and_test_is_read_once(trained, monkeypatch):
    import brickwork.align.api as api
    import brickwork.align.ot_fusion as otf
    import brickwork.align.zipit as zp
    from brickwork.bench.runner import _row
    from brickwork.bench.scratch import align_rows

    s, trainer, finetunes, ev = trained
    seen: list[torch.Tensor] = []
    calls: list[str] = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kw):
            data = kw.get("data", args[1] if name == "zipit" else None)
            if data is not None:
                calls.append(name)
                seen.extend(data)
            return real(*args, **kw)

        monkeypatch.setattr(module, name, wrapped)

    spy(api, "align")
    spy(otf, "ot_fusion")
    spy(zp, "zipit")

    def rows_of(split: str) -> set[bytes]:
        return {x.numpy().tobytes() for t in tasks for x in trainer.prepared(t, split)}

    ev.calls.clear()
    bar = lambda *a: __import__("contextlib").nullcontext()  # noqa: E731
    names = ("align_act+linear", "ot_fusion_act", "zipit")  # the rows that read data
    tasks = s.tasks[:2]  # two models: ZipIt's greedy zipping of 4 x 256 units takes seconds
    rows = align_rows(
        s, tasks, ev, finetunes, names, seed=0, progress=bar, row=_row,
        row_key=lambda what: what, load_row=lambda k: None, save_row=lambda k, r: None,
        reused=[], enc_params=0,
    )  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"] * len(names)
    assert calls == ["align", "ot_fusion", "zipit"]  # the rows' calls that read data
    got = {x.numpy().tobytes() for b in seen for x in b}
    assert got <= rows_of("train")
    assert not got & (rows_of("test") | rows_of("val"))
    assert [c[0] for c in ev.calls].count("test") == len(names)  # once per row
    assert all(c[0] in ("val", "test") for c in ev.calls)


def test_fine_tunes_of_one_base_need_no_alignment(cache):
    """On the shared-base ``digits`` suite weight matching leaves the fine-tunes as they
    are: ``align+linear`` predicts exactly what the plain average predicts."""
    from contextlib import nullcontext

    from brickwork.bench.evaluate import Evaluator, to_bits
    from brickwork.bench.runner import _row
    from brickwork.bench.scratch import align_rows
    from brickwork.merge.api import merge_state_dicts

    s = make_suite("digits", quick=True, tasks=["digit", "rot90"])
    trainer = Trainer(s)
    finetunes = {t.name: trainer.finetune(t) for t in s.tasks}
    ev = Evaluator(s, trainer)
    (row,) = align_rows(
        s, s.tasks, ev, finetunes, ["align+linear"], seed=0, progress=lambda *a: nullcontext(),
        row=_row, row_key=lambda what: what, load_row=lambda k: None,
        save_row=lambda k, r: None, reused=[], enc_params=0,
    )  # fmt: skip
    avg = merge_state_dicts("linear", [finetunes[t.name][0] for t in s.tasks])
    want = ev.correct(avg, {t.name: finetunes[t.name][1] for t in s.tasks}, s.tasks, "test")
    assert row["correct"] == {t: to_bits(c) for t, c in want.items()}
