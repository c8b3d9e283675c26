"""Model card: front matter, escaping, score tables, the leaderboard section, license rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.eval.leaderboard_card import LEADERBOARD_BEGIN, LEADERBOARD_END, replace_leaderboard
from evomerge.export.card import (
    CardInputs,
    ScoreRow,
    SearchSummary,
    build_card,
    common_license,
    fence,
    hub_ids,
    md_escape,
    read_license,
    render_body,
    score_table,
)


def _inputs(**kw) -> CardInputs:
    base = dict(
        name="my*merge",
        method="ties",
        method_doc="TIES merging: trim, elect sign, merge.",
        method_reference="Yadav et al. 2023, https://arxiv.org/abs/2306.01708",
        models=["org/base", "org/expert_a@abc123", "local|odd/dir/x"],
        base_model="org/base",
        recipe_yaml="merge_method: ties\nbase_model: org/base\n",
        summary=SearchSummary(
            study="st_1",
            trial=7,
            sampler="tpe",
            seed=3,
            n_trials=12,
            n_complete=9,
            n_pruned=2,
            n_failed=1,
            wall_time_s=3725.0,
            objectives=["maximize mean"],
        ),
        tasks=["add", "rev|x"],
        scores=[
            ScoreRow("winner (trial 7)", {"add": 0.5, "rev|x": 0.25}, {"add": 0.75, "rev|x": 0.5}),
            ScoreRow("base", {"add": 0.0, "rev|x": 0.5}, {"add": 0.0}),
        ],
        license="apache-2.0",
    )
    base.update(kw)
    return CardInputs(**base)


def test_md_escape_and_fence():
    assert md_escape("a*b_c|d [x](y) <t>") == r"a\*b\_c\|d \[x\](y) \<t\>"
    assert md_escape("plain-name.v1") == "plain-name.v1"
    text = "x: ```\n"
    block = fence(text, "yaml")
    assert block.startswith("````yaml\n") and block.endswith("\n````")


def test_hub_ids_drop_local_folders_and_revisions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo" / "base").mkdir(parents=True)
    refs = ["org/a", "org/b@rev1", "zoo/base", "./x", "a/b/c", "org/a"]
    assert hub_ids(refs) == ["org/a", "org/b"]


def test_score_table_means_and_missing_cells():
    rows = [ScoreRow("w", heldout={"a": 0.5, "b": 0.25}), ScoreRow("base", heldout={"a": 1.0})]
    table = score_table(rows, ["a", "b"], "heldout").splitlines()
    assert table[0] == "| model | a | b | mean |"
    assert table[2] == "| w | 0.5000 | 0.2500 | 0.3750 |"  # (0.5 + 0.25) / 2
    assert table[3] == "| base | 1.0000 | – | – |"  # no mean over a partial row


def test_card_front_matter_parses(tmp_path):
    from huggingface_hub import ModelCard

    path = tmp_path / "README.md"
    build_card(_inputs()).save(path)
    text = path.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["tags"] == ["merge", "evomerge", "mergekit"]
    assert front["library_name"] == "transformers"
    assert front["license"] == "apache-2.0"
    assert front["base_model"] == ["org/base", "org/expert_a"]
    assert front["base_model_relation"] == "merge" and front["pipeline_tag"] == "text-generation"
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"
    body = card.text
    assert "# my\\*merge" in body
    assert "| winner (trial 7) | 0.7500 | 0.5000 | 0.6250 |" in body
    assert "| search | |" not in body
    assert "| wall time | 1h 02m 05s |" in body
    assert "rev\\|x" in body and "local\\|odd/dir/x" in body
    assert "mergekit-yaml recipe.yaml" in body and "evomerge merge recipe.yaml" in body
    assert "```yaml\nmerge_method: ties\nbase_model: org/base\n```" in body


def test_no_license_when_sources_disagree():
    card = build_card(_inputs(license=None, licenses_found={"org/base": "mit", "x": None}))
    assert "license" not in card.data.to_dict()
    assert "licenses differ or are unknown" in card.text


def test_leaderboard_section_replaced_in_place():
    text = render_body(_inputs())
    assert text.count(LEADERBOARD_BEGIN) == 1 and text.count(LEADERBOARD_END) == 1
    once = replace_leaderboard(text, "| task | acc |\n|---|---|\n| hs | 0.5 |")
    twice = replace_leaderboard(once, "| task | acc |\n|---|---|\n| hs | 0.5 |")
    assert once == twice
    assert "| hs | 0.5 |" in once and "No leaderboard run yet" not in once
    assert once.split(LEADERBOARD_END)[1] == text.split(LEADERBOARD_END)[1]  # rest untouched
    bare = replace_leaderboard("# card\n", "x")
    assert bare == f"# card\n\n## Leaderboard\n\n{LEADERBOARD_BEGIN}\nx\n{LEADERBOARD_END}\n"


def test_random_method_reproduce_note():
    body = render_body(_inputs(method_random=True, random_seed=42))
    assert "--random-seed 42" in body


@pytest.mark.parametrize(
    ("readme", "config", "expected"),
    [
        ("---\nlicense: mit\n---\n# m\n", {}, "mit"),
        (None, {"license": "apache-2.0"}, "apache-2.0"),
        ("# no front matter\n", {}, None),
    ],
)
def test_read_license(tmp_path: Path, readme, config, expected):
    if readme is not None:
        (tmp_path / "README.md").write_text(readme)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_license(tmp_path) == expected


def test_common_license():
    assert common_license({"a": "mit", "b": "mit"}) == "mit"
    assert common_license({"a": "mit", "b": "apache-2.0"}) is None
    assert common_license({"a": "mit", "b": None}) is None
    assert common_license({}) is None
