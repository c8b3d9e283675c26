"""The recipe data model: a superset of mergekit's YAML, as dataclasses.

A recipe is one or more YAML documents (stages); each is a mergekit config, plus `random_seed`
and `provenance:` (which mergekit ignores). This module is the data only, with the rules that
read it without any model files: parameter values at a gradient position, the models a stage
reads, and the order of a merge's input rows. Parsing, checking and YAML live beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import ConfigError

Scalar = float | int | bool | str


def is_number(raw: Any) -> bool:
    """A YAML number: int or float, but not a bool (which Python counts as an int)."""
    return isinstance(raw, (int, float)) and not isinstance(raw, bool)


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
    lora: ModelRef | None = None  # a PEFT LoRA adapter applied to this model (`base+adapter`)

    def __str__(self) -> str:
        text = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{text}+{self.lora}" if self.lora is not None else text

    @property
    def base(self) -> ModelRef:
        """The model without its adapter (whose folder holds the config and tokenizer)."""
        return ModelRef(self.path, self.revision) if self.lora is not None else self

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """`path`, `path@rev`, or mergekit's `BASE+ADAPTER` (each part `path[@rev]`)."""
        head, plus, adapter = str(text).partition("+")
        path, sep, rev = head.partition("@")
        lora = cls.parse(adapter) if plus else None
        return cls(path=path, revision=rev if sep else None, lora=lora)


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


def stage_models(stage: MergeStage) -> list[ModelRef]:
    """Every model a stage reads: base, then `models`, then slice sources; first occurrence wins."""
    refs = [stage.base_model] if stage.base_model is not None else []
    refs += [m.model for m in stage.models]
    for sl in stage.slices or []:
        refs += [src.model for src in sl.sources]
    return list(dict.fromkeys(refs))


def input_refs(stage: MergeStage) -> list[ModelRef]:
    """The merge inputs in row order: `models:`, then base_model if it is not listed (as
    mergekit does, so base-ignoring methods such as linear and karcher merge it too). For a
    slice, pass the slice seen as a stage (its sources as `models:`)."""
    refs = [m.model for m in stage.models]
    dupes = sorted({str(r) for r in refs if refs.count(r) > 1})
    if dupes:
        raise ConfigError(f"models: each model may be listed once, but got {dupes} twice")
    if stage.base_model is not None and stage.base_model not in refs:
        refs.append(stage.base_model)
    return refs


def base_index(stage: MergeStage) -> int | None:
    """Row of base_model among the merge inputs (input_refs): its `models:` position, or
    len(models) when it is appended because it is not listed; None without base_model."""
    if stage.base_model is None:
        return None
    return input_refs(stage).index(stage.base_model)
