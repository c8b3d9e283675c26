"""Fuzzed bad search spaces through `evomerge search` in-process: every one ends in exit code 2,
exactly one stderr line, no traceback, and no results/NAME folder made.

The unbroken space (real tiny checkpoints, real task files) is first shown to run to exit 0
through the same CLI with a fake workbench, so each broken variant fails for its own break."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from _search_fakes import FakeWorkbench, ensure_methods
from conftest import write_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_eval_support import mc_records, write_task

from evomerge.cli import main
from evomerge.loop.workbench import LiveWorkbench

ensure_methods()
FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FINITE = st.floats(-5, 5, allow_nan=False)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict:
    """A space that runs: a base and three experts (tiny Llamas), two multiple-choice tasks."""
    root = tmp_path_factory.mktemp("fuzz-valid")
    models = [
        str(write_tiny_model(root / n, seed=i)) for i, n in enumerate(("base", "a", "b", "c"))
    ]
    tasks = [str(write_task(root / "tasks", f"task{k}", "mc", mc_records(10))) for k in range(2)]
    return {
        "base_model": models[0],
        "models": models[1:],
        "method": "ties",
        "parameters": {"weight": {"simplex": True}, "density": {"low": 0.2, "high": 0.9}},
        "tasks": tasks,
        "eval": {"chunks": [8, None]},
        "search": {"n_trials": 5, "seed": 0, "sampler": "tpe"},
    }


@pytest.fixture
def fake_bench(monkeypatch):
    """The CLI's workbench is a fake (scores from the weights, no model loaded)."""
    bench = FakeWorkbench(target=(0.6, 0.3))
    monkeypatch.setattr(LiveWorkbench, "from_space", classmethod(lambda cls, *a, **k: bench))
    return bench


def test_valid_space_runs_to_exit_0(valid, fake_bench, capsys):
    """The fuzz below breaks this space, which otherwise runs through the same command."""
    code, err, tmp = run_search_cli(yaml.safe_dump(valid), capsys)
    assert code == 0, err
    assert (tmp / "r" / "space" / "study.db").is_file()
    assert len([r for r in fake_bench.merged if r is not None]) >= 5


def _reversed(s: dict, draw) -> None:
    lo = draw(st.floats(0.05, 0.9))
    hi = draw(st.floats(0.0, lo, exclude_max=True))
    s["parameters"]["density"] = {"low": lo, "high": hi}


def _out_of_range(s: dict, draw) -> None:  # density lives in [0, 1] (merge/table.py)
    bad = draw(st.sampled_from([(-0.5, 0.5), (0.2, 1.5), (1.2, 2.0), (-0.1, 0.0)]))
    s["parameters"]["density"] = {"low": bad[0], "high": bad[1]}


def _non_finite(s: dict, draw) -> None:
    side = draw(st.sampled_from(["low", "high"]))
    s["parameters"]["density"][side] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))


def _unknown_key(s: dict, draw) -> None:
    where = draw(st.sampled_from(["top", "param", "eval", "search", "constraint"]))
    name = draw(st.sampled_from(["smplex", "n_trial", "sampler_x", "lows", "chunk", "foo"]))
    if where == "top":
        s[name] = 1
    elif where == "param":
        s["parameters"]["density"][name] = 1
    elif where == "constraint":
        s["constraint"] = {name: 1}
    else:
        s[where][name] = 1


def _unknown_param(s: dict, draw) -> None:
    s["parameters"][draw(st.sampled_from(["wieght", "densty", "lamda", "tt"]))] = {"low": 0.1}


def _one_model_simplex(s: dict, draw) -> None:
    s["models"] = ["m/a"]


def _bad_sampler(s: dict, draw) -> None:
    case = draw(st.integers(0, 3))
    if case == 0:
        s["search"]["sampler"] = draw(st.sampled_from(["tpee", "cma", "random", "grid"]))
    elif case == 1:  # CMA-ES is single-objective
        s["search"]["sampler"] = "cmaes"
        s["objectives"] = ["task0", "task1"]
    elif case == 2:  # CMA-ES cannot search a categorical method
        s["search"]["sampler"] = "cmaes"
        s["method"] = ["ties", "task_arithmetic"]
    else:
        s["search"]["pruner"] = draw(st.sampled_from(["medain", "hyperband", "x"]))


def _wrong_type(s: dict, draw) -> None:
    key = draw(st.sampled_from(["models", "tasks", "parameters", "method", "search", "eval"]))
    bad = [3, 2.5, True, {"a": 1}] + ([] if key in ("models", "tasks") else [[1, 2]])
    s[key] = draw(st.sampled_from(bad))


def _bad_bound_type(s: dict, draw) -> None:
    s["parameters"]["density"]["low"] = draw(st.sampled_from(["a", [0.1], {"x": 1}, True, "0.2"]))


def _log_nonpositive(s: dict, draw) -> None:
    s["parameters"]["lambda"] = {"low": draw(st.sampled_from([0.0, -1.0])), "high": 1.0,
                                 "log": True}  # fmt: skip


def _objective(s: dict, draw) -> None:
    case = draw(st.integers(0, 2))
    if case == 0:
        s["objectives"] = [draw(st.sampled_from(["task9", "tsk0", "mean"]))]
    elif case == 1:
        s["objective"] = {"task": "task0", "direction": "maximise"}
    else:
        s["constraint"] = {"max_drop": 5}
        del s["base_model"]


def _missing(s: dict, draw) -> None:
    key = draw(st.sampled_from(["models", "base_model"]))
    del s[key]


def _late(s: dict, draw) -> None:  # values that used to fail only after the models loaded
    case = draw(st.integers(0, 4))
    if case == 0:
        s["eval"]["chunks"] = draw(st.sampled_from([[8, 4, None], [None, 8], [0, None], []]))
    elif case == 1:
        s["search"]["n_trials"] = draw(st.sampled_from(["many", 0, -3, 2.5]))
    elif case == 2:
        s["models"][1] = s["models"][1] + "-missing"
    elif case == 3:
        s["tasks"][0] = s["tasks"][0].replace("task0.yaml", "nope.yaml")
    else:
        s["search"]["sampler_options"] = {"tpe": {"n_startup": 3}}


BREAKERS = {f.__name__.lstrip("_"): f for f in (
    _reversed, _out_of_range, _non_finite, _unknown_key, _unknown_param, _one_model_simplex,
    _bad_sampler, _wrong_type, _bad_bound_type, _log_nonpositive, _objective, _missing, _late,
)}  # fmt: skip


def run_search_cli(text: str, capsys) -> tuple[int, str, Path]:
    capsys.readouterr()
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-space-"))
    (tmp / "space.yaml").write_text(text)
    code = main(["search", str(tmp / "space.yaml"), "--results", str(tmp / "r")])
    return code, capsys.readouterr().err, tmp


def assert_clean_config_error(code: int, err: str, tmp: Path) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp.iterdir()) == ["space.yaml"]  # no results/NAME


@FUZZ
@given(kind=st.sampled_from(sorted(BREAKERS)), data=st.data())
def test_fuzzed_space_exits_2(valid, fake_bench, capsys, kind, data):
    space = copy.deepcopy(valid)
    BREAKERS[kind](space, data.draw)
    assert_clean_config_error(*run_search_cli(yaml.safe_dump(space), capsys))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.one_of(
        st.text(max_size=60),
        st.sampled_from(["{", "[1, 2", ": :", "models: [", "a: *nope", "!!python/x 1", "[]", "7"]),
    )
)
def test_garbage_space_yaml_exits_2(capsys, text):
    assert_clean_config_error(*run_search_cli(text, capsys))


def test_bad_storage_url_leaves_no_study_folder(valid, fake_bench, capsys, tmp_path):
    """Storage errors come after the space validated: results/NAME must still not be left."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(valid))
    code = main(["search", str(space), "--results", str(tmp_path / "r"), "--storage", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "--storage" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
