"""Recipe: a superset of mergekit's YAML. Parsed from mergekit configs, produced by the search,
merged by `evomerge merge`, written by export.

schema (the dataclasses), parse (YAML data -> dataclasses), check (validation against the
merge method table), yaml_io (files and text in and out). Pure data: nothing here imports torch.
`load_recipe` parses and validates everything that can be checked before a tensor is read;
`validate_layer_ranges` adds the checks that need model configs; `dump_recipe` writes the same
YAML back (`load_recipe(dump_recipe(r)) == r`).

The names below are re-exported for the many callers that import them from `evomerge.recipe`;
the submodules import each other directly, never through this package.
"""

from evomerge.recipe.check import validate_layer_ranges, validate_recipe
from evomerge.recipe.parse import parse_recipe
from evomerge.recipe.schema import (
    FilterEntry,
    InputModel,
    MergeStage,
    ModelRef,
    ParamValue,
    Recipe,
    Scalar,
    Slice,
    SliceSource,
    TokenizerConfig,
    TokenSource,
    base_index,
    evaluate_setting,
    input_refs,
    stage_models,
)
from evomerge.recipe.yaml_io import dump_recipe, load_recipe, recipe_to_dict, save_recipe

__all__ = [
    "FilterEntry", "InputModel", "MergeStage", "ModelRef", "ParamValue", "Recipe", "Scalar",
    "Slice", "SliceSource", "TokenSource", "TokenizerConfig", "base_index", "dump_recipe",
    "evaluate_setting", "input_refs", "load_recipe", "parse_recipe", "recipe_to_dict",
    "save_recipe", "stage_models", "validate_layer_ranges", "validate_recipe",
]  # fmt: skip
