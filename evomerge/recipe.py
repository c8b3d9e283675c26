"""Recipe: a superset of mergekit's YAML. Parsed from mergekit configs, produced by the search,
merged by `evomerge merge`, written by export.

DATA MODEL ONLY (skeleton written first so every module codes against one API);
parsing, validation and dumping are completed in this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Union

Scalar = Union[float, int, bool, str]


@dataclass
class FilterEntry:
    """One entry of a filter list: `{filter: self_attn, value: 0.3}`; filter None = the default."""

    filter: str | None
    value: ParamValue


# a scalar, a gradient (list of numbers interpolated across layers), or a filter list
ParamValue = Union[Scalar, list[float], list[FilterEntry]]


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
    tensor name (an entry without filter matches everything).
    """
    if isinstance(value, (bool, int, float, str)):
        return value
    if not value:
        raise ValueError("empty parameter list")
    if isinstance(value[0], FilterEntry):
        for entry in value:  # type: ignore[assignment]
            assert isinstance(entry, FilterEntry)
            if not entry.filter or entry.filter in tensor_name:
                return evaluate_setting(entry.value, tensor_name, t)
        raise KeyError(f"no filter entry matches tensor '{tensor_name}' and none is a default")
    nums: list[float] = value  # type: ignore[assignment]
    scaled = t * (len(nums) - 1)
    i0 = math.floor(scaled)
    i1 = min(len(nums) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * nums[i0] + frac * nums[i1]
