"""What a merge method is: declared parameters (Param), flags and a tensor function (Method),
and what that function receives for one output tensor (MergeInputs).

Pure Python (torch appears in type hints only): the method table (table.py) is built from
these types and read by recipe validation, search spaces and model cards, none of which may
pay for importing torch. A method names its tensor function as "module:function"; the module
is imported when the function is first called, i.e. when a merge actually runs.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    import torch

Scalar = float | int | bool | str


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, declared once.

    `scope="model"` parameters live under `models[i].parameters` (one value per input model,
    e.g. weight, density); `scope="global"` ones under the top-level `parameters` (t, lambda,
    normalize). Either kind may also be given at the other level as a default, as mergekit allows.
    Bounds are checked at load time; `low_open`/`high_open` make a bound exclusive.
    `search_low`/`search_high` are the default bounds a search space uses for this parameter.
    """

    name: str
    kind: Literal["float", "int", "bool", "str"]
    scope: Literal["model", "global"]
    default: Scalar | None
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    required: bool = False
    search_low: float | None = None
    search_high: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, value: Any, where: str) -> None:
        """Raise ConfigError naming `where` if `value` is of the wrong kind or out of bounds."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{where}: '{self.name}' must be true or false, but got {value!r}"
                )
            return
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ConfigError(
                    f"{where}: '{self.name}' must be one of {list(self.choices)}, but got {value!r}"
                )
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{self.name}' must be a number, but got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{self.name}' must be finite, but got {value!r}")
        if self.kind == "int" and int(value) != value:
            raise ConfigError(f"{where}: '{self.name}' must be an integer, but got {value!r}")
        lo_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        hi_bad = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if lo_bad or hi_bad:
            lo = "-inf" if self.low is None else f"{self.low}"
            hi = "inf" if self.high is None else f"{self.high}"
            interval = f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
            raise ConfigError(f"{where}: '{self.name}' must be in {interval}, but got {value!r}")


@dataclass
class MergeInputs:
    """What a method's tensor function receives for one output tensor (all float32, one device).

    models: every entry of the recipe's `models:` list in order, stacked   # (n, *shape)
            (an unlisted base_model is appended as the last row, as mergekit does);
            bfloat16/float16 rows (exact sources kept resident) only for `fused` methods
    base: the base_model's tensor, or None; base_index is its row in `models`.
    model_params: per-model parameters resolved for this tensor            # each (n,) float64
    params: global parameters resolved for this tensor (after defaults)
    seed: random_seed of the recipe; random methods key their draws by (seed, tensor_name)
    deltas: task vectors of the non-base rows, precomputed by the in-place candidate path
            (None: methods compute models[i] - base themselves, the same bytes)
    cache: a SparsifyCache (data-only mask statistics) or None
    scratch: reusable buffers (evomerge.merge.buffers.Buffers) or None to allocate
    out: a float32 tensor shaped like the result (the in-place path's live parameter) that
         methods supporting it write into instead of a scratch buffer, or None
    kernels: the evomerge.merge.kernel.Kernels that `fused` methods run (None: eager)
    """

    tensor_name: str
    models: torch.Tensor
    base: torch.Tensor | None
    base_index: int | None
    model_params: dict[str, torch.Tensor]
    params: dict[str, Scalar]
    seed: int
    deltas: torch.Tensor | None = None
    cache: Any = None
    scratch: Any = None
    out: Any = None
    kernels: Any = None

    def non_base_rows(self) -> list[int]:
        """The rows of `models` that are not the base, in order."""
        return [i for i in range(self.models.shape[0]) if i != self.base_index]


MergeFn = Callable[[MergeInputs], "torch.Tensor"]


def load_function(path: str) -> Callable[..., Any]:
    """The function named by "package.module:function" (its module imported on first use)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    """A merge method: its parameters, its constraints and its tensor function.

    function: "module:function" of the tensor function, called as fn(inputs, **options):
    `options` configure one generic function into several methods (as mergekit's generalized
    task arithmetic becomes ties, dare_ties, della...).
    """

    name: str
    function: str
    params: tuple[Param, ...]
    doc: str
    reference: str = ""
    options: tuple[tuple[str, Any], ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    random: bool = False  # uses random draws (DARE, DELLA): seeded by (random_seed, tensor name)
    task_vectors: bool = False  # works on deltas against the base (cacheable per search)
    # True: the base is merged as a plain input (linear, karcher, passthrough; mergekit's
    # "ignored" base policy), so model-scope parameters are read for it too. False: model
    # parameters are read for the non-base models only.
    base_is_input: bool = False
    # True: the per-entry arithmetic runs in evomerge.merge.kernel (compiled for in-place
    # candidates) and reads `models` in any float dtype, converting entry by entry
    fused: bool = False
    # True: each merged entry depends only on the same entry of every input (and the
    # parameters), so consecutive tensors merged with equal parameters may be merged as one
    # flat tensor (in-place candidates: one kernel call instead of one per tensor)
    elementwise: bool = False
    aliases: tuple[str, ...] = field(default=())

    @property
    def fn(self) -> MergeFn:
        """The tensor function, options bound. Looked up on each access (a dict lookup once
        the module is imported), so a test may monkeypatch the module's function."""
        f = load_function(self.function)
        return partial(f, **dict(self.options)) if self.options else f

    def model_count_rule(self, n: int) -> str | None:
        """None when `n` inputs (base included) suit the method, else the rule they break
        ("exactly 2", "at least 2", "2 to 3")."""
        lo, hi = self.min_models, self.max_models
        if n >= lo and (hi is None or n <= hi):
            return None
        return f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)
