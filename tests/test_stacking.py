"""Layer-stacking search (issue #23): the live stacked candidate against independent references.

- a stacked candidate materialized in the live HF model scores (log-likelihoods, greedy
  generation through the KV cache) exactly as a fresh model loaded from `evomerge merge` of the
  decoded recipe, for genomes with reused layers, scales and a hybrid `merged` source;
- `evomerge search` + `evomerge export` of a hybrid stacking space (tied and untied
  embeddings): recipe.yaml merged by `evomerge merge` and by mergekit 0.1.5 (stage by stage)
  gives the tensors of the candidate the search scored;
- bad `stacking:` values and the vLLM backend exit 2 with one line, before anything loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_tensors, write_tiny_model
from test_eval_support import build_tiny_model, gen_records, write_task
from test_mergekit_recipes import require_mergekit, run_mergekit

from evomerge.cli import main

WEIGHTS = {"weight[e1]": 0.3, "weight[e2]": 0.9}


def _model(out: Path, seed: int, tie: bool, arch: str) -> Path:
    if arch == "llama":
        return build_tiny_model(out, seed=seed, tie=tie)
    return write_tiny_model(out, arch=arch, seed=seed, tie=tie, num_layers=2, vocab_size=64)


def _space(root: Path, tie: bool, extra: str = "", stacking: str = "", arch: str = "llama") -> Path:
    models = [_model(root / n, s, tie, arch) for s, n in enumerate(["b", "e1", "e2"])]
    task = write_task(root / "tasks", "st", "gen", gen_records(12))
    stacking = stacking or "{depth: {low: 1, high: 4}, window: 1, scale: {low: 0.5, high: 1.5}}"
    space = root / "st.yaml"
    space.write_text(f"""
name: st
base_model: {models[0]}
models: [{models[1]}, {models[2]}]
method: task_arithmetic
parameters: {{weight: {{low: 0.0, high: 1.0}}}}
stacking: {stacking}
tasks: [{task}]
eval: {{chunks: [4, null], device: cpu, heldout_top_k: 1}}
search: {{n_trials: 4, seed: 0}}
baselines: []
{extra}
""")
    return space


def _genome(depth: int, rows: list[tuple[str, int, float]]) -> dict:
    """Trial params: (source label, offset, scale) per position; unused positions default."""
    out: dict = {**WEIGHTS, "stack.depth": depth}
    for p in range(4):
        src, off, scale = rows[p] if p < len(rows) else ("merged", 0, 1.0)
        out |= {f"stack.p{p:02d}.source": src, f"stack.p{p:02d}.offset": off,
                f"stack.p{p:02d}.scale": scale}  # fmt: skip
    return out


GENOMES = [
    _genome(4, [("e1", 0, 1.0)] * 4),  # layers 0 0 1 1 of e1: each layer used twice
    _genome(3, [("merged", 0, 1.25), ("e2", 1, 0.75), ("merged", -1, 1.0)]),
    _genome(4, [("e2", 1, 1.0), ("merged", 0, 0.5), ("e1", 0, 1.5), ("e2", -1, 1.0)]),
    _genome(1, [("e2", 1, 0.6)]),
    _genome(2, [("e1", 0, 1.0), ("e2", 0, 1.0)]),  # embeddings of e1, final norm (head) of e2
]


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("tie,arch", [(True, "llama"), (False, "llama"), (True, "qwen2")])
def test_live_stack_scores_as_the_merged_checkpoint(tmp_path: Path, tie: bool, arch: str):
    """qwen2: a config with per-layer `layer_types`, re-indexed for the stacked layers."""
    from transformers import AutoModelForCausalLM

    from evomerge.eval.hf.backend import HFBackend
    from evomerge.loop.workbench import PROBES, LiveWorkbench
    from evomerge.merge.engine import merge_recipe
    from evomerge.search.space import SearchSpace

    space = SearchSpace.from_yaml(_space(tmp_path, tie, arch=arch))
    wb = LiveWorkbench.from_space(space, backend="hf", device="cpu")
    base_ll = wb.backend.loglikelihood(PROBES)
    ids = torch.tensor([[1, 10, 11, 12, 40, 13]])
    for k, genome in enumerate(GENOMES):
        recipe = space.decode(genome)
        wb._push(recipe)
        live = wb.backend.model
        assert live.config.num_hidden_layers == genome["stack.depth"]
        out = merge_recipe(recipe, tmp_path / f"m{k}", device="cpu", progress=False)
        fresh = HFBackend(out, device="cpu")
        assert wb.backend.loglikelihood(PROBES) == fresh.loglikelihood(PROBES), k
        with torch.no_grad():
            assert torch.equal(live(ids).logits, fresh.model(ids).logits), k
            assert torch.equal(_greedy(live, ids), _greedy(fresh.model, ids)), k  # KV cache
        disk = load_tensors(out)
        state = live.state_dict()
        for name, t in disk.items():
            assert torch.equal(state[name], t), (k, name)
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == len(
            [n for n in disk if n.endswith("input_layernorm.weight")]
        )
    wb.restore_base()
    assert wb.backend.loglikelihood(PROBES) == base_ll  # the loaded model is back
    wb.self_check()


def _best_stacked_trial(results: Path) -> int:
    import optuna

    study = optuna.load_study(study_name="st", storage=f"sqlite:///{results}/st/study.db")
    for t in study.trials[::-1]:
        stages = t.user_attrs["recipe"].split("\n---\n")
        if t.state.name == "COMPLETE" and "scale" in stages[-1] and len(stages) == 2:
            return t.number
    raise AssertionError("no stacked trial with a scale")


def _mergekit_stages(recipe: Path, root: Path) -> Path:
    """recipe.yaml's two stages run by mergekit one by one (`merged` -> stage 1's folder)."""
    docs = [d for d in yaml.safe_load_all(recipe.read_text()) if d]
    for d in docs:
        d.pop("provenance", None), d.pop("random_seed", None)
    first, second = root / "mk_merged", root / "mk_final"
    name = docs[0].pop("name")
    for sl in docs[1]["slices"]:
        for src in sl["sources"]:
            src["model"] = str(first) if src["model"] == name else src["model"]
    jobs = []
    for d, out in ((docs[0], first), (docs[1], second)):
        cfg = root / f"{out.name}.yaml"
        cfg.write_text(yaml.safe_dump(d))
        jobs.append((str(cfg), str(out)))
    assert run_mergekit(jobs) == {}
    return second


def _search_and_export(tmp_path: Path, tie: bool, capsys) -> tuple[Path, dict]:
    """`evomerge search` + `evomerge export` of a stacked trial with scales; returns the export
    folder and its tensors, checked equal to the candidate materialized again live."""
    from evomerge.eval.hf.backend import HFBackend
    from evomerge.loop.workbench import PROBES, LiveWorkbench
    from evomerge.recipe import load_recipe
    from evomerge.search.space import SearchSpace

    space_file = _space(tmp_path, tie)
    results = tmp_path / "r"
    assert main(["search", str(space_file), "--results", str(results), "--no-prune"]) == 0
    trial = _best_stacked_trial(results)
    out = tmp_path / "exp"
    assert main(["export", str(results / "st"), "--trial", str(trial), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "identical to the scored candidate" in printed.out + printed.err
    exported = load_tensors(out)
    space = SearchSpace.from_yaml(space_file)
    wb = LiveWorkbench.from_space(space, backend="hf", device="cpu")
    wb._push(load_recipe(out / "recipe.yaml"))
    state = wb.backend.model.state_dict()
    assert set(state) - set(exported) == ({"lm_head.weight"} if tie else set())
    for name, t in exported.items():
        assert torch.equal(state[name], t), name
    assert wb.backend.loglikelihood(PROBES) == HFBackend(out, device="cpu").loglikelihood(PROBES)
    return out, exported


@pytest.mark.parametrize("tie", [True, False])
def test_search_export_equals_evomerge_merge(tmp_path: Path, tie: bool, capsys):
    out, exported = _search_and_export(tmp_path, tie, capsys)
    assert main(["merge", str(out / "recipe.yaml"), str(tmp_path / "again")]) == 0
    again = load_tensors(tmp_path / "again")
    assert again.keys() == exported.keys()
    assert all(torch.equal(again[n], exported[n]) for n in exported)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_search_export_equals_mergekit(tmp_path: Path, tie: bool, capsys):
    require_mergekit()
    out, exported = _search_and_export(tmp_path, tie, capsys)
    theirs = load_tensors(_mergekit_stages(out / "recipe.yaml", tmp_path))
    assert theirs.keys() == exported.keys()
    for name, t in exported.items():
        assert torch.equal(theirs[name], t), name


BAD = [
    ("{dept: {low: 1, high: 2}}", "unknown stacking key 'dept'. Did you mean 'depth'?"),
    ("{depth: {low: 0, high: 2}}", "stacking.depth: expected low and high integers >= 1"),
    ("{depth: {low: 3, high: 2}}", "stacking.depth: expected low <= high"),
    ("{depth: {low: 1, high: 2}, window: -1}", "stacking.window: expected an integer >= 0"),
    ("{depth: {low: 1, high: 2}, sources: [nope]}", "unknown source 'nope'"),
    ("{depth: {low: 1, high: 2}, scale: {low: 1}}", "stacking.scale: expected low and high"),
]


@pytest.mark.parametrize("stacking,message", BAD)
def test_bad_stacking_exits_2_with_one_line(tmp_path: Path, capsys, stacking: str, message: str):
    space = _space(tmp_path, True, stacking=stacking)
    capsys.readouterr()  # the fixture models' progress bars
    assert main(["search", str(space), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r" / "st").exists()


def test_merged_needs_weights_and_cmaes_is_refused(tmp_path: Path, capsys):
    space = _space(tmp_path, True, stacking="{depth: {low: 1, high: 2}, sources: [merged]}")
    text = space.read_text().replace("method: task_arithmetic\n", "")
    space.write_text(text.replace("parameters: {weight: {low: 0.0, high: 1.0}}\n", ""))
    assert main(["search", str(space), "--results", str(tmp_path / "r")]) == 2
    assert "'merged' is the weight-merged candidate, but this space" in capsys.readouterr().err
    space = _space(tmp_path, True)
    assert main(["search", str(space), "--sampler", "cmaes", "--results", str(tmp_path)]) == 2
    assert "cmaes cannot search a stacking genome" in capsys.readouterr().err


def test_vllm_backend_is_refused_up_front(tmp_path: Path, capsys):
    space = _space(tmp_path, True)
    code = main(["search", str(space), "--backend", "vllm", "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "layer stacking needs backend hf, but got vllm" in err
    assert not (tmp_path / "r" / "st").exists()


def test_plan_lists_the_stacking_genome(tmp_path: Path, capsys):
    space = _space(tmp_path, True)
    assert main(["plan", str(space)]) == 0
    out = capsys.readouterr().out
    assert "task_arithmetic + layer stacking" in out and "stack.depth in [1, 4]" in out
    assert "stack.p03.source in ['e1', 'e2', 'merged']" in out
    assert "resident stacking sources (2 x float32)" in out  # e1 and e2 beside the engine


def test_stacking_only_search_runs(tmp_path: Path, capsys):
    """No `method:`: the sources' own layers only; the loaded model's modules serve as its
    source; the experts' identity stacks are the baselines."""
    space = _space(tmp_path, True, stacking="{depth: {low: 1, high: 3}}")
    text = space.read_text().replace("method: task_arithmetic\n", "")
    text = text.replace("parameters: {weight: {low: 0.0, high: 1.0}}\n", "")
    space.write_text(text.replace("baselines: []", "baselines: [experts]"))
    assert main(["search", str(space), "--results", str(tmp_path / "r"), "--no-prune"]) == 0
    assert "searching 7 dimensions of layer stacking with tpe" in capsys.readouterr().err


def test_self_check_runs_the_stack_fast_path_against_owned_copies(
    tmp_path: Path, capsys, monkeypatch
):
    """The start-up probe is a stack with reused and scaled layers: a fast path (views) that
    drops the scales scores differently from owned copies, and the search stops (exit 1)."""
    import dataclasses

    from evomerge.loop import stacking

    real = stacking._view

    def no_scale_on_views(mod, index, prefix, pos, owned):
        pos = pos if owned else dataclasses.replace(pos, scale=None)
        return real(mod, index, prefix, pos, owned)

    monkeypatch.setattr(stacking, "_view", no_scale_on_views)
    space = _space(tmp_path, True)
    capsys.readouterr()
    assert main(["search", str(space), "--results", str(tmp_path / "r")]) == 1
    assert "self-check failed on backend 'hf': a candidate written through the search's fast" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "r" / "st").exists()


def test_decoding_by_hand(tmp_path: Path):
    """Anchors round(p (L-1) / (D-1)) half up, offsets clamped to [0, L-1], runs of one source
    and scale merged into one slice (L = 2 here: the fixture models' layer count)."""
    from evomerge.search.space import SearchSpace
    from evomerge.search.stacking import anchor

    assert [anchor(p, 6, 4) for p in range(6)] == [0, 1, 1, 2, 2, 3]  # 0 .6 1.2 1.8 2.4 3
    assert [anchor(p, 3, 4) for p in range(3)] == [0, 2, 3]  # 1.5 rounds up
    assert anchor(0, 1, 4) == 0
    space = SearchSpace.from_yaml(_space(tmp_path, True))
    rows = [("e1", -1, 1.0), ("e1", 1, 1.0), ("e1", 0, 1.0), ("merged", 1, 0.5)]
    stage = space.decode(_genome(4, rows)).final  # anchors 0 0 1 1 -> layers 0 1 1 1
    got = [(str(s.sources[0].model).split("/")[-1], s.sources[0].layer_range) for s in
           stage.slices]  # fmt: skip
    assert got == [("e1", (0, 2)), ("e1", (1, 2)), ("merged", (1, 2))]
    assert stage.slices[0].sources[0].parameters == {}
    assert [e.value for e in stage.slices[2].sources[0].parameters["scale"]] == [0.5, 0.5, 1.0]


def test_stacking_only_baselines_are_each_sources_own_stack(tmp_path: Path):
    """Without weights, `uniform` and `defaults` name nothing: a stacking-only space enqueues
    one identity stack per source, labelled with that source (not `uniform:linear` on the
    first source's layers)."""
    from evomerge.search.baselines import baseline_trials
    from evomerge.search.space import SearchSpace

    space = _space(tmp_path, True, stacking="{depth: {low: 1, high: 3}}")
    text = space.read_text().replace("method: task_arithmetic\n", "")
    text = text.replace("parameters: {weight: {low: 0.0, high: 1.0}}\n", "")
    space.write_text(text.replace("baselines: []", "baselines: [uniform, experts, defaults]"))
    trials = baseline_trials(SearchSpace.from_yaml(space))
    assert [label for label, _ in trials] == ["expert:e1", "expert:e2"]
    for (_, params), label in zip(trials, ("e1", "e2"), strict=True):
        assert {params[f"stack.p{p:02d}.source"] for p in range(3)} == {label}
        assert params["stack.depth"] == 2  # the sources' own 2 layers
