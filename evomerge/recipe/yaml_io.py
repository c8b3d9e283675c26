"""Recipes in and out of YAML: `load_recipe` (a file or YAML text, parsed and validated) and
`dump_recipe` / `save_recipe` (the same YAML back: `load_recipe(dump_recipe(r)) == r`).

A multi-document YAML file is a multi-stage recipe, one stage per document.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import yaml

from evomerge.common.yaml_file import yaml_error
from evomerge.errors import ConfigError
from evomerge.recipe.parse import parse_recipe
from evomerge.recipe.schema import FilterEntry, MergeStage, ParamValue, Recipe, TokenizerConfig


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


def _read_yaml(text: str, label: str) -> list[Any]:
    try:
        return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        raise yaml_error(exc, label) from None


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
