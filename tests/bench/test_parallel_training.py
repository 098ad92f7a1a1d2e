"""Fine-tunes trained in worker processes are the ones the in-process path trains."""

from __future__ import annotations

import torch

from brickwork.bench.suites import make_suite
from brickwork.bench.train import Trainer, load_cached


def test_worker_processes_train_the_same_models_into_the_cache(tmp_path, monkeypatch):
    tasks = ["digit", "rot90"]
    monkeypatch.setenv("BRICKWORK_CACHE", str(tmp_path / "serial"))
    serial = Trainer(make_suite("digits", quick=True, tasks=tasks))
    want = {t.name: serial.finetune(t) for t in serial.suite.tasks}
    want_mt = serial.multitask(serial.suite.tasks)

    monkeypatch.setenv("BRICKWORK_CACHE", str(tmp_path / "parallel"))
    par = Trainer(make_suite("digits", quick=True, tasks=tasks))
    assert par.train_all(par.suite.tasks, jobs=2) == 3  # two fine-tunes + multitask
    for t in par.suite.tasks:
        assert par.is_cached("finetune", [t])
        enc, head = par.finetune(t)
        assert par.cache_hits[f"finetune:{t.name}"]  # read back, not retrained here
        for k, v in want[t.name][0].items():
            torch.testing.assert_close(enc[k], v, rtol=0, atol=0)
        torch.testing.assert_close(head.weight, want[t.name][1].weight, rtol=0, atol=0)
    mt_enc, _ = par.multitask(par.suite.tasks)
    for k, v in want_mt[0].items():
        torch.testing.assert_close(mt_enc[k], v, rtol=0, atol=0)
    assert par.train_all(par.suite.tasks, jobs=2) == 0  # everything cached: nothing to do
    assert load_cached(par.keys["multitask"]) is not None
