"""Recipe parsing: plain YAML data (dicts and lists) -> the dataclasses of recipe.schema.

Checks the shape of every section (known keys with "did you mean", value kinds, model references,
layer_range pairs, the tokenizer section); recipe.check then checks the meaning.
"""

from __future__ import annotations

import difflib
from typing import Any

from evomerge.errors import ConfigError, check_keys
from evomerge.merge.table import METHODS
from evomerge.recipe.check import _warn, stage_where, validate_recipe
from evomerge.recipe.schema import (
    FilterEntry,
    InputModel,
    MergeStage,
    ModelRef,
    ParamValue,
    Recipe,
    Slice,
    SliceSource,
    TokenizerConfig,
    TokenSource,
    is_number,
)

STAGE_KEYS = (
    "merge_method", "base_model", "slices", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "random_seed", "provenance",
)  # fmt: skip
_UNSUPPORTED = {
    "modules": "per-module merges ('modules:') are not supported yet; use 'models:' or 'slices:'",
    "base_model": "a per-slice base_model is not supported yet; set the top-level base_model",
    "residual_weight": "'residual_weight' in slices is not supported yet",
    "override_architecture": "'override_architecture' is not supported yet",
}


def _check_keys(d: dict, allowed: tuple[str, ...], where: str, extra: tuple[str, ...] = ()) -> None:
    """errors.check_keys, except that the first unknown key, if it is one of mergekit's that
    evomerge does not support yet (`extra`), gets that message instead of "did you mean"."""
    unknown = [key for key in d if key not in allowed]
    if unknown and unknown[0] in extra:
        raise ConfigError(f"{where}.{unknown[0]}: {_UNSUPPORTED[unknown[0]]}")
    check_keys(d, allowed, where, "key")


def _mapping(raw: Any, where: str, what: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected {what}, but got {_kind(raw)} {raw!r}")
    return raw


def _kind(raw: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string", type(None): "nothing"}.get(
        type(raw), type(raw).__name__
    )


def _parse_path_ref(raw: Any, where: str) -> ModelRef:
    """`path`, `path@rev`, `{path:, revision:}`: one model or adapter, no `+`."""
    if isinstance(raw, dict):
        _check_keys(raw, ("path", "revision"), where)
        raw, rev = raw.get("path"), raw.get("revision")
        ref = _parse_path_ref(raw, where)
        if rev is not None and ref.revision is not None:
            raise ConfigError(f"{where}: revision given twice ('{ref}' and revision: {rev!r})")
        return ref if rev is None else ModelRef(ref.path, str(rev))
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(
            f"{where}: expected a model (org/name, org/name@revision or a folder), but got {raw!r}"
        )
    ref = ModelRef.parse(raw)
    if raw.count("@") > 1 or not ref.path or ref.revision == "":
        raise ConfigError(f"{where}: expected 'path' or 'path@revision', but got {raw!r}")
    return ref


def _parse_model_ref(raw: Any, where: str) -> ModelRef:
    """`path[@rev]`, mergekit's `BASE+ADAPTER` (a PEFT LoRA folder), `{model: path,
    revision: rev, lora: adapter}` or `{model: {path:, revision:}, lora: {path:, revision:}}`."""
    if isinstance(raw, dict):
        _check_keys(raw, ("model", "path", "revision", "lora"), where, ("override_architecture",))
        inner, rev = raw.get("model", raw.get("path")), raw.get("revision")
        if isinstance(inner, dict):
            ref = _parse_path_ref(inner, f"{where}.model")
        else:
            ref = _parse_model_ref(inner, where)
        if rev is not None:
            if ref.revision is not None:
                raise ConfigError(f"{where}: revision given twice ('{ref}' and revision: {rev!r})")
            ref = ModelRef(ref.path, str(rev), ref.lora)
        if raw.get("lora") is None:
            return ref
        if ref.lora is not None:
            raise ConfigError(f"{where}: LoRA adapter given twice ('{ref}' and lora:)")
        return ModelRef(ref.path, ref.revision, _parse_path_ref(raw["lora"], f"{where}.lora"))
    if isinstance(raw, str) and "+" in raw:
        if raw.count("+") > 1:
            raise ConfigError(f"{where}: expected 'BASE+ADAPTER' (one '+'), but got {raw!r}")
        head, _, adapter = raw.partition("+")
        base = _parse_path_ref(head, where)
        return ModelRef(base.path, base.revision, _parse_path_ref(adapter, f"{where} (adapter)"))
    return _parse_path_ref(raw, where)


def _parse_numbers(raw: list, where: str) -> list[float]:
    for i, x in enumerate(raw):
        if not is_number(x):
            raise ConfigError(f"{where}[{i}]: a gradient list holds numbers only, but got {x!r}")
    return list(raw)


def _parse_filter(raw: Any, where: str) -> FilterEntry:
    entry = _mapping(raw, where, "a filter entry {filter: ..., value: ...}")
    _check_keys(entry, ("filter", "value"), where)
    if "value" not in entry:
        raise ConfigError(f"{where}: a filter entry needs a 'value', but got only {entry!r}")
    filt, value = entry.get("filter"), entry["value"]
    if filt is not None and not isinstance(filt, str):
        raise ConfigError(f"{where}.filter: expected a tensor name part, but got {filt!r}")
    if isinstance(value, list) and value:
        value = _parse_numbers(value, f"{where}.value")
    elif isinstance(value, (dict, list)) or value is None:
        raise ConfigError(
            f"{where}.value: expected a number or a gradient list, but got {_kind(value)} {value!r}"
        )
    return FilterEntry(filter=filt, value=value)


def _parse_value(raw: Any, where: str) -> ParamValue:
    """A scalar, a gradient (list of numbers) or a filter list (`[{filter:, value:}, ...]`)."""
    if isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, dict):  # mergekit also takes one conditional on its own
        return [_parse_filter(raw, where)]
    if isinstance(raw, list) and raw:
        if all(isinstance(e, dict) for e in raw):
            return [_parse_filter(e, f"{where}[{i}]") for i, e in enumerate(raw)]
        return _parse_numbers(raw, where)
    if isinstance(raw, list):
        raise ConfigError(f"{where}: expected a non-empty gradient or filter list, but got []")
    raise ConfigError(f"{where}: expected a number, a gradient or a filter list, but got {raw!r}")


def _parse_params(raw: Any, where: str) -> dict[str, ParamValue]:
    if raw is None:
        return {}
    params = _mapping(raw, where, "a mapping of parameter names to values")
    return {str(k): _parse_value(v, f"{where}.{k}") for k, v in params.items()}


def _parse_list(raw: Any, where: str) -> list:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty list, but got {raw!r}")
    return raw


def _parse_models(raw: Any, where: str) -> list[InputModel]:
    out = []
    for i, item in enumerate(_parse_list(raw, where)):
        loc = f"{where}[{i}]"
        if isinstance(item, str):  # `- org/name`: lenient shorthand for `- model: org/name`
            item = {"model": item}
        item = _mapping(item, loc, "a mapping with 'model:'")
        _check_keys(item, ("model", "parameters"), loc)
        if "model" not in item:
            raise ConfigError(f"{loc}: missing 'model:' (got keys: {', '.join(map(str, item))})")
        params = _parse_params(item.get("parameters"), f"{loc}.parameters")
        out.append(InputModel(_parse_model_ref(item["model"], f"{loc}.model"), params))
    return out


def _parse_layer_range(raw: Any, where: str) -> tuple[int, int]:
    ok = (
        isinstance(raw, list)
        and len(raw) == 2
        and all(is_number(x) and float(x).is_integer() for x in raw)
    )
    if not ok:
        raise ConfigError(f"{where}: expected two integers [start, end], but got {raw!r}")
    return (int(raw[0]), int(raw[1]))


def _parse_slices(raw: Any, where: str) -> list[Slice]:
    slices = []
    for i, item in enumerate(_parse_list(raw, where)):
        loc = f"{where}[{i}]"
        item = _mapping(item, loc, "a mapping with 'sources:'")
        _check_keys(item, ("sources", "parameters"), loc, ("base_model", "residual_weight"))
        sources = []
        for j, src in enumerate(_parse_list(item.get("sources"), f"{loc}.sources")):
            sloc = f"{loc}.sources[{j}]"
            src = _mapping(src, sloc, "a mapping with 'model:' and 'layer_range:'")
            _check_keys(src, ("model", "layer_range", "parameters"), sloc)
            for key in ("model", "layer_range"):
                if key not in src:
                    raise ConfigError(f"{sloc}: missing '{key}:'")
            model = _parse_model_ref(src["model"], f"{sloc}.model")
            lr = _parse_layer_range(src["layer_range"], f"{sloc}.layer_range")
            params = _parse_params(src.get("parameters"), f"{sloc}.parameters")
            sources.append(SliceSource(model, lr, params))
        slices.append(Slice(sources, _parse_params(item.get("parameters"), f"{loc}.parameters")))
    return slices


def _parse_token_source(raw: Any, where: str) -> str | dict[str, Any]:
    """A model name, `{kind: zero}` or `{kind: model_token, model:, token_id: | token:}`."""
    if not isinstance(raw, dict):
        return str(_parse_model_ref(raw, where))
    kind = raw.get("kind")
    if kind == "zero":
        _check_keys(raw, ("kind",), where)
        return dict(raw)
    if kind != "model_token":
        raise ConfigError(f"{where}.kind: expected 'zero' or 'model_token', but got {kind!r}")
    _check_keys(raw, ("kind", "model", "token_id", "token"), where)
    if ("token_id" in raw) == ("token" in raw):
        raise ConfigError(f"{where}: give exactly one of 'token_id' or 'token', got {raw!r}")
    tid = raw.get("token_id")
    if "token_id" in raw and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
        raise ConfigError(f"{where}.token_id: expected an integer >= 0, but got {tid!r}")
    if "token" in raw and not isinstance(raw["token"], str):
        raise ConfigError(f"{where}.token: expected a string, but got {raw['token']!r}")
    return {**raw, "model": str(_parse_model_ref(raw.get("model"), f"{where}.model"))}


def _parse_tokenizer(doc: dict, where: str) -> TokenizerConfig | None:
    if doc.get("tokenizer_source") is not None and doc.get("tokenizer") is not None:
        raise ConfigError(f"{where}: give 'tokenizer_source' or 'tokenizer:', not both")
    if doc.get("tokenizer_source") is not None:
        return TokenizerConfig(
            _parse_tok_model(doc["tokenizer_source"], f"{where}.tokenizer_source")
        )
    if doc.get("tokenizer") is None:
        return None
    loc = f"{where}.tokenizer"
    raw = _mapping(doc["tokenizer"], loc, "a mapping (source, tokens, pad_to_multiple_of)")
    _check_keys(raw, ("source", "tokens", "pad_to_multiple_of"), loc)
    tokens = {}
    for tok, spec in _mapping(raw.get("tokens") or {}, f"{loc}.tokens", "a mapping").items():
        tloc = f"{loc}.tokens[{tok!r}]"
        spec = _mapping(spec, tloc, "a mapping {source: ..., force: ...}")
        _check_keys(spec, ("source", "force"), tloc)
        if spec.get("source") is None:
            raise ConfigError(f"{tloc}: missing 'source:' (a model, or {{kind: zero}})")
        if not isinstance(spec.get("force", False), bool):
            raise ConfigError(f"{tloc}.force: expected true or false, but got {spec['force']!r}")
        source = _parse_token_source(spec["source"], f"{tloc}.source")
        tokens[str(tok)] = TokenSource(source, spec.get("force", False))
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(f"{loc}.pad_to_multiple_of: expected an integer >= 1, but got {pad!r}")
    source = _parse_tok_model(raw.get("source", "union"), f"{loc}.source")  # mergekit's default
    return TokenizerConfig(source, tokens, pad)


def _parse_tok_model(raw: Any, where: str) -> str:
    return raw if raw in ("base", "union") else str(_parse_model_ref(raw, where))


def _opt_str(doc: dict, key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}.{key}: expected a string, but got {value!r}")
    return value


def _drop_misplaced_params(doc: dict, where: str) -> dict:
    """The stage without merge parameters written beside `merge_method:` instead of under
    `parameters:` (`int8_mask: true`, as some published recipes do). mergekit's config ignores
    keys it does not know, so the recipe merges there as if they were absent: the same here,
    with one warning. A key that is no parameter of any method stays an unknown key."""
    names = {n for m in METHODS.values() for n in m.param_names}
    for key in (k for k in doc if k not in names and k not in STAGE_KEYS):
        close = difflib.get_close_matches(str(key), sorted(names), n=1)
        if close and not difflib.get_close_matches(str(key), STAGE_KEYS, n=1):
            raise ConfigError(
                f"{where}: unknown key '{key}'. Did you mean '{close[0]}'? (a merge parameter, "
                f"read under '{where}.parameters:')"
            )
    misplaced = [k for k in doc if k in names and k not in STAGE_KEYS]
    if not misplaced:
        return doc
    keys = " and ".join(f"'{k}'" for k in misplaced)
    _warn(
        f"{where}: {keys} at the stage's top level {'is' if len(misplaced) == 1 else 'are'} "
        f"ignored, as mergekit ignores {'it' if len(misplaced) == 1 else 'them'}; a merge "
        f"parameter takes effect under '{where}.parameters:'"
    )
    return {k: v for k, v in doc.items() if k not in misplaced}


def parse_stage(doc: Any, where: str) -> MergeStage:
    """One YAML document (a mergekit config plus evomerge's keys) -> MergeStage."""
    doc = _drop_misplaced_params(_mapping(doc, where, "a mapping (a mergekit config)"), where)
    _check_keys(doc, STAGE_KEYS, where, ("modules",))
    method = doc.get("merge_method")
    if not isinstance(method, str) or not method:
        raise ConfigError(f"{where}: missing 'merge_method:' (e.g. linear, ties, slerp)")
    has_models, has_slices = doc.get("models") is not None, doc.get("slices") is not None
    if has_models == has_slices:
        got = "both" if has_models else "neither"
        raise ConfigError(f"{where}: expected exactly one of 'models:' or 'slices:', got {got}")
    base = doc.get("base_model")
    seed = doc.get("random_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"{where}.random_seed: expected an integer, but got {seed!r}")
    prov = doc.get("provenance")
    if prov is not None:
        prov = _mapping(prov, f"{where}.provenance", "a mapping") or None  # {} dumps as nothing
    return MergeStage(
        merge_method=method,
        models=_parse_models(doc["models"], f"{where}.models") if has_models else [],
        base_model=None if base is None else _parse_model_ref(base, f"{where}.base_model"),
        slices=_parse_slices(doc["slices"], f"{where}.slices") if has_slices else None,
        parameters=_parse_params(doc.get("parameters"), f"{where}.parameters"),
        dtype=_opt_str(doc, "dtype", where),
        out_dtype=_opt_str(doc, "out_dtype", where),
        tokenizer=_parse_tokenizer(doc, where),
        chat_template=_opt_str(doc, "chat_template", where),
        name=_opt_str(doc, "name", where),
        random_seed=seed,
        provenance=prov,
    )


def parse_recipe(data: dict | list[dict], where: str = "recipe") -> Recipe:
    """A Recipe from parsed YAML (one mapping per stage), fully validated."""
    docs = data if isinstance(data, list) else [data]
    if not docs:
        raise ConfigError(f"{where}: the recipe is empty (expected a config with 'merge_method:')")
    recipe = Recipe([parse_stage(d, stage_where(where, i, len(docs))) for i, d in enumerate(docs)])
    validate_recipe(recipe, where)
    return recipe
