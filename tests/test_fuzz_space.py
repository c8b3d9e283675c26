"""Fuzzed bad search spaces through `evomerge search` in-process: every one ends in exit code 2,
exactly one stderr line, no traceback, and no results/NAME folder made."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import yaml
from _search_fakes import ensure_methods
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.cli import main
from evomerge.search.space import SearchSpace

ensure_methods()
FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VALID = {
    "base_model": "m/base",
    "models": ["m/a", "m/b", "m/c"],
    "method": "ties",
    "parameters": {"weight": {"simplex": True}, "density": {"low": 0.2, "high": 0.9}},
    "tasks": ["task0", "task1"],
    "eval": {"chunks": [8, None]},
    "search": {"n_trials": 5, "seed": 0, "sampler": "tpe"},
}
FINITE = st.floats(-5, 5, allow_nan=False)


def test_valid_space_loads():  # the fuzz below breaks a space that is otherwise fine
    SearchSpace.from_text(yaml.safe_dump(VALID), source="v.yaml").codec("tpe")


@st.composite
def broken_space(draw) -> dict:
    s = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(sorted(BREAKERS)))
    BREAKERS[kind](s, draw)
    return s


def _reversed(s: dict, draw) -> None:
    lo = draw(st.floats(0.05, 0.9))
    hi = draw(st.floats(0.0, lo, exclude_max=True))
    s["parameters"]["density"] = {"low": lo, "high": hi}


def _out_of_range(s: dict, draw) -> None:  # density lives in (0, 1]
    bad = draw(st.sampled_from([(-0.5, 0.5), (0.2, 1.5), (1.2, 2.0), (0.0, 0.5)]))
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
    s["parameters"]["density"]["low"] = draw(st.sampled_from(["a", [0.1], {"x": 1}, True, None]))


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


BREAKERS = {f.__name__.lstrip("_"): f for f in (
    _reversed, _out_of_range, _non_finite, _unknown_key, _unknown_param, _one_model_simplex,
    _bad_sampler, _wrong_type, _bad_bound_type, _log_nonpositive, _objective, _missing,
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
@given(space=broken_space())
def test_fuzzed_space_exits_2(capsys, space):
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


def test_bad_storage_url_leaves_no_study_folder(capsys, tmp_path):
    """Storage errors come after the space validated: results/NAME must still not be left."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(VALID))
    code = main(["search", str(space), "--results", str(tmp_path / "r"), "--storage", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "--storage" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
