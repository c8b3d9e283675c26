"""evomerge leaderboard: lm-eval's numbers on a tiny model and a tiny local task group, the saved
files and the model card section."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.eval.leaderboard_card import LEADERBOARD_BEGIN

MC_DOCS = [
    {"q": "abc", "choices": ["d", "x", "a"], "gold": 0},
    {"q": "123", "choices": ["4", "9", "1"], "gold": 0},
    {"q": "xyz", "choices": ["a", "b", "z"], "gold": 2},
    {"q": "aaa", "choices": ["a", "b", "c"], "gold": 0},
    {"q": "cba", "choices": ["a", "z", "b"], "gold": 1},
]
GEN_DOCS = [{"p": "ab", "a": "c"}, {"p": "12", "a": "3"}, {"p": "xy", "a": "z"}]


def _write_tasks(folder: Path, data_prefix: str) -> Path:
    """tiny_mc (multiple choice) + tiny_gen (generate_until) + group tiny_suite."""
    (folder / "data").mkdir(parents=True)
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        lines = "".join(json.dumps(d) + "\n" for d in docs)
        (folder / "data" / f"{name}.jsonl").write_text(lines)
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_prefix}data/mc.jsonl\n{common}"
        "output_type: multiple_choice\ndoc_to_text: '{{q}} ='\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_prefix}data/gen.jsonl\n{common}"
        "output_type: generate_until\ndoc_to_text: '{{p}}'\ndoc_to_target: '{{a}}'\n"
        "target_delimiter: ''\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 3\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    group = folder / "tiny_suite.yaml"
    group.write_text(
        "group: tiny_suite\ntask:\n  - tiny_mc\n  - tiny_gen\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return group


def _direct(model_dir: Path, task_dir: Path) -> dict:
    """The reference: lm-eval's simple_evaluate called directly, as a user would."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=16)
    manager = TaskManager(include_defaults=False, include_path=[str(task_dir)])
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["tiny_suite"],
        task_manager=manager,
        cache_requests=False,
        bootstrap_iters=1000,
    )
    return out["results"]


@pytest.fixture
def suite(tmp_path: Path, tiny_model, monkeypatch) -> tuple[Path, Path, Path]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_model("m", arch="llama", seed=3, hidden=32)
    group = _write_tasks(tmp_path / "tasks", "")  # relative data paths, as in evals/
    ref_dir = tmp_path / "ref_tasks"
    _write_tasks(ref_dir, f"{ref_dir}/")  # absolute data paths for the direct call
    return model, group, ref_dir


def test_values_equal_a_direct_simple_evaluate(suite):
    from evomerge.eval.leaderboard import run_leaderboard

    model, group, ref_dir = suite
    df = run_leaderboard(model, str(group), "hf", None, device="cpu")
    want = _direct(model, ref_dir)
    rows = {(r.task, r.metric): r for r in df.itertuples(index=False)}
    assert set(rows) >= {
        ("tiny_mc", "acc"),
        ("tiny_mc", "acc_norm"),
        ("tiny_gen", "exact_match"),
        ("tiny_suite", "acc"),
    }
    for (task, metric), r in rows.items():
        assert r.value == pytest.approx(want[task][f"{metric},{r.filter}"], abs=1e-12)
        ref_err = want[task].get(f"{metric}_stderr,{r.filter}")
        if isinstance(ref_err, float):
            assert r.stderr == pytest.approx(ref_err, abs=1e-12)
    assert rows[("tiny_mc", "acc")].n_samples == len(MC_DOCS)
    assert rows[("tiny_mc", "acc")].n_shot == 0
    assert rows[("tiny_suite", "acc")].group
    # --limit cuts every task
    limited = run_leaderboard(model, str(group), "hf", 2, device="cpu")
    assert set(limited.loc[~limited.group, "n_samples"]) == {2}


def test_saved_files_and_card_are_replaced_not_appended(suite):
    import pandas as pd

    from evomerge.eval.leaderboard import run_leaderboard, save_leaderboard

    model, group, _ = suite
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# My merge\n\nBody.\n")
    df = run_leaderboard(model, str(group), "hf", 3, device="cpu")
    for _ in range(2):
        save_leaderboard(model, df, backend="hf", tasks=str(group))
    csv = pd.read_csv(model / "leaderboard.csv")
    assert list(csv["value"]) == pytest.approx(list(df["value"]))
    raw = json.loads((model / "leaderboard.json").read_text())
    acc = df[(df.task == "tiny_mc") & (df.metric == "acc")].value.item()
    assert raw["results"]["tiny_mc"]["acc,none"] == acc
    text = (model / "README.md").read_text()
    assert text.count(LEADERBOARD_BEGIN) == 1 and "Body." in text
    assert "license: apache-2.0" in text
    assert f"| tiny_mc | acc | none | 0 | {acc:.4f} |" in text
    from huggingface_hub import ModelCard

    card = ModelCard.load(model / "README.md")
    assert len(card.data.eval_results) == len(df)


def test_cli_writes_files_and_bad_input_exits_2(suite, capsys):
    from evomerge.cli import main

    model, group, _ = suite
    assert main(["leaderboard", str(model), "--tasks", str(group), "--limit", "2"]) == 0
    assert (model / "leaderboard.csv").is_file() and (model / "README.md").is_file()
    assert "tiny_mc" in capsys.readouterr().out
    assert main(["leaderboard", str(model.parent / "nope"), "--tasks", str(group)]) == 2
    assert main(["leaderboard", str(model), "--tasks", str(group), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_hub_datasets_missing_offline_is_a_config_error(tmp_path, monkeypatch):
    from evomerge.eval.leaderboard import check_hub_data
    from evomerge.eval.task_specs import local_task_manager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(c, "HF_HOME", str(tmp_path / "hf_home"))
    (tmp_path / "hubtask.yaml").write_text(
        "task: hubtask\ndataset_path: someorg/somedata\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{x}}'\ndoc_to_target: '{{y}}'\n"
    )
    manager = local_task_manager([str(tmp_path / "hubtask.yaml")])
    with pytest.raises(ConfigError, match=r"someorg/somedata not in the local cache.*zoo_leader"):
        check_hub_data(manager, ["hubtask"])
    # once cached (hub cache layout), the check passes
    (tmp_path / "hf_home" / "hub" / "datasets--someorg--somedata").mkdir(parents=True)
    check_hub_data(manager, ["hubtask"])


@pytest.mark.slow  # indexes lm-eval's whole registry (~20 s)
def test_unknown_task_names_a_close_match():
    from evomerge.eval.leaderboard import resolve_tasks

    with pytest.raises(ConfigError, match="zoo_leaderboard"):
        resolve_tasks("zoo_leaderbord")


def test_results_frame_reads_lm_eval_output():
    from evomerge.eval.leaderboard import results_frame

    out = {
        "results": {"t": {"alias": "t", "acc,none": 0.25, "acc_stderr,none": "N/A"}},
        "n-shot": {"t": 5},
        "n-samples": {"t": {"original": 8, "effective": 4}},
    }
    (row,) = results_frame(out).itertuples(index=False)
    assert (row.task, row.metric, row.filter, row.value, row.n_shot) == (
        "t",
        "acc",
        "none",
        0.25,
        5,
    )
    assert math.isnan(row.stderr) and row.n_samples == 4


def test_generation_config_max_new_tokens_neither_warns_nor_cuts(suite, capfd):
    """A model whose generation_config.json sets max_new_tokens (the zoo's, many hub models'):
    lm-eval's max_gen_toks decides, and transformers' "Both `max_new_tokens` ... and
    `max_length`" warning is not printed."""
    from evomerge.eval.leaderboard import run_leaderboard

    model, group, _ = suite
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": 16}))
    capfd.readouterr()
    run_leaderboard(model, str(group.parent / "tiny_gen.yaml"), "hf", 2, device="cpu")
    captured = capfd.readouterr()
    assert "seem to have been set" not in captured.err + captured.out


def _lm_rows(values: dict[tuple[str, str], float]):
    """A results frame as results_frame makes it, from (task, metric) -> value."""
    import pandas as pd

    from evomerge.eval.leaderboard import COLUMNS

    rows = [
        {"task": t, "alias": t, "metric": m, "filter": "none", "value": v, "stderr": 0.01,
         "n_shot": 0, "n_samples": 10, "group": False}
        for (t, m), v in values.items()
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


# Hand-computed Open LLM Leaderboard v2 normalization, (raw - 1/k) / (1 - 1/k) * 100, clip at 0:
LB_RAW = {
    # BBH: three subtasks with k = 2, 11, 19 (their doc_to_choice lists in lm-eval's YAMLs)
    ("leaderboard_bbh_navigate", "acc_norm"): 0.75,  # (0.75 - 1/2) / (1/2) = 50.0
    ("leaderboard_bbh_geometric_shapes", "acc_norm"): 0.45,  # (0.45 - 1/11) / (10/11) = 39.5
    ("leaderboard_bbh_object_counting", "acc_norm"): 0.04,  # below 1/19: 0
    ("leaderboard_bbh", "acc_norm"): 0.41,  # lm-eval's group value: the raw column
    # MuSR: k = 2, 5, 3
    ("leaderboard_musr_murder_mysteries", "acc_norm"): 0.6,  # 20.0
    ("leaderboard_musr_object_placements", "acc_norm"): 0.4,  # (0.4 - 0.2) / 0.8 = 25.0
    ("leaderboard_musr_team_allocation", "acc_norm"): 0.5,  # (0.5 - 1/3) / (2/3) = 25.0
    ("leaderboard_gpqa", "acc_norm"): 0.3,  # k = 4: (0.3 - 0.25) / 0.75 = 6.6667
    ("leaderboard_mmlu_pro", "acc"): 0.28,  # k = 10: (0.28 - 0.1) / 0.9 = 20.0
    ("leaderboard_math_hard", "exact_match"): 0.05,  # generative: 5.0
    ("leaderboard_ifeval", "prompt_level_strict_acc"): 0.3,  # generative: mean of the two
    ("leaderboard_ifeval", "inst_level_strict_acc"): 0.4,  # (0.3 + 0.4) / 2 = 35.0
    ("leaderboard_ifeval", "prompt_level_loose_acc"): 0.9,  # not used by the leaderboard
}
LB_WANT = {
    "IFEval": (0.35, 35.0),
    "BBH": (0.41, (50.0 + 39.5 + 0.0) / 3),
    "MATH Lvl 5": (0.05, 5.0),
    "GPQA": (0.3, 0.05 / 0.75 * 100),
    "MuSR": ((0.6 + 0.4 + 0.5) / 3, (20.0 + 25.0 + 25.0) / 3),
    "MMLU-Pro": (0.28, 20.0),
}


def test_open_llm_leaderboard_normalization_by_hand():
    from evomerge.eval.leaderboard_norm import summary_frame, with_normalized

    got = {r.benchmark: (r.raw, r.normalized) for r in summary_frame(_lm_rows(LB_RAW)).itertuples()}
    for name, (raw, norm) in LB_WANT.items():
        assert got[name] == pytest.approx((raw, norm), abs=1e-9), name
    assert (0.45 - 1 / 11) / (10 / 11) * 100 == pytest.approx(39.5)  # the hand value above
    mean_raw = sum(r for r, _ in LB_WANT.values()) / 6
    mean_norm = sum(n for _, n in LB_WANT.values()) / 6
    assert got["Average"] == pytest.approx((mean_raw, mean_norm), abs=1e-9)
    # a subset: the average says over how many benchmarks
    part = {k: v for k, v in LB_RAW.items() if k[0].startswith("leaderboard_musr")}
    labels = list(summary_frame(_lm_rows(part)).benchmark)
    assert labels == ["MuSR", "Average (1 of 6)"]
    # per-row normalized values beside the raw ones
    full = with_normalized(_lm_rows(LB_RAW))
    rows = {(r.task, r.metric): r.normalized for r in full.itertuples()}
    assert rows[("leaderboard_bbh_geometric_shapes", "acc_norm")] == pytest.approx(39.5)
    assert rows[("leaderboard_bbh_object_counting", "acc_norm")] == 0.0
    assert math.isnan(rows[("leaderboard_ifeval", "prompt_level_loose_acc")])


def test_normalized_scores_in_csv_and_card(tmp_path: Path, tiny_model, capsys):
    """save_leaderboard + the card: raw and normalized side by side, with the average."""
    import pandas as pd
    from huggingface_hub import ModelCard

    from evomerge.eval.leaderboard import save_leaderboard

    model = tiny_model("m", arch="llama", seed=3, hidden=32)
    save_leaderboard(model, _lm_rows(LB_RAW), backend="hf", tasks="leaderboard")
    csv = pd.read_csv(model / "leaderboard.csv")
    summary = csv[csv.task == "open_llm_leaderboard_v2"].set_index("alias")
    for name, (raw, norm) in LB_WANT.items():
        assert summary.loc[name, "value"] == pytest.approx(raw)
        assert summary.loc[name, "normalized"] == pytest.approx(norm)
    assert summary.loc["Average", "normalized"] == pytest.approx(
        sum(n for _, n in LB_WANT.values()) / 6
    )
    card = ModelCard.load(model / "README.md")
    assert f"| GPQA | acc_norm | 0.3000 | {0.05 / 0.75 * 100:.2f} |" in card.text
    assert "| **Average** |" in card.text
    index = {(e.dataset_type, e.metric_type): e.metric_value for e in card.data.eval_results}
    assert index[("leaderboard_mmlu_pro", "normalized acc")] == pytest.approx(20.0)
    assert index[("leaderboard_mmlu_pro", "acc")] == pytest.approx(0.28)
