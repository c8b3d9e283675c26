"""Recipe: a superset of mergekit's YAML. Parsed from mergekit configs, produced by the search,
merged by `evomerge merge`, written by export.

A recipe is one or more YAML documents (stages); each is a mergekit config, plus `random_seed` and
`provenance:` (which mergekit ignores). `load_recipe` parses and validates everything that can be
checked before a tensor is read; `validate_layer_ranges` adds the checks that need model configs;
`dump_recipe` writes the same YAML back (`load_recipe(dump_recipe(r)) == r`).

This module holds the data model and the public API; the work is done in recipe_parse (YAML data
-> dataclasses) and recipe_check (validation against the method registry).
"""

from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from evomerge.errors import ConfigError

Scalar = float | int | bool | str


@dataclass
class FilterEntry:
    """One entry of a filter list: `{filter: self_attn, value: 0.3}`; filter None = the default."""

    filter: str | None
    value: ParamValue


# a scalar, a gradient (list of numbers interpolated across layers), or a filter list
ParamValue = Scalar | list[float] | list[FilterEntry]


@dataclass(frozen=True)
class ModelRef:
    """`org/name`, `org/name@revision`, a local folder, or the `name:` of an earlier stage."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        path, sep, rev = str(text).partition("@")
        return cls(path=path, revision=rev if sep else None)


@dataclass
class InputModel:
    model: ModelRef
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class Slice:
    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class TokenSource:
    """Per-token embedding source in the `tokenizer.tokens` section."""

    source: str | dict[str, Any]  # a model name, or {kind: zero} / {kind: model_token, ...}
    force: bool = False


@dataclass
class TokenizerConfig:
    source: str = "base"  # "base", "union", or a model
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class MergeStage:
    """One YAML document: one merge. Multi-document recipes run stages in order; a stage with a
    `name:` can be used as a model by later stages."""

    merge_method: str
    models: list[InputModel] = field(default_factory=list)
    base_model: ModelRef | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer: TokenizerConfig | None = None  # `tokenizer_source: x` parses into this too
    chat_template: str | None = None
    name: str | None = None
    random_seed: int | None = None
    provenance: dict[str, Any] | None = None


@dataclass
class Recipe:
    stages: list[MergeStage]

    @property
    def final(self) -> MergeStage:
        return self.stages[-1]


def evaluate_setting(value: ParamValue, tensor_name: str, t: float) -> Scalar:
    """Resolve a parameter value for one tensor at gradient position t in [0, 1] (mergekit's rule).

    Scalars are returned as they are; a list of numbers is interpolated linearly at
    t * (len - 1); a filter list returns the first entry whose filter is a substring of the
    tensor name (an entry without filter, or with mergekit's `filter: "*"`, matches everything).
    """
    if isinstance(value, (bool, int, float, str)):
        return value
    if not value:
        raise ValueError("empty parameter list")
    if isinstance(value[0], FilterEntry):
        for entry in value:  # type: ignore[assignment]
            assert isinstance(entry, FilterEntry)
            if not entry.filter or entry.filter == "*" or entry.filter in tensor_name:
                return evaluate_setting(entry.value, tensor_name, t)
        raise KeyError(f"no filter entry matches tensor '{tensor_name}' and none is a default")
    nums: list[float] = value  # type: ignore[assignment]
    scaled = t * (len(nums) - 1)
    i0 = math.floor(scaled)
    i1 = min(len(nums) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * nums[i0] + frac * nums[i1]


def base_index(stage: MergeStage, slice_index: int | None = None) -> int | None:
    """Row of base_model among `models` (or among slice `slice_index`'s sources), None if absent."""
    refs = (
        [m.model for m in stage.models]
        if slice_index is None or stage.slices is None
        else [s.model for s in stage.slices[slice_index].sources]
    )
    if stage.base_model is None or stage.base_model not in refs:
        return None
    return refs.index(stage.base_model)


def stage_models(stage: MergeStage) -> list[ModelRef]:
    """Every model a stage reads: base, then `models`, then slice sources; first occurrence wins."""
    refs = [stage.base_model] if stage.base_model is not None else []
    refs += [m.model for m in stage.models]
    for sl in stage.slices or []:
        refs += [src.model for src in sl.sources]
    return list(dict.fromkeys(refs))


def validate_recipe(recipe: Recipe, where: str = "recipe") -> None:
    """Every check that needs no model files (load_recipe and parse_recipe run it). Call it on
    recipes built in code, e.g. by the search; ConfigError names the YAML location."""
    from evomerge.recipe_check import check_recipe

    check_recipe(recipe, where)


def validate_layer_ranges(
    stage: MergeStage, num_layers: dict[str, int], where: str | None = None
) -> None:
    """Once model configs are known: every slice source's layer_range lies inside its model.

    num_layers maps a model (str(ModelRef), or its path) to its layer count; models missing
    from it are not checked. `where` prefixes locations (e.g. "recipe[stage 2]").
    """
    from evomerge.recipe_check import check_layer_ranges

    check_layer_ranges(stage, num_layers, where)


# ---------------------------------------------------------------- YAML in and out


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.2; PyYAML alone reads a string)."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] != _FLOAT_TAG]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Number lists in flow style (as mergekit writes them), multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)


def _value_out(value: ParamValue) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], FilterEntry):
        out = []
        for e in value:  # type: ignore[union-attr]
            entry = {} if e.filter is None else {"filter": e.filter}  # type: ignore[union-attr]
            out.append({**entry, "value": _value_out(e.value)})  # type: ignore[union-attr]
        return out
    return list(value) if isinstance(value, list) else value


def _params_out(params: dict[str, ParamValue]) -> dict[str, Any]:
    return {"parameters": {k: _value_out(v) for k, v in params.items()}} if params else {}


def _tokenizer_out(tok: TokenizerConfig) -> dict[str, Any]:
    if not tok.tokens and tok.pad_to_multiple_of is None:
        return {"tokenizer_source": tok.source}
    tokens = {
        name: {"source": spec.source, **({"force": True} if spec.force else {})}
        for name, spec in tok.tokens.items()
    }
    out: dict[str, Any] = {"source": tok.source}
    if tokens:
        out["tokens"] = tokens
    if tok.pad_to_multiple_of is not None:
        out["pad_to_multiple_of"] = tok.pad_to_multiple_of
    return {"tokenizer": out}


def _stage_out(s: MergeStage) -> dict[str, Any]:
    d: dict[str, Any] = {"merge_method": s.merge_method}
    if s.base_model is not None:
        d["base_model"] = str(s.base_model)
    if s.slices is not None:
        d["slices"] = [
            {
                "sources": [
                    {"model": str(src.model), "layer_range": list(src.layer_range),
                     **_params_out(src.parameters)}
                    for src in sl.sources
                ],
                **_params_out(sl.parameters),
            }
            for sl in s.slices
        ]  # fmt: skip
    else:
        d["models"] = [{"model": str(m.model), **_params_out(m.parameters)} for m in s.models]
    d.update(_params_out(s.parameters))
    d.update({k: getattr(s, k) for k in ("dtype", "out_dtype") if getattr(s, k) is not None})
    if s.tokenizer is not None:
        d.update(_tokenizer_out(s.tokenizer))
    for key in ("chat_template", "name", "random_seed", "provenance"):
        if getattr(s, key) not in (None, {}):
            d[key] = getattr(s, key)
    return d


def recipe_to_dict(recipe: Recipe) -> list[dict]:
    """One plain mergekit-style dict per stage, keys in mergekit's order, None/empty left out."""
    return [_stage_out(s) for s in recipe.stages]


def dump_recipe(recipe: Recipe) -> str:
    """YAML text, one document per stage joined by `---`; floats round-trip exactly."""
    docs = [
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
        for d in recipe_to_dict(recipe)
    ]
    return "---\n".join(docs)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write dump_recipe(recipe) atomically: a temp file in the same folder, then os.replace."""
    text, path = dump_recipe(recipe), os.fspath(path)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # same folder: os.replace is atomic
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # plain open: the user's umask applies
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_recipe(data: dict | list[dict], where: str = "recipe") -> Recipe:
    """A Recipe from parsed YAML (one mapping per stage), fully validated."""
    from evomerge.recipe_check import stage_where
    from evomerge.recipe_parse import parse_stage

    docs = data if isinstance(data, list) else [data]
    if not docs:
        raise ConfigError(f"{where}: the recipe is empty (expected a config with 'merge_method:')")
    recipe = Recipe([parse_stage(d, stage_where(where, i, len(docs))) for i, d in enumerate(docs)])
    validate_recipe(recipe, where)
    return recipe


def _read_yaml(text: str, label: str) -> list[Any]:
    try:
        return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}: invalid YAML{at}: {problem}") from None


def load_recipe(source: str | os.PathLike) -> Recipe:
    """A validated Recipe from a YAML file, or from YAML text (a str holding a newline or
    `merge_method`). Multi-document YAML gives one stage per document."""
    if isinstance(source, str) and (
        "\n" in source or ("merge_method" in source and not os.path.exists(source))
    ):
        return parse_recipe(_unwrap(_read_yaml(source, "recipe")))
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    try:
        return parse_recipe(_unwrap(_read_yaml(text, "recipe")))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _unwrap(docs: list[Any]) -> Any:
    return docs[0] if len(docs) == 1 else docs
