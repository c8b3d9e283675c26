"""lm-eval task options and vLLM engine arguments: `eval.lm_eval:` / `eval.vllm:` in a space,
the same as flags of `evomerge eval`, checked against lm-eval's and vLLM's real signatures and
applied as lm-eval's own simple_evaluate applies them (its requests are the reference)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from evomerge.cli import main
from evomerge.eval.task_options import LM_EVAL_OPTIONS

DOCS = [{"q": f"{a}+{a}", "a": str(2 * a)} for a in range(1, 9)]
SHOTS = [{"q": f"{a}+1", "a": str(a + 1)} for a in range(20, 26)]


@pytest.fixture()
def task_yaml(tmp_path: Path) -> Path:
    """A generate_until task with a train split to draw few-shot examples from, and no
    num_fewshot in its YAML (lm-eval never overrides a YAML's explicit 0)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (data / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in SHOTS))
    y = tmp_path / "opt_task.yaml"
    y.write_text(
        "task: opt_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data / 'test.jsonl'}\n    train: {data / 'train.jsonl'}\n"
        "test_split: test\ntraining_split: train\nfewshot_split: train\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: " {{a}}"\noutput_type: generate_until\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return y


class Recorder:
    """A backend that answers nothing and keeps every generation request it is asked."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []

    def live_tensors(self) -> None:
        return None

    def load_weights(self, tensors: Any) -> None:
        pass

    def loglikelihood(self, requests: Any) -> list[tuple[float, bool]]:
        return [(0.0, False) for _ in requests]

    def generate(self, requests: Any, answers: Any = None) -> list[str]:
        self.requests.extend(requests)
        return ["" for _ in requests]


def _lm_eval_requests(task_yaml: Path, **kwargs: Any) -> dict[str, Any]:
    """lm-eval's own requests for the task: simple_evaluate on an LM that records them."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    seen: dict[str, Any] = {}

    class Rec(LM):
        def loglikelihood(self, requests):  # pragma: no cover - generation task only
            return [(0.0, False) for _ in requests]

        def loglikelihood_rolling(self, requests):  # pragma: no cover
            return [0.0 for _ in requests]

        def generate_until(self, requests):
            for r in requests:
                seen[r.args[0]] = r.args[1]
            return ["" for _ in requests]

    manager = TaskManager(include_defaults=False, include_path=[str(task_yaml.parent)])
    lm_eval.simple_evaluate(
        model=Rec(), tasks=["opt_task"], task_manager=manager, log_samples=False,
        bootstrap_iters=0, **kwargs,
    )  # fmt: skip
    return seen


def _eval(monkeypatch, task_yaml: Path, tmp_path: Path, *flags: str) -> Recorder:
    import evomerge.eval.backends as backends

    rec = Recorder()
    monkeypatch.setattr(backends, "load_backend", lambda *a, **k: rec)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    code = main(["eval", str(model), "--tasks", str(task_yaml), "--split", "all", *flags])
    assert code == 0
    return rec


def test_simple_evaluate_takes_every_option() -> None:
    import lm_eval

    params = inspect.signature(lm_eval.simple_evaluate).parameters
    assert set(LM_EVAL_OPTIONS) <= set(params)


@pytest.mark.parametrize(
    ("flags", "kwargs"),
    [
        ((), {}),
        (("--num-fewshot", "3"), {"num_fewshot": 3}),
        (
            ("--num_fewshot", "2", "--system-instruction", "Add."),
            {"num_fewshot": 2, "system_instruction": "Add."},
        ),
        (
            ("--gen-kwargs", "max_gen_toks=2,temperature=0"),
            {"gen_kwargs": "max_gen_toks=2,temperature=0"},
        ),
    ],
)
def test_eval_prompts_equal_lm_eval(monkeypatch, task_yaml, tmp_path, flags, kwargs) -> None:
    rec = _eval(monkeypatch, task_yaml, tmp_path, *flags)
    want = _lm_eval_requests(task_yaml, **kwargs)
    got = {ctx: spec for ctx, spec in rec.requests}
    assert sorted(got) == sorted(want)
    if "num_fewshot" in kwargs:  # the prompts really carry the examples
        assert all(ctx.count("Q: ") == kwargs["num_fewshot"] + 1 for ctx in got)
    for ctx, spec in got.items():
        assert spec.max_gen_toks == want[ctx].get("max_gen_toks", 256)
        assert list(spec.until) == list(want[ctx]["until"])


def test_space_lm_eval_options_reach_the_tasks(task_yaml, tmp_path) -> None:
    from evomerge.loop.preflight import load_space_tasks
    from evomerge.search.space import SearchSpace

    space = _space(tmp_path, task_yaml, "  lm_eval: {num_fewshot: 2}\n")
    tasks = load_space_tasks(SearchSpace.from_yaml(str(space)))
    ctx = tasks[0].requests(tasks[0].doc_ids("all")[0])[0][0]
    assert ctx.count("Q: ") == 3
    assert ctx in _lm_eval_requests(task_yaml, num_fewshot=2)


def _space(tmp_path: Path, task_yaml: Path, eval_extra: str) -> Path:
    from tests.test_plan import write_models

    models = write_models(tmp_path, hidden=8, layers=2, vocab=16, inter=16)
    p = tmp_path / "space.yaml"
    p.write_text(
        f"base_model: {models[0]}\nmodels: [{models[1]}, {models[2]}]\nmethod: ties\n"
        f"tasks: [{task_yaml}]\neval:\n{eval_extra}"
    )
    return p


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("  lm_eval: {num_fewshots: 2}\n", "Did you mean 'num_fewshot'?"),
        ("  lm_eval: {num_fewshot: -1}\n", "expected an integer >= 0"),
        ("  vllm: {gpu_memory_utilisation: 0.5}\n", "Did you mean 'gpu_memory_utilization'?"),
        ("  vllm: {gpu_memory_utilization: 1.5}\n", "expected a fraction in (0, 1]"),
        ("  vllm: {model: x}\n", "'model' cannot be set"),
    ],
)
def test_space_bad_options_exit_2(tmp_path, task_yaml, capsys, extra, message) -> None:
    space = _space(tmp_path, task_yaml, extra)
    code = main(["plan", str(space)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_eval_bad_vllm_arg_exit_2(tmp_path, task_yaml, capsys) -> None:
    model = tmp_path / "model"
    model.mkdir()
    args = ["eval", str(model), "--tasks", str(task_yaml), "--backend", "vllm"]
    assert main([*args, "--vllm-arg", "max_model_length=64"]) == 2
    assert "Did you mean 'max_model_len'?" in capsys.readouterr().err
    assert main([*args, "--vllm-arg", "enforce_eager"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_eval_vllm_args_reach_the_engine(monkeypatch, tmp_path, task_yaml) -> None:
    import evomerge.eval.backends as backends

    seen: dict[str, Any] = {}

    def fake(kind, model_dir, **kw):
        seen.update(kw, kind=kind)
        return Recorder()

    monkeypatch.setattr(backends, "load_backend", fake)
    model = tmp_path / "model"
    model.mkdir()
    flags = ["--vllm-arg", "enforce_eager=true", "--vllm-arg", "max_model_len=512"]
    assert main(["eval", str(model), "--tasks", str(task_yaml), "--backend", "vllm", *flags]) == 0
    assert seen["kind"] == "vllm"
    assert seen["enforce_eager"] is True and seen["max_model_len"] == 512


@pytest.mark.vllm
def test_engine_args_list_matches_vllm() -> None:
    """The static list (evomerge/eval/vllm/engine_args.py) against the installed vLLM."""
    import dataclasses

    import vllm

    from evomerge.eval.vllm.engine_args import ENGINE_ARGS, VLLM_VERSION

    real = {f.name for f in dataclasses.fields(vllm.EngineArgs) if not f.name.startswith("_")}
    assert ENGINE_ARGS == real, (vllm.__version__, VLLM_VERSION)
    assert vllm.__version__.startswith(VLLM_VERSION)
