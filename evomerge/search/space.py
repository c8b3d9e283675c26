"""SearchSpace: a validated search-space file, and the way into its codec.

The space itself carries no sampler state: `space.codec(sampler)` returns the immutable codec
that sampler searches with (codec.py), and `space.decode(params)` reads any stored trial back
into its Recipe, whichever sampler proposed it (decode.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.common.yaml_file import parse_yaml, read_yaml_file
from evomerge.recipe import Recipe
from evomerge.search.codec import Codec
from evomerge.search.decode import decode
from evomerge.search.spec import SpaceSpec, default_sampler, parse_space


@dataclass(frozen=True)
class SearchSpace:
    spec: SpaceSpec

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        data = read_yaml_file(path, "search space")
        return cls(parse_space(data, str(path)))

    @classmethod
    def from_text(cls, text: str, source: str = "<space>") -> SearchSpace:
        return cls(parse_space(parse_yaml(text, source), source))

    def codec(self, sampler: str) -> Codec:
        """The codec `sampler` searches this space with (ConfigError if it cannot)."""
        return Codec.for_sampler(self.spec, sampler)

    def default_sampler(self) -> str:
        return self.spec.search.get("sampler", default_sampler(self.spec))

    def decode(self, params: Mapping[str, Any]) -> Recipe:
        """Trial params -> Recipe. Pure: depends only on `params` and the space."""
        return decode(self.spec, params)
