"""Cells of a searched parameter and the one function that names their Optuna parameters.

A searched parameter holds one value per cell = (model index, filter, layer group), each part
None when the parameter does not vary along it. Names read like the recipe: `weight[expert_a]`,
`density[expert_a][mlp][g2]`, `lambda`; a categorical method choice prefixes its parameters
(`ties.density[expert_a]`), a relative one says so (`epsilon_frac[a]`), and the stick-breaking
parameterization numbers a simplex's coordinates in the model's place (`weight[stick0][mlp]`).
These names are stored in studies: they must never change.
"""

from __future__ import annotations

from evomerge.search.params import ParamSpec
from evomerge.search.spec import SpaceSpec

Cell = tuple[int | None, str | None, int | None]  # (model index, filter, layer group)


def cells(space: SpaceSpec, param: ParamSpec) -> list[Cell]:
    """Every cell of a parameter, in the fixed order of its Optuna parameters."""
    models = range(len(space.models)) if param.per_model else [None]
    filters: list[str | None] = [None]
    if param.filters:
        filters = [*param.filters, *(["rest"] if param.rest is None else [])]
    groups = range(param.groups) if param.groups > 1 else [None]
    return [(i, f, g) for f in filters for g in groups for i in models]


def simplex_cells(space: SpaceSpec, param: ParamSpec) -> list[list[Cell]]:
    """The cells of a simplex parameter grouped into simplices: one per (filter, group), its
    members one per model, in model order."""
    n = len(space.models)
    return [[(i, f, g) for i in range(n)] for m, f, g in cells(space, param) if m == 0]


def param_name(space: SpaceSpec, param: ParamSpec, cell: Cell, stick: int | None = None) -> str:
    """The Optuna parameter name of one cell (`stick=k`: coordinate k of the cell's simplex)."""
    i, f, g = cell
    name = f"{param.method}.{param.name}" if space.categorical else param.name
    name += "_frac" if param.relative_to else ""
    if stick is not None:
        name += f"[stick{stick}]"
    elif i is not None:
        name += f"[{space.labels[i]}]"
    return name + (f"[{f}]" if f else "") + (f"[g{g}]" if g is not None else "")
