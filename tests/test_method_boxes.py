"""Every point of every method's declared search box merges (#24): a property test over the
corners and random points of the box a space gets when it names each parameter with its
table bounds, merged on tiny models by the same CandidateMerger the search uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.merge.table import METHODS, method_names
from evomerge.search.space import SearchSpace

pytest.importorskip("optuna")


def _space_text(name: str, paths: list[Path], omit: str = "") -> str:
    """A space naming every parameter the method can search (but `omit`), over its declared
    bounds."""
    method = METHODS[name]
    inputs = max(method.min_models, 3)
    if method.max_models is not None:
        inputs = min(inputs, method.max_models)
    base, models = (None, paths[1:2]) if inputs == 1 else (paths[0], paths[1:inputs])
    if method.base_is_input and not method.needs_base:  # the base would be an input without a
        base, models = None, paths[1 : inputs + 1]  # weight of its own: no base for these
    lines = []
    for p in method.params:
        if p.name == omit:
            continue
        if p.kind == "bool":
            lines.append(f"  {p.name}: {{choices: [true, false]}}")
        elif p.search_low is not None:
            lines.append(f"  {p.name}: {{}}")  # the table's search_low .. search_high
    return (
        (f"base_model: {base}\n" if base else "")
        + f"models: [{', '.join(map(str, models))}]\nmethod: {name}\n"
        + ("parameters:\n" + "\n".join(lines) + "\n" if lines else "")
        + "tasks: [t]\nbaselines: []\n"
    )


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("box")
    return [write_tiny_model(root / k, seed=s, hidden=16) for s, k in enumerate("xabc")]


def _point(dist):
    """A strategy for one coordinate: either bound (the box's corners) or a point inside."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return st.sampled_from(list(dist.choices))
    if isinstance(dist, IntDistribution):
        return st.integers(dist.low, dist.high)
    inside = st.floats(dist.low, dist.high, allow_nan=False)
    return st.one_of(st.just(dist.low), st.just(dist.high), inside)


def _all_zero_linear(recipe) -> bool:
    """linear / multislerp normalizing weights that sum to 0 in float32 divide by 0 (mergekit:
    NaN): evomerge fails that one trial (linear: ConfigError; multislerp: NaN logits). The
    one point of the box (weights all 0, or below float32's smallest) that cannot merge."""
    import torch

    st_ = recipe.final
    weights = [float(m.parameters.get("weight", 1.0)) for m in st_.models]
    return (
        st_.merge_method in ("linear", "multislerp")
        and st_.parameters.get("normalize", st_.parameters.get("normalize_weights", True))
        is not False
        and float(torch.tensor(weights, dtype=torch.float32).sum()) == 0.0
    )


CASES = [(n, "") for n in method_names()] + [("della", "epsilon"), ("della_linear", "epsilon")]


@pytest.mark.parametrize(("name", "omit"), CASES)  # epsilon unset: it follows density
def test_every_point_of_the_declared_box_merges(zoo: list[Path], name: str, omit: str):
    import torch

    from evomerge.merge.candidate import CandidateMerger
    from evomerge.merge.io import open_checkpoint

    space = SearchSpace.from_text(_space_text(name, zoo, omit), f"{name}.yaml")
    dists = space.codec("tpe").distributions(name)
    first = space.decode({k: d.to_external_repr(d.low if hasattr(d, "low") else 0)
                          for k, d in dists.items()}).final  # fmt: skip
    refs = [m.model for m in first.models] + ([first.base_model] if first.base_model else [])
    merger = CandidateMerger(first, {str(r): open_checkpoint(r) for r in refs}, num_layers=2)

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(st.fixed_dictionaries({k: _point(d) for k, d in dists.items()}))
    def merges(params: dict) -> None:
        recipe = space.decode(params)
        if _all_zero_linear(recipe):
            return
        for tensor, merged in merger.merged(recipe.final):
            assert torch.isfinite(merged).all(), (tensor, params)

    merges()
