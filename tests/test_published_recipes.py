"""The corpus of published recipes (tests/recipes/published/: mergekit's examples, model cards of
merged models; each file names its source and what was changed) on tiny stand-in models.

Every recipe merges through `evomerge merge`, loads in transformers and runs a forward pass, and
equals mergekit 0.1.5's output (run_merge in .mergekit-venv; skipped without it, failed in CI):
bit for bit up to the float32 tolerance of test_mergekit_recipes.py (16-bit outputs: within
the rounding of mergekit's 16-bit arithmetic, HALF_STEPS), and for
recipes with a random method (DARE, DELLA) by the kept fraction and the spread of the change
from the base, as scripts/compare_mergekit.py compares them. Multi-document recipes run in
mergekit one stage at a time, each stage's name replaced by its output folder (what mergekit's
mega/multi drivers do). Where mergekit fails, MERGEKIT_FAILS names the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_tensors, write_tiny_model
from test_mergekit_recipes import PUBLISHED, _assert_same_checkpoint, require_mergekit, run_mergekit

from evomerge.cli import main as cli_main

RECIPES = sorted(p.name for p in PUBLISHED.glob("*.yaml"))
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
STAND_IN = re.compile(r"stand-in/([A-Za-z0-9-]+)")
# recipe -> (what mergekit 0.1.5 raises, why): these are compared with evomerge's hand-checked
# tests instead (test_mergekit_recipes.py)
MERGEKIT_FAILS = {
    "passthrough_qwen2_frankenmerge.yaml": (
        "validate_layer_type",  # "num_hidden_layers (6) must be equal to ... layer_types (4)"
        "mergekit 0.1.5 under transformers 5 does not re-index a Qwen2 config's layer_types when"
        " a passthrough changes the layer count",
    ),
}

# recipe -> (what evomerge's one-line error says, why): published spellings evomerge refuses
# (exit 2) where mergekit merges something; mergekit is still run on them (it must merge)
EVOMERGE_REFUSES = {
    "gradient_slerp_pattern.yaml": (
        "unknown key 'pattern'. Available: filter, value",
        "mergekit 0.1.5 drops the unknown `pattern:` key, so its first entry applies the "
        "self_attn gradient to every tensor: not what the recipe says, so evomerge refuses",
    ),
}
# 16-bit outputs: mergekit computes in the recipe's dtype (its inputs are loaded as bfloat16 or
# float16 and merged there), evomerge in float32 and rounds once at the end, so the two differ by
# the rounding of each step: allowed HALF_STEPS units of the dtype's epsilon times the tensor's
# largest |value| (a loose bound; the vocabulary-sized tensors, of larger values, differ most)
HALF_STEPS = 16
SIGN_FLIPS = 0.005  # fraction of a tensor's entries (see _same_up_to_half_rounding)


def test_the_corpus_is_large_enough():
    assert len(RECIPES) >= 25
    for name in RECIPES:  # every recipe names where it comes from and what was changed
        head = (PUBLISHED / name).read_text().split("\n", 6)
        assert head[0].startswith("#") and "Changed" in (PUBLISHED / name).read_text(), name


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    """The tiny models the recipes' `stand-in/NAME` references become."""
    from test_lora import _make_adapter  # peft-made adapters, as tests/test_lora.py makes them

    root = tmp_path_factory.mktemp("standins")
    out: dict[str, Path] = {}
    for i, name in enumerate(("base", "x", "y", "z")):
        out[name] = write_tiny_model(root / name, seed=30 + i, num_layers=4)
    for i, name in enumerate(("base", "x", "y")):
        out[f"mistral-{name}"] = write_tiny_model(
            root / f"mistral-{name}", arch="mistral", seed=40 + i, num_layers=4
        )
        out[f"bf16-{name}"] = write_tiny_model(
            root / f"bf16-{name}", seed=50 + i, num_layers=4, dtype=torch.bfloat16
        )
    for i, name in enumerate(("x", "y")):
        out[f"qwen2-{name}"] = write_tiny_model(
            root / f"qwen2-{name}", arch="qwen2", seed=60 + i, num_layers=4, tie=True
        )
    qv = {"target_modules": ["q_proj", "v_proj"]}
    _make_adapter(out["base"], root / "lora-qv", seed=70, options=qv)
    _make_adapter(out["base"], root / "lora-rs", seed=71, options={**qv, "use_rslora": True})
    out["lora-qv"], out["lora-rs"] = root / "lora-qv", root / "lora-rs"
    return out


def _docs(name: str, standins: dict[str, Path]) -> list[dict]:
    text = STAND_IN.sub(lambda m: str(standins[m.group(1)]), (PUBLISHED / name).read_text())
    return [d for d in yaml.safe_load_all(text) if d]


def _is_random(docs: list[dict]) -> bool:
    return any(d.get("merge_method") in RANDOM for d in docs)


@pytest.fixture(scope="module")
def ours(standins, tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """`evomerge merge` of every recipe: (exit code, output folder)."""
    root = tmp_path_factory.mktemp("ours")
    out = {}
    for name in RECIPES:
        cfg = root / name
        cfg.write_text(yaml.safe_dump_all(_docs(name, standins)))
        dest = root / name.removesuffix(".yaml")
        out[name] = (cli_main(["merge", str(cfg), str(dest), "--no-progress", "--seed", "7"]), dest)
    return out


@pytest.fixture(scope="module")
def theirs(standins, tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """mergekit's output folder of every recipe and its error (None when it merged)."""
    require_mergekit()
    root = tmp_path_factory.mktemp("theirs")
    jobs, finals = [], {}
    for name in RECIPES:
        stages: dict[str, str] = {}
        docs = _docs(name, standins)
        for k, doc in enumerate(docs):
            doc = yaml.safe_load(  # earlier stages' names -> their output folders
                re.sub(r"model: (\S+)", lambda m, s=stages: f"model: {s.get(m[1], m[1])}",
                       yaml.safe_dump(doc))
            )  # fmt: skip
            dest = root / f"{name.removesuffix('.yaml')}-{k}"
            (root / f"{dest.name}.yaml").write_text(yaml.safe_dump(doc))
            jobs.append((str(root / f"{dest.name}.yaml"), str(dest)))
            if doc.get("name"):
                stages[doc["name"]] = str(dest)
        finals[name] = dest
    errors = run_mergekit(jobs, lora_cache=root / "lora-cache")
    return {name: (dest, errors.get(str(dest))) for name, dest in finals.items()}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_merges_and_runs_in_transformers(ours, name):
    from transformers import AutoModelForCausalLM

    rc, out = ours[name]
    if name in EVOMERGE_REFUSES:
        assert rc == 2 and not out.exists(), name
        return
    assert rc == 0, name
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13, 2]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits.float()).all()


def _same_up_to_half_rounding(ours: Path, theirs: Path, elects: bool) -> None:
    to, tm = load_tensors(ours), load_tensors(theirs)
    assert sorted(to) == sorted(tm)
    off = total = 0
    for n, want in tm.items():
        assert to[n].dtype == want.dtype, n
        tol = HALF_STEPS * torch.finfo(want.dtype).eps * float(want.float().abs().max())
        off += int(((to[n].float() - want.float()).abs() > tol).sum())
        total += want.numel()
    # a sign election whose sum is near zero may come out the other way in 16-bit sums: those
    # entries keep another set of models (a few per thousand of the model at most)
    assert off <= (SIGN_FLIPS * total if elects else 0), (off, total)


def _delta_stats(out: Path, base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of entries that differ from the base, std of the change) over the model."""
    merged = load_tensors(out)
    deltas = [(merged[k].float() - base[k].float()).reshape(-1) for k in base if k in merged]
    d = torch.cat(deltas)
    return float((d != 0).float().mean()), float(d.std())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_equals_mergekit(ours, theirs, standins, name):
    rc, out = ours[name]
    dest, error = theirs[name]
    if name in EVOMERGE_REFUSES:
        assert rc == 2 and error is None, error
        return
    assert rc == 0
    if name in MERGEKIT_FAILS:
        assert error is not None and MERGEKIT_FAILS[name][0] in error, error
        return
    assert error is None, f"mergekit failed on {name}: {error}"
    docs = _docs(name, standins)
    if not _is_random(docs):
        if all(d.get("dtype", "float32") == "float32" for d in docs[-1:]):
            _assert_same_checkpoint(out, dest)
        else:
            elects = docs[-1]["merge_method"] in ("ties", "breadcrumbs_ties")
            _same_up_to_half_rounding(out, dest, elects)
        return
    base_ref = docs[-1].get("base_model") or docs[-1]["models"][0]["model"]
    base = load_tensors(Path(base_ref))
    (k_ours, s_ours), (k_theirs, s_theirs) = _delta_stats(out, base), _delta_stats(dest, base)
    assert k_ours == pytest.approx(k_theirs, abs=0.03), (k_ours, k_theirs)
    assert s_ours == pytest.approx(s_theirs, rel=0.1), (s_ours, s_theirs)
