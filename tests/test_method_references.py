"""dare_ties, della, nuslerp, multislerp and karcher through `evomerge merge`, against references
that share no code with evomerge.merge: float64 numpy written from the published definitions
(as mergekit 0.1.5 implements and documents them), and mergekit 0.1.5 itself where it can draw
the same thing (its own venv, .mergekit-venv; those comparisons skip without it, fail in CI).

Random methods: mergekit draws its masks with torch.bernoulli and evomerge with keyed 16-bit
draws, so the masks cannot match draw for draw. The masks evomerge drew are read back from a
probe merge (the same recipe with one-hot weights over the task vectors themselves, base zero:
the output is that model's sparsified delta, zero exactly where it was dropped), checked against
their definition as statistics, and the rest of the arithmetic is recomputed independently:

- DARE (Yu et al. 2023): keep each entry with probability `density`; rescale. mergekit 0.1.5
  rescales by the L1 ratio |delta|_1 / |masked|_1 per tensor (rescale_norm l1), which is the
  paper's 1 / density in expectation; evomerge follows mergekit (asserted both ways below).
- DELLA (Deep et al. 2024, MAGPRUNE): within each row (dim 1), entry of magnitude rank r
  (0 = smallest) of n is kept with probability density - eps + 2 eps r / (n - 1), so the keep
  probability grows with magnitude and averages `density`; rescale as DARE (mergekit: the L1
  ratio per tensor, not the paper's per-entry 1 / (1 - p_i)).
- TIES sign election (Yadav et al. 2023): the elected sign of an entry is that of the sum of
  the weighted sparsified deltas (>= 0: +); each model's entry counts if its sign agrees; the
  disjoint mean divides by the summed weights of the agreeing models (none: 1); times lambda.
- nuslerp / multislerp / karcher: mergekit's documented formulas (see each reference).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_tensors, write_tiny_model
from safetensors.torch import save_file

from evomerge.cli import main as cli_main

HIDDEN = 64  # mlp matrices of 128 x 64: 8192 entries per tensor for the mask statistics
BIG = 4096  # tensors at least this large get the statistical checks
DARE = {"method": "dare_ties", "global": {"normalize": True, "lambda": 0.8},
        "models": [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.5},
                   {"weight": -0.4, "density": 0.7}]}  # fmt: skip
DELLA = {"method": "della", "global": {"lambda": 0.9},
         "models": [{"weight": 1.0, "density": 0.4, "epsilon": 0.1},
                    {"weight": 0.6, "density": 0.5, "epsilon": 0.15},
                    {"weight": 0.8, "density": 0.6, "epsilon": 0.2}]}  # fmt: skip
SEED = 11


# ---- checkpoints and merges --------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """Base + three variants: base + its own random draw (signs of the deltas disagree)."""
    root = tmp_path_factory.mktemp("refmodels")
    base = write_tiny_model(root / "base", seed=0, num_layers=1, hidden=HIDDEN)
    out = [base]
    base_sd = load_tensors(base)
    for i in (1, 2, 3):
        other = load_tensors(write_tiny_model(root / f"draw{i}", seed=i, num_layers=1,
                                              hidden=HIDDEN))  # fmt: skip
        sd = {k: v + 0.5 * other[k] for k, v in base_sd.items()}
        out.append(_with_tensors(base, root / f"m{i}", sd))
    return out


def _with_tensors(like: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of model folder `like` (config, tokenizer) holding `tensors` instead."""
    shutil.copytree(like, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return dst


def _recipe(spec: dict, base: Path | None, models: list[Path], weights=None) -> dict:
    entries = []
    for i, (m, p) in enumerate(zip(models, spec["models"], strict=True)):
        p = dict(p) if weights is None else {**p, "weight": weights[i]}
        entries.append({"model": str(m), "parameters": p})
    doc = {"merge_method": spec["method"], "dtype": "float32", "models": entries,
           "random_seed": SEED, "parameters": dict(spec["global"])}  # fmt: skip
    if base is not None:
        doc["base_model"] = str(base)
    return doc


def _cli_merge(doc: dict, out: Path) -> dict[str, np.ndarray]:
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(doc))
    assert cli_main(["merge", str(path), str(out), "--no-progress"]) == 0
    return {k: v.double().numpy() for k, v in load_tensors(out).items()}


def _f64(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_tensors(folder).items()}


def _deltas(models: list[Path]) -> list[dict[str, np.ndarray]]:
    """Each variant's task vector as evomerge and mergekit form it: float32 subtraction."""
    base = load_tensors(models[0])
    return [{k: (v - base[k]).double().numpy() for k, v in load_tensors(m).items()}
            for m in models[1:]]  # fmt: skip


def _drawn_masks(spec: dict, models: list[Path], tmp: Path) -> list[dict[str, np.ndarray]]:
    """The keep-masks evomerge drew for each model row: probe merges of the same recipe (same
    seed, densities, epsilons, model order) over checkpoints holding the task vectors, base zero,
    weight 1 on one model and 0 on the others. Without a base offset the output is exactly that
    model's sparsified delta, nonzero where kept (a random float32 delta is never exactly 0)."""
    base_sd = load_tensors(models[0])
    zero = _with_tensors(models[0], tmp / "probe_base", {k: torch.zeros_like(v)
                                                          for k, v in base_sd.items()})  # fmt: skip
    probes = [_with_tensors(models[0], tmp / f"probe_m{i}",
                            {k: v - base_sd[k] for k, v in load_tensors(m).items()})
              for i, m in enumerate(models[1:])]  # fmt: skip
    masks = []
    for i in range(len(probes)):
        onehot = [1.0 if j == i else 0.0 for j in range(len(probes))]
        spec1 = {**spec, "global": {**spec["global"], "lambda": 1.0}}
        out = _cli_merge(_recipe(spec1, zero, probes, onehot), tmp / f"probe_out{i}")
        masks.append({k: v != 0 for k, v in out.items()})
    return masks


# ---- the float64 references (no evomerge.merge code) -------------------------------------------


def l1_rescaled(delta: np.ndarray, mask: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """mask * delta, scaled to the L1 norm of delta (mergekit's rescale_norm l1)."""
    masked = delta * mask
    before, after = np.abs(delta).sum(), np.abs(masked).sum()
    return masked if before < eps or after < eps else masked * (before / after)


def ties_merge(base, sparse, weights, lam: float, normalize: bool) -> np.ndarray:
    """TIES sign election and disjoint mean over already sparsified deltas."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * base.ndim))
    wd = np.stack(sparse) * w
    elected = np.where(wd.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == elected
    mixed = (wd * agree).sum(axis=0)
    if normalize:
        divisor = (w * agree).sum(axis=0)
        mixed = mixed / np.where(divisor == 0, 1.0, divisor)
    return base + lam * mixed


def della_keep_prob(delta: np.ndarray, density: float, eps: float) -> np.ndarray:
    """Keep probability of each entry: its magnitude rank within its row (dim 1)."""
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    ranks = np.abs(rows).argsort(axis=1, kind="stable").argsort(axis=1, kind="stable")
    n = rows.shape[1]
    return ((density - eps) + 2 * eps * ranks / (n - 1)).reshape(delta.shape)


def slerp(t: float, v0: np.ndarray, v1: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Spherical interpolation along the last axis (mergekit nuslerp; colinear: lerp)."""
    u0 = v0 / np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    u1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    cos = np.clip((u0 * u1).sum(-1, keepdims=True), -1, 1)
    colinear = 1 - cos**2 <= eps**2
    theta = np.arccos(np.where(colinear, 0.0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    return np.where(colinear, (1 - t) * v0 + t * v1, out)


def multislerp(xs: list[np.ndarray], weights: list[float], eps: float = 1e-8) -> np.ndarray:
    """mergekit's multislerp: the weighted tangent-space mean of the unit vectors at their
    normalized weighted mean, mapped back (exp map), scaled by the weighted mean norm."""
    w = np.asarray(weights) / sum(weights)
    flat = np.stack([x.reshape(-1) for x in xs])
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    out = mean * np.cos(tn) + tangent * (np.sin(tn) / tn)
    return (out * (norms[:, 0] * w).sum()).reshape(xs[0].shape)


def karcher_residual(out: np.ndarray, xs: list[np.ndarray]) -> tuple[float, float]:
    """(|sum_i a_i log_m(u_i)|, |out| / sum_i a_i |x_i| - 1) for m = out / |out|, equal a_i:
    the Karcher mean on the sphere is where the mean of the log maps vanishes, and mergekit
    scales it by the mean norm."""
    m = out.reshape(-1) / np.linalg.norm(out)
    a = 1.0 / len(xs)
    grad = np.zeros_like(m)
    for x in xs:
        u = x.reshape(-1) / np.linalg.norm(x)
        dot = np.clip(u @ m, -1, 1)
        theta = np.arccos(dot)
        if theta > 1e-12:
            grad += a * theta / np.sin(theta) * (u - dot * m)
    scale = np.linalg.norm(out) / sum(a * np.linalg.norm(x) for x in xs)
    return float(np.linalg.norm(grad)), float(scale - 1)


# ---- random methods: masks as drawn, arithmetic recomputed -------------------------------------


def _sparse_reference(spec, models, masks) -> tuple[dict, list]:
    base, deltas = _f64(models[0]), _deltas(models)
    sparse = [{k: l1_rescaled(d[k], m[k]) for k in d} for d, m in zip(deltas, masks, strict=True)]
    weights = [p["weight"] for p in spec["models"]]
    normalize = spec["global"].get("normalize", spec["method"] == "della")
    ref = {k: ties_merge(base[k], [s[k] for s in sparse], weights, spec["global"]["lambda"],
                         normalize) for k in base}  # fmt: skip
    return ref, sparse


@pytest.mark.parametrize("spec", [DARE, DELLA], ids=["dare_ties", "della"])
def test_random_method_is_its_definition_given_the_drawn_masks(spec, models, tmp_path):
    masks = _drawn_masks(spec, models, tmp_path)
    ref, _ = _sparse_reference(spec, models, masks)
    out = _cli_merge(_recipe(spec, models[0], models[1:]), tmp_path / "out")
    assert out.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _binomial_ok(kept: int, n: int, p: float) -> bool:
    return abs(kept / n - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 2**-16  # 16-bit draws


def test_dare_masks_keep_density_and_rescale_as_defined(models, tmp_path):
    masks = _drawn_masks(DARE, models, tmp_path)
    deltas = _deltas(models)
    checked = 0
    for i, p in enumerate(DARE["models"]):
        for k, m in masks[i].items():
            if m.size < BIG:
                continue
            assert _binomial_ok(int(m.sum()), m.size, p["density"]), (k, m.mean(), p)
            # the L1 rescale is the paper's 1 / density up to the draw's noise
            factor = np.abs(deltas[i][k]).sum() / np.abs(deltas[i][k] * m).sum()
            assert abs(factor * p["density"] - 1) < 0.05, (k, factor)
            checked += 1
    assert checked >= 9
    # independent draws per model row: two rows' masks agree as often as chance says
    k = next(k for k in masks[0] if masks[0][k].size >= BIG)
    same = float((masks[0][k] == masks[1][k]).mean())
    assert abs(same - (0.3 * 0.5 + 0.7 * 0.5)) < 0.03


def test_della_masks_keep_more_of_the_larger_entries_as_defined(models, tmp_path):
    masks = _drawn_masks(DELLA, models, tmp_path)
    deltas = _deltas(models)
    checked = 0
    for i, p in enumerate(DELLA["models"]):
        for k, m in masks[i].items():
            if m.size < BIG:
                continue
            prob = della_keep_prob(deltas[i][k], p["density"], p["epsilon"])
            assert _binomial_ok(int(m.sum()), m.size, float(prob.mean())), (k, m.mean())
            quart = np.minimum((prob - prob.min()) / (prob.max() - prob.min()) * 4, 3).astype(int)
            kept = [float(m[quart == q].mean()) for q in range(4)]
            for q in range(4):  # each magnitude quartile keeps its defined share
                sel = quart == q
                assert _binomial_ok(int(m[sel].sum()), int(sel.sum()), float(prob[sel].mean()))
            assert kept == sorted(kept), (k, kept)  # larger magnitudes kept more often
            checked += 1
    assert checked >= 9


# ---- spherical methods: deterministic, reference formulas --------------------------------------


def test_nuslerp_flat_with_base_and_rowwise_without(models, tmp_path):
    base, (d1, d2, _) = _f64(models[0]), _deltas(models)
    m1, m2 = _f64(models[1]), _f64(models[2])
    w = [0.3, 0.9]
    t = w[1] / sum(w)
    flat = {"method": "nuslerp", "global": {},
            "models": [{"weight": w[0]}, {"weight": w[1]}]}  # fmt: skip
    out = _cli_merge(_recipe(flat, models[0], models[1:3]), tmp_path / "flat")
    for k in base:
        ref = base[k] + slerp(t, d1[k].reshape(-1), d2[k].reshape(-1)).reshape(base[k].shape)
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)
    rows = {**flat, "global": {"nuslerp_flatten": False}}
    out = _cli_merge(_recipe(rows, None, models[1:3]), tmp_path / "rows")
    for k in base:
        np.testing.assert_allclose(out[k], slerp(t, m1[k], m2[k]), rtol=1e-5, atol=1e-6)


def test_multislerp_with_base(models, tmp_path):
    base, deltas = _f64(models[0]), _deltas(models)
    w = [0.2, 0.6, 0.3]
    spec = {"method": "multislerp", "global": {}, "models": [{"weight": x} for x in w]}
    out = _cli_merge(_recipe(spec, models[0], models[1:]), tmp_path / "ms")
    for k in base:
        ref = base[k] + multislerp([d[k] for d in deltas], w)
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def spread(models, tmp_path_factory) -> list[Path]:
    """Three checkpoints far apart on the sphere at unequal angles (the task vectors d_i mixed:
    d1, 0.6 d1 + d2, -0.3 d1 + 0.2 d2 + d3), where Karcher's iteration has work to do (for
    nearby points one step from the normalized mean is already converged)."""
    root = tmp_path_factory.mktemp("spread")
    d = [{k: torch.from_numpy(v).float() for k, v in x.items()} for x in _deltas(models)]
    mixes = ((1, 0, 0), (0.6, 1, 0), (-0.3, 0.2, 1))
    return [_with_tensors(models[0], root / f"s{i}",
                          {k: sum(c * x[k] for c, x in zip(mix, d, strict=True)) for k in d[0]})
            for i, mix in enumerate(mixes)]  # fmt: skip


def test_karcher_is_the_karcher_mean(spread, tmp_path):
    xs = [_f64(m) for m in spread]
    spec = {"method": "karcher", "global": {}, "models": [{}, {}, {}]}
    out = _cli_merge(_recipe(spec, None, spread), tmp_path / "k")
    for k, v in out.items():
        grad, scale = karcher_residual(v, [x[k] for x in xs])
        # mergekit stops after 10 steps or at a tangent norm below tol = 1e-5
        assert grad < 5e-5 and abs(scale) < 1e-5, (k, grad, scale)  # one step short: ~5e-3


# ---- mergekit 0.1.5 on the same inputs ---------------------------------------------------------


def test_against_mergekit(models, spread, tmp_path):
    """mergekit merges the deterministic methods from the same files; for dare_ties and della it
    merges (as `ties` at density 1: no trimming, its own sign election, disjoint mean and
    lambda) checkpoints holding the task vectors evomerge sparsified and rescaled."""
    from test_mergekit_recipes import require_mergekit, run_mergekit

    require_mergekit()
    jobs, expect = [], {}
    for spec in (DARE, DELLA):
        masks = _drawn_masks(spec, models, tmp_path / spec["method"])
        _, sparse = _sparse_reference(spec, models, masks)
        base = load_tensors(models[0])
        pre = [_with_tensors(models[0], tmp_path / spec["method"] / f"pre{i}",
                             {k: base[k] + torch.from_numpy(s[k]).float() for k in base})
               for i, s in enumerate(sparse)]  # fmt: skip
        normalize = spec["global"].get("normalize", spec["method"] == "della")
        tie = {
            "method": "ties",
            "global": {**spec["global"], "normalize": normalize},
            "models": [{"weight": p["weight"], "density": 1.0} for p in spec["models"]],
        }
        mk = _recipe(tie, models[0], pre)
        mk.pop("random_seed")
        expect[spec["method"]] = _cli_merge(_recipe(spec, models[0], models[1:]),
                                            tmp_path / f"evo_{spec['method']}")  # fmt: skip
        jobs.append((spec["method"], mk))
    w2, w3 = [{"weight": 0.3}, {"weight": 0.9}], [{"weight": x} for x in (0.2, 0.6, 0.3)]
    for name, spec, base in (
        ("nuslerp", {"method": "nuslerp", "global": {}, "models": w2}, models[0]),
        ("nuslerp_rows", {"method": "nuslerp", "global": {"nuslerp_flatten": False},
                          "models": w2}, None),
        ("multislerp", {"method": "multislerp", "global": {}, "models": w3}, models[0]),
        ("karcher", {"method": "karcher", "global": {}, "models": [{}, {}, {}]}, None),
    ):  # fmt: skip
        n = len(spec["models"])
        doc = _recipe(spec, base, spread if name == "karcher" else models[1 : 1 + n])
        expect[name] = _cli_merge(doc, tmp_path / f"evo_{name}")
        doc.pop("random_seed")
        jobs.append((name, doc))
    files = []
    for name, doc in jobs:
        (tmp_path / f"mk_{name}.yaml").write_text(yaml.safe_dump(doc))
        files.append((str(tmp_path / f"mk_{name}.yaml"), str(tmp_path / f"mk_{name}")))
    assert run_mergekit(files) == {}
    for name, _ in jobs:
        got = _f64(tmp_path / f"mk_{name}")
        assert got.keys() == expect[name].keys(), name
        for k in got:
            np.testing.assert_allclose(expect[name][k], got[k], rtol=1e-5, atol=2e-6,
                                       err_msg=f"{name} {k}")  # fmt: skip
