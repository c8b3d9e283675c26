"""Search-space YAML -> validated plain data (ParamSpec, ObjectiveSpec, SpaceSpec).

Every rule is checked here, at load time, with a one-line ConfigError naming the YAML location.
Parameter kinds, bounds and defaults come from the merge method registry (never re-declared).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.common.model_dir import has_config, num_layers, read_config
from evomerge.errors import ConfigError, check_keys, did_you_mean
from evomerge.merge.table import get_method
from evomerge.search.catalog import DEFAULT_PRUNER, PRUNERS, SAMPLERS
from evomerge.search.constraints import check_box
from evomerge.search.params import ParamSpec, method_params
from evomerge.search.stacking import CMAES_REFUSAL, StackSpec, parse_stacking

TOP_KEYS = (
    "name",
    "base_model",
    "models",
    "method",
    "parameters",
    "method_parameters",
    "tasks",
    "objective",
    "objectives",
    "constraint",
    "eval",
    "search",
    "baselines",
    "num_layers",
    "dtype",
    "random_seed",
    "stacking",  # a layer-stacking genome (search/stacking.py)
)
EVAL_KEYS = (
    "chunks",
    "heldout_fraction",
    "backend",
    "device",
    "seed",
    "heldout_top_k",
    "fidelity_sample",  # COMPLETE trials re-scored on held-out for the proxy's Spearman
    "batch_size",
    "self_check",  # start-up: a candidate and back must leave the base's scores unchanged
    "verify_transfer",  # vLLM: fingerprint every weight push against what was merged
    "vllm",  # vllm.LLM keyword arguments (checked in loop/preflight.py against EngineArgs)
    "lm_eval",  # lm-eval task options: num_fewshot, apply_chat_template, gen_kwargs...
    "inputs",  # where the merger's inputs live: auto | device | host (loop/memory.py)
)
SEARCH_KEYS = (
    "sampler",
    "n_trials",
    "timeout",
    "seed",
    "pruner",
    "sampler_options",
    "pruner_options",
    "heartbeat",
    "grace_period",
    "penalty",
)


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    weights: dict[str, float]
    direction: str | None  # None: inferred from the tasks' higher_is_better


@dataclass
class SpaceSpec:
    name: str
    source: str
    base_model: str | None
    models: list[str]
    labels: list[str]
    methods: list[str]
    params: dict[str, list[ParamSpec]]  # method -> its parameter specs (relative ones last)
    tasks: list[str]
    task_names: list[str]
    objectives: list[ObjectiveSpec]
    max_drop: float | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)
    num_layers: int | None = None
    dtype: str | None = None
    random_seed: int | None = None
    stacking: StackSpec | None = None

    @property
    def categorical(self) -> bool:
        return len(self.methods) > 1


def _labels(models: list[str]) -> list[str]:
    """Short unique labels for optuna parameter names: folder names, or m0, m1... on clashes."""
    names = [Path(m.split("@")[0].rstrip("/")).name or f"m{i}" for i, m in enumerate(models)]
    if len(set(names)) < len(names):
        return [f"m{i}" for i in range(len(models))]
    return names


def _task_name(spec: str) -> list[str]:
    """Names a task spec provides: a YAML file's `task:`/`group:` entries, else the name itself."""
    if not spec.endswith((".yaml", ".yml")):
        return [spec]
    import yaml

    with open(spec) as f:
        doc = yaml.safe_load(f) or {}
    names = [Path(spec).stem]
    for key in ("task", "group"):
        val = doc.get(key)
        names += [val] if isinstance(val, str) else [v for v in (val or []) if isinstance(v, str)]
    return names


def _objectives(data: dict, names: list[str], src: str) -> list[ObjectiveSpec]:
    if "objective" in data and "objectives" in data:
        raise ConfigError(f"{src}: give 'objective' or 'objectives', not both")
    raw = data.get("objectives") or [data.get("objective") or {}]
    out = []
    for k, obj in enumerate(raw):
        where = f"{src}: objectives[{k}]" if "objectives" in data else f"{src}: objective"
        if isinstance(obj, str):
            obj = {"task": obj}
        check_keys(obj, ("name", "task", "tasks", "direction"), where, "objective key")
        weights = obj.get("tasks") or ({obj["task"]: 1.0} if "task" in obj else None)
        weights = weights or {n: 1.0 for n in names}
        if isinstance(weights, list):
            weights = {t: 1.0 for t in weights}
        for t in weights:
            if t not in names:
                raise ConfigError(f"{where}: {did_you_mean(t, names, 'task')}")
        direction = obj.get("direction")
        if direction not in (None, "maximize", "minimize"):
            raise ConfigError(
                f"{where}.direction: expected maximize or minimize, but got {direction!r}"
            )
        name = obj.get("name") or ("+".join(weights) if len(raw) > 1 else "objective")
        out.append(ObjectiveSpec(name, {t: float(w) for t, w in weights.items()}, direction))
    return out


def _num_layers(data: dict, base: str | None, models: list[str]) -> int | None:
    """`num_layers:` if given, else the first local model folder's config (None if none)."""
    n = data.get("num_layers")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_layers: expected an integer >= 1, but got {n!r}")
        return n
    for m in [base, *models]:
        m = m and m.partition("+")[0]  # BASE+ADAPTER: the base's config
        if m and has_config(m):
            return num_layers(read_config(m))
    return None


# top-level keys whose value must have one shape (checked first: later code iterates them)
_SHAPES: dict[str, tuple[tuple[type, ...], str]] = {
    "models": ((list,), "a list of model paths"),
    "tasks": ((list,), "a list of task names or YAML files"),
    "method": ((str, list), "a method name or a list of names"),
    **{
        k: ((dict,), "a mapping")
        for k in ("parameters", "method_parameters", "eval", "search", "constraint")
    },
}


def _check_types(data: dict, source: str) -> None:
    for key, (types, what) in _SHAPES.items():
        v = data.get(key)
        if v is not None and not isinstance(v, types):
            raise ConfigError(f"{source}: {key}: expected {what}, but got {v!r}")
    method = data.get("method")
    if isinstance(method, list) and not all(isinstance(m, str) for m in method):
        raise ConfigError(f"{source}: method: expected method names, but got {method!r}")


def parse_space(data: Any, source: str = "<space>") -> SpaceSpec:
    """Validate a search-space mapping (a parsed YAML document) into a SpaceSpec."""
    check_keys(data, TOP_KEYS, source, "search-space key")
    _check_types(data, source)
    models = [str(m) for m in data.get("models") or []]
    if not models:
        raise ConfigError(f"{source}: models: expected a list of model paths, but got none")
    method_raw = data.get("method", "linear")
    names = [method_raw] if isinstance(method_raw, str) else list(method_raw)
    try:
        methods = [get_method(str(n)) for n in names]
    except ConfigError as exc:
        raise ConfigError(f"{source}: method: {exc}") from None
    base = data.get("base_model")
    for m in methods:
        if m.needs_base and not base:
            raise ConfigError(f"{source}: method '{m.name}' needs base_model, but none is given")
    known = {p.name for m in methods for p in m.params}
    mp = data.get("method_parameters") or {}
    for key in mp:
        if key not in names:
            raise ConfigError(f"{source}: method_parameters: {did_you_mean(key, names, 'method')}")
    for section, entries in [
        ("parameters", data.get("parameters") or {}),
        *((f"method_parameters.{k}", v or {}) for k, v in mp.items()),
    ]:
        for pname in entries:
            if pname not in known and pname not in ("layer_groups", "filters"):
                raise ConfigError(f"{source}: {section}: {did_you_mean(pname, known, 'parameter')}")
    data = {**data, "parameters": dict(data.get("parameters") or {})}
    # a stacking space without `method:` searches no weights (stacking-only)
    weights = "stacking" not in data or "method" in data
    params = {
        m.name: method_params(
            {**data, "parameters": dict(data["parameters"])}, m, len(models), source
        )
        if weights
        else []
        for m in methods
    }
    tasks = [t if isinstance(t, str) else t.get("task") for t in data.get("tasks") or []]
    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"{source}: tasks: expected a list of task names or YAML files")
    for t in tasks:
        if t.endswith((".yaml", ".yml")) and not os.path.isfile(t):
            raise ConfigError(f"{source}: tasks: task file '{t}' not found")
    task_names = list(dict.fromkeys(n for t in tasks for n in _task_name(t)))  # stem == task
    spec = SpaceSpec(
        name=str(data.get("name") or Path(source).stem),
        source=source,
        base_model=base,
        models=models,
        labels=_labels(models),
        methods=names,
        params=params,
        tasks=tasks,
        task_names=task_names,
        objectives=_objectives(data, task_names, source),
        eval=dict(data.get("eval") or {}),
        search=dict(data.get("search") or {}),
        baselines=list(data.get("baselines", ["uniform", "experts", "defaults"])),
        num_layers=_num_layers(data, base, models),
        dtype=data.get("dtype"),
        random_seed=data.get("random_seed"),
    )
    if "stacking" in data:
        spec.stacking = parse_stacking(
            data["stacking"], models, spec.labels, base, weights, spec.num_layers, source
        )
    _check_rest(spec, data)
    if weights:
        check_box(source, models, base, params)  # every point of the box must be mergeable
    return spec


def _check_rest(spec: SpaceSpec, data: dict) -> None:
    src = spec.source
    check_keys(spec.eval, EVAL_KEYS, f"{src}: eval", "eval key")
    check_keys(spec.search, SEARCH_KEYS, f"{src}: search", "search key")
    batch = spec.eval.get("batch_size", 64)
    if batch != "auto" and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ConfigError(
            f"{src}: eval.batch_size: expected an integer >= 1 or 'auto', but got {batch!r}"
        )
    for flag in ("self_check", "verify_transfer"):
        if not isinstance(spec.eval.get(flag, True), bool):
            raise ConfigError(
                f"{src}: eval.{flag}: expected true or false, but got {spec.eval[flag]!r}"
            )
    _check_values(spec)
    sampler = spec.search.get("sampler", default_sampler(spec))
    if sampler not in SAMPLERS:
        raise ConfigError(f"{src}: search.sampler: {did_you_mean(sampler, SAMPLERS, 'sampler')}")
    pruner = spec.search.get("pruner", DEFAULT_PRUNER)
    if pruner not in PRUNERS:
        raise ConfigError(f"{src}: search.pruner: {did_you_mean(pruner, PRUNERS, 'pruner')}")
    for kind, names in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        table = spec.search.get(f"{kind}_options")
        if table is None:
            continue
        where = f"{src}: search.{kind}_options"
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ConfigError(
                f"{where}: expected {{{kind} name: {{keyword: value}}}}, but got {table!r}"
            )
        for key in table:
            if key not in names:
                raise ConfigError(f"{where}: {did_you_mean(key, names, kind)}")
    constraint = data.get("constraint") or {}
    check_keys(constraint, ("max_drop",), f"{src}: constraint", "constraint key")
    if "max_drop" in constraint:
        if not spec.base_model:
            raise ConfigError(
                f"{src}: constraint.max_drop compares with the base model, "
                "but no base_model is given"
            )
        if not _number_ok(constraint["max_drop"], False, 0, True, None):
            raise ConfigError(
                f"{src}: constraint.max_drop: expected a number of points >= 0, "
                f"but got {constraint['max_drop']!r}"
            )
        spec.max_drop = float(constraint["max_drop"])
    if any(s.groups > 1 for ps in spec.params.values() for s in ps) and not spec.num_layers:
        raise ConfigError(
            f"{src}: layer_groups needs the layer count: give 'num_layers' "
            "(the base model's config.json was not found)"
        )
    for ps in spec.params.values():
        for s in ps:
            if spec.num_layers and s.groups > spec.num_layers:
                raise ConfigError(
                    f"{src}: parameters.{s.name}.layer_groups: at most num_layers="
                    f"{spec.num_layers} groups, but got {s.groups}"
                )
    for b in spec.baselines:
        if b not in ("uniform", "experts", "defaults") and not os.path.isfile(b):
            raise ConfigError(
                f"{src}: baselines: expected uniform, experts, defaults or a recipe "
                f"YAML file, but got '{b}' (file not found)"
            )


def default_sampler(spec: SpaceSpec) -> str:
    """The sampler of a space that names none: GP (with the default pruner, the best of the
    README's search benchmark), except for a choice between methods: each method's parameters
    exist only in its own trials, and GP models only the parameters every trial shares
    (the rest are drawn at random), so such a space gets TPE."""
    return "tpe" if spec.categorical or spec.stacking is not None else "gp"


# search:/eval: values read as numbers: (section, key) -> (integer?, low, low allowed?, high)
_NUMBERS: dict[tuple[str, str], tuple[bool, float | None, bool, float | None]] = {
    ("search", "n_trials"): (True, 1, True, None),
    ("search", "timeout"): (False, 0, False, None),
    ("search", "seed"): (True, None, True, None),
    ("search", "heartbeat"): (True, 1, True, None),
    ("search", "grace_period"): (True, 1, True, None),
    ("search", "penalty"): (False, 0, True, None),
    ("eval", "seed"): (True, None, True, None),
    ("eval", "heldout_top_k"): (True, 0, True, None),
    ("eval", "fidelity_sample"): (True, 0, True, None),
    ("eval", "heldout_fraction"): (False, 0, True, 1),
}


def _number_ok(v: Any, integer: bool, low: float | None, closed: bool, high: float | None) -> bool:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or v != v:
        return False  # YAML's true is not 1; NaN is no bound
    if low is not None and (v < low if closed else v <= low):
        return False
    return high is None or v <= high


def _check_values(spec: SpaceSpec) -> None:
    """Every number of `search:` and `eval:`, checked here even when a command-line option
    overrides it (`n_trials: many` is a broken space whatever --n-trials says)."""
    for (section, key), (integer, low, closed, high) in _NUMBERS.items():
        v = getattr(spec, section).get(key)
        if v is None or _number_ok(v, integer, low, closed, high):
            continue
        rule = "" if low is None else f" {'>=' if closed else '>'} {low:g}"
        rule = f" in [{low:g}, {high:g}]" if high is not None else rule
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{spec.source}: {section}.{key}: expected {what}{rule}, but got {v!r}")
    device = spec.eval.get("device")
    if device is not None and not isinstance(device, str):
        raise ConfigError(f"{spec.source}: eval.device: expected cpu or cuda, but got {device!r}")


def check_sampler(spec: SpaceSpec, sampler: str) -> None:
    """Reject a sampler that cannot handle the space (one line, before any trial runs)."""
    if sampler not in SAMPLERS:
        raise ConfigError(did_you_mean(sampler, SAMPLERS, "sampler"))
    if sampler != "cmaes":
        return
    if spec.stacking is not None:
        raise ConfigError(f"{spec.source}: {CMAES_REFUSAL}")
    if spec.categorical:
        raise ConfigError(
            f"{spec.source}: sampler cmaes cannot search a categorical method "
            f"choice {spec.methods}; use tpe or gp"
        )
    if len(spec.objectives) > 1:
        raise ConfigError(
            f"{spec.source}: sampler cmaes is single-objective, but the space has "
            f"{len(spec.objectives)} objectives; use nsga2, tpe or gp"
        )
    if any(s.choices for ps in spec.params.values() for s in ps if s.searched):
        raise ConfigError(
            f"{spec.source}: sampler cmaes cannot search categorical parameters "
            "(choices); use tpe or gp"
        )
