"""Row-chunked disk merges (merge/chunked.py) give the same bytes as whole-tensor merges.

EVOMERGE_CHUNK_BYTES forces chunks of a few rows, so every 2-D tensor is streamed (TIES /
breadcrumbs thresholds, DARE / DELLA draws and rescale norms, the dot products of slerp,
nuslerp, multislerp, karcher and model_stock, sce's variance cut all cross chunk
boundaries); the reference is the same CLI merge with chunks larger than any tensor (whole
tensors).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_model

from evomerge.cli import main
from evomerge.merge.memory import STREAMED, memory_figures

_PARAMS = {
    "linear": "weight: 0.6",
    "task_arithmetic": "weight: 0.7",
    "ties": "weight: 0.7, density: 0.37",
    "dare_ties": "weight: 0.7, density: 0.4",
    "dare_linear": "weight: 0.7, density: 0.4",
    "breadcrumbs": "weight: 0.7, density: 0.5, gamma: 0.1",
    "breadcrumbs_ties": "weight: 0.7, density: 0.5, gamma: 0.1",
    "della": "weight: 0.7, density: 0.5, epsilon: 0.1",
    "della_linear": "weight: 0.7, density: 0.5, epsilon: 0.1",
    "nearswap": None,
    "passthrough": None,
    "multislerp": "weight: 0.7",
    "model_stock": "",
    "sce": "",
    "nuslerp": "weight: 0.7",
}
# methods with a whole-tensor statistic besides _PARAMS' defaults: (method, stage parameters)
_VARIANTS = {
    "slerp": ("slerp", "t: 0.3"),
    "karcher": ("karcher", "max_iter: 20"),
    "model_stock_filter_wise": ("model_stock", "filter_wise: true"),
    "sce_topk": ("sce", "select_topk: 0.37"),
    "nuslerp_rows": ("nuslerp", "nuslerp_flatten: false"),
    "nuslerp_row_wise": ("nuslerp", "nuslerp_flatten: false, nuslerp_row_wise: true"),
    "multislerp_no_base": ("multislerp", "normalize_weights: false"),
}
CASES = sorted({*STREAMED, *_VARIANTS})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("chunk_models")
    return [write_tiny_model(root / f"m{i}", seed=i, hidden=48) for i in range(3)]


def _recipe(case: str, models: list[Path], out: Path) -> Path:
    method, stage = _VARIANTS.get(case, (case, ""))
    if method == "slerp":
        body = f"base_model: {models[0]}\nmodels:\n- model: {models[1]}\n"
    elif method == "karcher" or case == "multislerp_no_base":
        w = "{weight: 0.5}" if method == "multislerp" else "{}"
        body = "models:\n" + "".join(f"- model: {m}\n  parameters: {w}\n" for m in models)
    elif method == "nearswap":
        body = f"base_model: {models[0]}\nmodels:\n- model: {models[1]}\nparameters: {{t: 0.5}}\n"
    elif method == "passthrough":
        body = f"models:\n- model: {models[1]}\n  parameters: {{scale: 0.5}}\n"
    else:
        base = "" if method == "linear" else f"base_model: {models[0]}\n"
        rows = "".join(f"- model: {m}\n  parameters: {{{_PARAMS[method]}}}\n" for m in models[1:])
        extra = "parameters: {rescale: true}\n" if method.startswith(("dare", "della")) else ""
        body = f"{base}models:\n{rows}{extra}"
    if stage:
        body += f"parameters: {{{stage}}}\n"
    out.write_text(f"merge_method: {method}\n{body}dtype: float32\nrandom_seed: 7\n")
    return out


def _merge(recipe: Path, out: Path, monkeypatch, chunk_bytes: int) -> bytes:
    monkeypatch.setenv("EVOMERGE_CHUNK_BYTES", str(chunk_bytes))
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    return b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))


@pytest.mark.parametrize("case", CASES)
def test_chunked_merge_is_bit_identical(case, models, tmp_path, monkeypatch):
    recipe = _recipe(case, models, tmp_path / "r.yaml")
    whole = _merge(recipe, tmp_path / "whole", monkeypatch, 1 << 30)
    # 48 columns of float32 = 192 bytes a row: 5 rows a chunk (a ragged last chunk of the
    # 64-row embeddings, and of every 48-row matrix)
    chunked = _merge(recipe, tmp_path / "chunked", monkeypatch, 5 * 192 + 7)
    assert chunked == whole
    method = _VARIANTS.get(case, (case,))[0]
    assert memory_figures(method, 3).chunk_entries == (5 * 192 + 7) // 4


@pytest.mark.parametrize("case", sorted(_VARIANTS))
@pytest.mark.parametrize("rows", [1, 7])
def test_two_pass_merges_any_chunk_size(case, rows, models, tmp_path, monkeypatch):
    recipe = _recipe(case, models, tmp_path / "r.yaml")
    whole = _merge(recipe, tmp_path / "whole", monkeypatch, 1 << 30)
    assert _merge(recipe, tmp_path / "chunked", monkeypatch, rows * 192) == whole


@pytest.mark.parametrize("case", sorted({*_VARIANTS, "sce", "model_stock", "multislerp"}))
def test_row_blocks_inside_chunks_give_the_same_bytes(case, models, tmp_path, monkeypatch):
    """The dot-product methods work through each chunk in row blocks (twopass.py), sce and
    the eager kernels in pieces of kernel.CHUNK entries: blocks of 2 rows and pieces of 101
    entries (ragged last ones, pieces across rows) inside chunks of 5 rows give the
    unblocked bytes."""
    from evomerge.merge import kernel, twopass

    recipe = _recipe(case, models, tmp_path / "r.yaml")
    monkeypatch.setattr(twopass, "BLOCK", 1 << 30)
    monkeypatch.setattr(kernel, "CHUNK", 1 << 30)
    whole = _merge(recipe, tmp_path / "whole", monkeypatch, 1 << 30)
    monkeypatch.setattr(twopass, "BLOCK", 2 * 48)
    monkeypatch.setattr(kernel, "CHUNK", 101)
    assert _merge(recipe, tmp_path / "blocks", monkeypatch, 5 * 192 + 7) == whole


@pytest.mark.slow  # compiles one to three inductor kernels per method (~10 s each, cold)
@pytest.mark.parametrize("case", ["ties", "dare_ties", "della", "breadcrumbs_ties", "sce_topk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_disk_passes_give_the_eager_bytes(case, dtype, tmp_path, monkeypatch):
    """A large merge runs the task-arithmetic passes compiled (chunked.disk_kernels): with
    the size bar lowered, the CLI merge in row chunks (cut positions, draws and rescale
    norms crossing chunk boundaries) gives the bytes of the eager whole-tensor merge."""
    import torch

    from evomerge.merge import chunked

    torch_dtype = getattr(torch, dtype)
    ms = [write_tiny_model(tmp_path / f"m{i}", seed=i, hidden=48, dtype=torch_dtype)
          for i in range(3)]  # fmt: skip
    recipe = _recipe(case, ms, tmp_path / "r.yaml")
    recipe.write_text(recipe.read_text().replace("dtype: float32", f"dtype: {dtype}"))
    whole = _merge(recipe, tmp_path / "whole", monkeypatch, 1 << 30)
    calls: list[bool] = []
    real = chunked.disk_kernels

    def spy(*args):
        kernels = real(*args)
        calls.append(kernels.compiled)
        return kernels

    monkeypatch.setattr(chunked, "DISK_COMPILE_MIN_ENTRIES", 0)
    monkeypatch.setattr(chunked, "disk_kernels", spy)
    assert _merge(recipe, tmp_path / "compiled", monkeypatch, 5 * 192 + 7) == whole
    assert calls == [True]


def test_bad_chunk_size_is_a_config_error(models, tmp_path, monkeypatch, capsys):
    recipe = _recipe("linear", models, tmp_path / "r.yaml")
    monkeypatch.setenv("EVOMERGE_CHUNK_BYTES", "lots")
    assert main(["merge", str(recipe), str(tmp_path / "o"), "--no-progress"]) == 2
    assert "EVOMERGE_CHUNK_BYTES" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_imports_none_of_the_heavy_packages(models, tmp_path):
    recipe = _recipe("ties", models, tmp_path / "r.yaml")
    code = (
        "import sys; from evomerge.cli import main; "
        f"assert main(['merge', {str(recipe)!r}, {str(tmp_path / 'o')!r}, '--no-progress']) == 0; "
        "heavy = {'transformers', 'optuna', 'lm_eval', 'pandas', 'peft', 'vllm'}; "
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
