"""Crashes: a merge killed midway or out of disk space leaves no OUT_DIR that looks complete and
no temporary folder behind (disk full); a search killed several times keeps every completed
trial, its best, and meets its budget exactly when resumed."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from _search_fakes import fake_space, poll_trials, spawn_with_fakes

from evomerge.cli import main

TESTS = Path(__file__).resolve().parent

# `python -m evomerge merge` with one hook: after `stop_after` tensor writes it touches READY and
# sleeps, so the test kills it mid-stream (each writer step: tests/test_writer_atomic.py)
MERGE_RUNNER = """
import pathlib, sys, time
import evomerge.merge.writer as writer
from evomerge.cli import main
ready, stop_after = pathlib.Path({ready!r}), {stop_after}
count = [0]
def pause():
    ready.write_text("x")
    time.sleep(600)
add = writer.CheckpointWriter.add
def slow_add(self, name, tensor):
    add(self, name, tensor)
    count[0] += 1
    if count[0] == stop_after:
        pause()
writer.CheckpointWriter.add = slow_add
sys.exit(main(["merge", {recipe!r}, {out!r}, "--no-progress"]))
"""


def write_recipe(tmp_path: Path, tiny_model) -> Path:
    models = [tiny_model("a", seed=1, num_layers=4), tiny_model("b", seed=2, num_layers=4)]
    entries = [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]
    doc = {"merge_method": "linear", "dtype": "float32", "models": entries}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def kill_merge_at(tmp_path: Path, recipe: Path, out: Path, stop_after: int) -> None:
    ready = tmp_path / f"ready{stop_after}"
    code = MERGE_RUNNER.format(ready=str(ready), stop_after=stop_after, recipe=str(recipe),
                               out=str(out))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def looks_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


@pytest.mark.parametrize("stop_after", [1, 20])  # first tensor, midway
def test_killed_merge_leaves_nothing_that_looks_complete(tmp_path, tiny_model, stop_after):
    recipe = write_recipe(tmp_path, tiny_model)
    out = tmp_path / "out"
    kill_merge_at(tmp_path, recipe, out, stop_after)
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("out.")]
    assert leftovers and all(p.name.startswith("out.tmp-") for p in leftovers)
    assert not any(looks_complete(p) for p in leftovers)  # a temp folder never has config.json
    # the leftovers do not block the next merge into the same OUT_DIR
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    assert looks_complete(out)


def test_killed_remerge_keeps_the_previous_output(tmp_path, tiny_model, read_tensors):
    recipe = write_recipe(tmp_path, tiny_model)
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    before = read_tensors(out)
    kill_merge_at(tmp_path, recipe, out, stop_after=10)
    after = read_tensors(out)  # the earlier merge, whole: the new one never replaced it
    assert after.keys() == before.keys() and all(after[k].equal(before[k]) for k in before)


class FullDisk:
    """A file whose writes fail with ENOSPC once `budget` bytes have gone through."""

    def __init__(self, fh, budget: list[int]):
        self.fh, self.budget = fh, budget

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self.budget[0] < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= n
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("budget", [0, 5_000, 60_000])
def test_disk_full_while_writing(tmp_path, tiny_model, monkeypatch, capsys, budget):
    import builtins

    import evomerge.merge.writer as writer

    recipe = write_recipe(tmp_path, tiny_model)
    left = [budget]

    def full_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)
        return FullDisk(fh, left) if "w" in mode else fh

    monkeypatch.setattr(writer, "open", full_open, raising=False)
    capsys.readouterr()
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "internal error" not in err, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


# ---- search: several kills at random points ----------------------------------------------------
SPACE = fake_space("{n_trials: 14, seed: 0, heartbeat: 1, grace_period: 2}")
SEARCH_RUNNER = """
from evomerge.loop.run import run_search
run_search({space!r}, results={results!r}, workbench=f.FakeWorkbench(sleep={sleep}),
           quiet=True, prune=False)
"""


def _spawn_search(tmp_path: Path, sleep: float) -> subprocess.Popen:
    code = SEARCH_RUNNER.format(space=str(tmp_path / "space.yaml"), results=str(tmp_path / "r"),
                                sleep=sleep)  # fmt: skip
    return spawn_with_fakes(code)


def _complete(tmp_path: Path) -> dict[int, tuple[dict, float]]:
    db = tmp_path / "r" / "space" / "study.db"
    trials = poll_trials("space", f"sqlite:///{db}") if db.exists() else []
    return {t.number: (t.params, t.value) for t in trials if t.state.name == "COMPLETE"}


@pytest.mark.slow  # four subprocesses, three killed (~40 s on a loaded machine)
def test_search_killed_several_times_keeps_its_best(tmp_path: Path):
    pytest.importorskip("optuna")
    from evomerge.search.results import load_study_outcome
    from evomerge.search.study import counts_toward_budget

    (tmp_path / "space.yaml").write_text(SPACE)
    rng = random.Random(7)
    seen: dict[int, tuple[dict, float]] = {}
    best = float("-inf")
    for _kill in range(3):
        proc = _spawn_search(tmp_path, sleep=0.3)
        target = len(seen) + 2  # let it complete a trial or two, then kill at a random moment
        deadline = time.time() + 90
        while len(_complete(tmp_path)) < target and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        now = _complete(tmp_path)
        assert len(now) >= target, proc.stderr.read().decode()[-2000:]
        assert all(now[n] == v for n, v in seen.items())  # no completed trial changed or lost
        assert max(v for _, v in now.values()) >= best  # the best so far survives the kill
        seen, best = now, max(v for _, v in now.values())
    final = _spawn_search(tmp_path, sleep=0.0)
    assert final.wait(timeout=120) == 0, final.stderr.read().decode()[-2000:]
    study = load_study_outcome(tmp_path / "r" / "space").study
    done = _complete(tmp_path)
    assert sum(counts_toward_budget(t) for t in study.get_trials()) == 14  # exactly the budget
    assert not [t for t in study.get_trials() if t.state.name == "RUNNING"]
    assert all(done[n] == v for n, v in seen.items())
    assert max(v for _, v in done.values()) >= best
    keys = [tuple(sorted(p.items())) for p, _ in done.values()]
    assert len(set(keys)) == len(keys)  # no trial was run twice by a resume
