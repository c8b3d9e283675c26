"""The writer's switch is atomic: `evomerge merge` over an earlier output, SIGKILLed at every step
of the writer (EVOMERGE_WRITER_KILL_AT, steps numbered in writer.STEPS), leaves OUT_DIR as the
complete old output or the complete new one, byte for byte, on both the one-swap path and the
two-rename path; the next run succeeds and removes every leftover. Disk full while writing
config.json, the index, a tokenizer file or the card keeps the old output and leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_crash import FullDisk

from evomerge.cli import main
from evomerge.merge import writer
from evomerge.merge.io import INDEX


def _recipe(tmp_path: Path, tiny_model, weight: float) -> Path:
    models = [tiny_model("a", seed=1, num_layers=2), tiny_model("b", seed=2, num_layers=2)]
    entries = [{"model": str(m), "parameters": {"weight": w}}
               for m, w in zip(models, (weight, 1 - weight), strict=True)]  # fmt: skip
    doc = {"merge_method": "linear", "dtype": "float32", "models": entries}
    path = tmp_path / f"recipe-{weight}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _merge_args(recipe: Path, out: Path) -> list[str]:
    # a small shard size: several shards, so the index is one of the files written
    return ["merge", str(recipe), str(out), "--no-progress", "--shard-size", "20KB"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f"{out.name}."))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Two recipes and the bytes of their outputs, made once: (old recipe, old, new recipe, new)."""
    from conftest import write_tiny_model

    tmp = tmp_path_factory.mktemp("atomic")
    make = lambda name, **kw: write_tiny_model(tmp / "models" / name, **kw)  # noqa: E731
    old_r, new_r = _recipe(tmp, make, 0.3), _recipe(tmp, make, 0.8)
    snaps = []
    for r in (old_r, new_r):
        assert main(_merge_args(r, tmp / "ref")) == 0
        snaps.append(_snapshot(tmp / "ref"))
    assert INDEX in snaps[0] and "README.md" in snaps[0] and "tokenizer.json" in snaps[0]
    assert snaps[0] != snaps[1]
    return old_r, snaps[0], new_r, snaps[1]


@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_kill_at_every_writer_step(tmp_path, outputs, swap):
    old_r, old, new_r, new = outputs
    out = tmp_path / "out"
    env = {**os.environ, writer.NO_EXCHANGE_ENV: "1" if swap == "two-renames" else ""}
    seen = set()
    for k, step in enumerate(writer.STEPS, start=1):
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        assert main(_merge_args(old_r, out)) == 0 and _snapshot(out) == old
        cmd = [sys.executable, "-m", "evomerge", *_merge_args(new_r, out)]
        proc = subprocess.run(cmd, env={**env, writer.KILL_AT_ENV: str(k)}, capture_output=True)
        reached = proc.returncode == -signal.SIGKILL
        skipped = swap == "exchange" and step == "old-moved-aside"  # not on this path
        assert reached != skipped, (step, proc.returncode, proc.stderr.decode()[-2000:])
        if not out.exists():  # only between the two renames: the old output waits beside it
            assert swap == "two-renames" and step == "old-moved-aside", step
            writer.recover_out_dir(out)
        state = _snapshot(out)
        assert state in (old, new), (step, sorted(state))
        seen.add("new" if state == new else "old")
        assert main(_merge_args(new_r, out)) == 0, step  # the next run succeeds ...
        assert _snapshot(out) == new and _siblings(out) == [], (step, _siblings(out))  # ... cleans
    assert seen == {"old", "new"}  # the kills fell on both sides of the switch


def test_a_live_writers_folders_are_left_alone(tmp_path, outputs):
    old_r, old, _, _ = outputs
    out = tmp_path / "out"
    live = tmp_path / f"out.tmp-{os.getppid()}-abcd"  # the pytest runner's parent: alive
    live.mkdir()
    dead_old = tmp_path / "out.old-999999999-abcd"  # no such pid: a killed writer's
    dead_old.mkdir()
    assert main(_merge_args(old_r, out)) == 0 and _snapshot(out) == old
    assert live.is_dir() and not dead_old.exists()


@pytest.mark.parametrize("target", ["config.json", INDEX, "tokenizer.json", "README.md"])
def test_disk_full_on_each_file_keeps_the_old_output(tmp_path, outputs, monkeypatch, capsys,
                                                     target):  # fmt: skip
    import builtins

    old_r, old, new_r, _ = outputs
    out = tmp_path / "out"
    assert main(_merge_args(old_r, out)) == 0
    hits = []

    def full_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name == target:
            hits.append(file)
            return FullDisk(fh, [0])  # no byte fits
        return fh

    monkeypatch.setattr(writer, "open", full_open, raising=False)
    capsys.readouterr()
    code = main(_merge_args(new_r, out))
    err = capsys.readouterr().err
    assert hits, f"{target} was never written through the writer"
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "internal error" not in err, err
    assert _snapshot(out) == old and _siblings(out) == []
