"""`evomerge search` with the merger's inputs forced into host memory (eval.inputs: host,
streamed per candidate in row chunks) gives the same trials, parameters and scores as the
default (inputs resident on the device), for a fused method and one outside the kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_eval_support import build_tiny_model, mc_records, write_task

from evomerge.cli import main
from evomerge.merge.memory import ENV_CHUNK_BYTES

METHODS = {
    "dare_ties": "parameters: {weight: {low: 0.0, high: 1.0}, density: {low: 0.3, high: 0.9}}",
    "slerp": "parameters: {t: {low: 0.0, high: 1.0}}",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("family")
    models = [build_tiny_model(root / n, seed=s, init=0.8) for s, n in enumerate(["b", "e1", "e2"])]
    return models, write_task(root / "tasks", "pick", "mc", mc_records(48))


def _space(tmp: Path, family, method: str, inputs: str | None) -> Path:
    models, task = family
    experts = models[1:2] if method == "slerp" else models[1:]
    key = "" if inputs is None else f", inputs: {inputs}"
    path = tmp / f"{method}-{inputs}.yaml"
    path.write_text(f"""
name: hostin
base_model: {models[0]}
models: [{", ".join(map(str, experts))}]
method: {method}
{METHODS[method]}
tasks: [{task}]
eval: {{chunks: [6, null], device: cpu, heldout_top_k: 1{key}}}
search: {{n_trials: 4, seed: 0, sampler: qmc}}
baselines: [uniform]
""")
    return path


def _trials(results: Path) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name="hostin", storage=f"sqlite:///{results}/hostin/study.db")
    out = []
    for t in study.trials:
        scores = {k: v for k, v in t.user_attrs.items() if k.startswith("proxy_")}
        out.append((t.number, t.state.name, t.params, scores, t.values))
    held = {k: v for k, v in study.user_attrs.items() if k.startswith(("heldout_", "base_"))}
    return [*out, held]


@pytest.mark.parametrize("method", list(METHODS))
def test_host_inputs_search_equals_device_inputs(tmp_path, family, method, monkeypatch):
    from evomerge.merge import candidate

    monkeypatch.setenv(ENV_CHUNK_BYTES, "1024")  # 8 rows of the tiny model's tensors a chunk
    placements: list[str] = []
    real = candidate.CandidateMerger.__init__

    def spy(self, *args, **kwargs):
        placements.append(kwargs.get("placement", "device"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(candidate.CandidateMerger, "__init__", spy)
    runs = {}
    for inputs in (None, "host"):
        results = tmp_path / f"r-{inputs}"
        assert main(["search", str(_space(tmp_path, family, method, inputs)), "--results",
                     str(results), "--no-prune"]) == 0  # fmt: skip
        runs[inputs] = _trials(results)
    assert placements == ["device", "host"]
    assert runs["host"] == runs[None]
    scores = [t[3] for t in runs[None][:-1]]
    assert len(scores) == 4 and len({str(s) for s in scores}) > 1  # candidates differ


def test_bad_inputs_key_exit_2(tmp_path, family, capsys):
    space = _space(tmp_path, family, "dare_ties", "hots")
    assert main(["search", str(space), "--results", str(tmp_path / "r")]) == 2
    assert "eval.inputs: unknown placement 'hots'. Did you mean 'host'?" in capsys.readouterr().err
