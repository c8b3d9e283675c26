"""Streaming disk merges: values against hand-computed references, slices, stages, checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError, MergeError
from evomerge.merge.engine import merge_recipe
from evomerge.recipe import load_recipe, parse_recipe


def _linear(paths, weights, **extra):
    pairs = zip(paths, weights, strict=True)
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in pairs]
    return parse_recipe({"merge_method": "linear", "models": models, **extra})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_linear_matches_hand_computed(tiny_model, read_tensors, tmp_path):
    a, b = tiny_model("a", seed=0), tiny_model("b", seed=1)
    out = merge_recipe(_linear([a, b], [1.0, 3.0]), tmp_path / "out", progress=False)
    ta, tb, to = read_tensors(a), read_tensors(b), read_tensors(out)
    assert sorted(to) == sorted(ta)
    for n in ta:  # linear normalizes the weights: 0.25 and 0.75
        torch.testing.assert_close(to[n], 0.25 * ta[n] + 0.75 * tb[n], rtol=0, atol=1e-6)
    assert load_recipe(out / "recipe.yaml").final.merge_method == "linear"
    assert "linear" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["torch_dtype"] == "float32"
    assert (out / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
    assert _leftovers(tmp_path) == []


def test_gradient_and_out_dtype(tiny_model, read_tensors, tmp_path):
    a, b = tiny_model("a", seed=0, num_layers=4), tiny_model("b", seed=1, num_layers=4)
    recipe = _linear([a, b], [[1.0, 0.0], [0.0, 1.0]], out_dtype="bfloat16")
    out = merge_recipe(recipe, tmp_path / "out", progress=False)
    ta, tb, to = read_tensors(a), read_tensors(b), read_tensors(out)
    for i in range(4):  # layer i sits at t = i / 3: weights 1 - t and t
        n = f"model.layers.{i}.mlp.up_proj.weight"
        ref = ((1 - i / 3) * ta[n] + (i / 3) * tb[n]).to(torch.bfloat16)
        assert to[n].dtype == torch.bfloat16
        torch.testing.assert_close(to[n], ref, rtol=0, atol=0)
    assert torch.equal(to["model.norm.weight"], ta["model.norm.weight"].bfloat16())  # t = 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _generate(folder: Path) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("abc", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return gen[0].tolist()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_merged_model_loads_and_generates(tiny_model, tmp_path, arch):
    a = tiny_model("a", arch=arch, seed=0, tie=arch == "qwen2")
    b = tiny_model("b", arch=arch, seed=1, tie=arch == "qwen2")
    out = merge_recipe(_linear([a, b], [0.5, 0.5]), tmp_path / "out", progress=False)
    gen = _generate(out)
    assert len(gen) == 3 + 4 and gen[:3] == [4, 5, 6]  # 'a', 'b', 'c' after 4 specials


def test_passthrough_frankenmerge_qwen2(tiny_model, read_tensors, tmp_path):
    a = tiny_model("a", arch="qwen2", seed=0, num_layers=4, tie=True)
    b = tiny_model("b", arch="qwen2", seed=1, num_layers=4, tie=True)
    recipe = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
    ]})  # fmt: skip
    out = merge_recipe(recipe, tmp_path / "out", progress=False)
    ta, tb, to = read_tensors(a), read_tensors(b), read_tensors(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and len(cfg["layer_types"]) == 6
    mapping = [(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (tb, 3)]
    for j, (src, i) in enumerate(mapping):
        for part in ("mlp.down_proj.weight", "self_attn.q_proj.bias"):
            assert torch.equal(to[f"model.layers.{j}.{part}"], src[f"model.layers.{i}.{part}"])
    assert torch.equal(to["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert "lm_head.weight" not in to  # tied embeddings stay tied
    assert len(_generate(out)) == 7


def test_multi_stage_and_cleanup(tiny_model, read_tensors, tmp_path):
    a, b, c = (tiny_model(n, seed=s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    docs = [
        {"name": "mid", "merge_method": "linear",
         "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                    {"model": str(b), "parameters": {"weight": 1.0}}]},
        {"merge_method": "linear",
         "models": [{"model": "mid", "parameters": {"weight": 1.0}},
                    {"model": str(c), "parameters": {"weight": 3.0}}]},
    ]  # fmt: skip
    out = merge_recipe(parse_recipe(docs), tmp_path / "out", progress=False)
    ta, tb, tc, to = (read_tensors(p) for p in (a, b, c, out))
    for n in ta:
        ref = 0.25 * (0.5 * ta[n] + 0.5 * tb[n]) + 0.75 * tc[n]
        torch.testing.assert_close(to[n], ref, rtol=0, atol=1e-6)
    assert len(load_recipe(out / "recipe.yaml").stages) == 2
    assert _leftovers(tmp_path) == []  # the intermediate stage is gone


def test_union_tokenizer_end_to_end(tiny_model, read_tensors, tmp_path):
    from transformers import AutoTokenizer

    a = tiny_model("a", seed=0, vocab_size=48, extra_tokens=["<x>"])
    b = tiny_model("b", seed=1, vocab_size=48, extra_tokens=["<y>", "<x>"])
    recipe = _linear([a, b], [1.0, 1.0], tokenizer={"source": "union"}, chat_template="chatml")
    out = merge_recipe(recipe, tmp_path / "out", progress=False)
    ta, tb, to = read_tensors(a), read_tensors(b), read_tensors(out)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        ea, eb, eo = ta[n], tb[n], to[n]
        assert eo.shape == (50, ea.shape[1])
        torch.testing.assert_close(eo[:48], (ea[:48] + eb[:48]) / 2, rtol=0, atol=1e-6)
        torch.testing.assert_close(eo[48], (ea[48] + eb[49]) / 2, rtol=0, atol=1e-6)
        torch.testing.assert_close(eo[49], eb[48], rtol=0, atol=0)  # only B has '<y>'
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("a<y><x>")["input_ids"] == [4, 49, 48]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_checks_before_any_tensor_work(tiny_model, tmp_path):
    a = tiny_model("a", seed=0)
    cases = [
        (tiny_model("q", arch="qwen2"), ConfigError, "different architectures"),
        (tiny_model("h", hidden=48), ConfigError, r"tensor 'model\.layers\.0\..*' has shape"),
        (tiny_model("v", vocab_size=70), ConfigError, "tokenizer_source: union"),
        (tiny_model("l3", num_layers=3), ConfigError, "'model.layers.2.+' is only in"),
    ]
    for other, err, msg in cases:
        with pytest.raises(err, match=msg):
            merge_recipe(_linear([a, other], [1, 1]), tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    slices = [{"sources": [{"model": str(a), "layer_range": [0, 5]}]}]
    bad = parse_recipe({"merge_method": "passthrough", "slices": slices})
    with pytest.raises(ConfigError, match="out of bounds"):
        merge_recipe(bad, tmp_path / "out", progress=False)


def test_refusals(tiny_model, tmp_path):
    a, b = tiny_model("a", seed=0), tiny_model("b", seed=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an earlier evomerge output"):
        merge_recipe(_linear([a, b], [1, 1]), foreign, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"cuda requested but torch\.cuda\.is_available"):
            merge_recipe(_linear([a, b], [1, 1]), tmp_path / "o", device="cuda", progress=False)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(b / "model.safetensors"))
    sd["model.layers.1.mlp.gate_proj.weight"][2, 2] = float("nan")
    save_file(sd, str(b / "model.safetensors"))
    with pytest.raises(MergeError, match=r"b/model\.safetensors: tensor 'model\.layers\.1\.mlp"):
        merge_recipe(_linear([a, b], [1, 1]), tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "models"]


def test_cli_merge(tiny_model, read_tensors, tmp_path, capsys):
    a, b = tiny_model("a", seed=0), tiny_model("b", seed=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}},
        {"model": str(b), "parameters": {"weight": 0.5}}]}))  # fmt: skip
    out = tmp_path / "out"
    args = ["merge", str(recipe), str(out), "--no-progress", "--seed", "7", "--shard-size", "20KB"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert load_recipe(out / "recipe.yaml").final.random_seed == 7
    ta, tb, to = read_tensors(a), read_tensors(b), read_tensors(out)
    ref = (ta["lm_head.weight"] + tb["lm_head.weight"]) / 2
    torch.testing.assert_close(to["lm_head.weight"], ref)
    assert cli_main(args) == 0  # an earlier evomerge output is replaced
    recipe.write_text(recipe.read_text().replace("linear", "linaer"))
    assert cli_main(["merge", str(recipe), str(tmp_path / "o2")]) == 2
    assert "Did you mean 'linear'" in capsys.readouterr().err


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from evomerge.merge.engine import merge_recipe
    from evomerge.recipe import parse_recipe
    import evomerge.merge.methods, evomerge.merge.resolve  # their imports are not the merge's
    torch.set_num_threads(1)
    doc = {"merge_method": "linear", "models": [
        {"model": sys.argv[1], "parameters": {"weight": 1.0}},
        {"model": sys.argv[2], "parameters": {"weight": 1.0}}]}
    recipe = parse_recipe(doc)
    torch.randn(256, 256) @ torch.randn(256, 256)  # warm up torch's allocator and kernels
    def status(key):  # kB; VmHWM is this image's peak (ru_maxrss would include the parent's)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))
    before = status("VmRSS:")  # current RSS: a transient peak while importing must not hide growth
    merge_recipe(recipe, sys.argv[3], progress=False)
    print(before, status("VmHWM:"))
""")


def test_peak_memory_is_a_few_tensors(tmp_path):
    from conftest import write_tiny_model

    # 40 layers, hidden 256: ~96 MB per model in float32; the largest tensor is 0.5 MB
    kw = {"num_layers": 40, "hidden": 256, "vocab_size": 64}
    a = write_tiny_model(tmp_path / "a", seed=0, **kw)
    b = write_tiny_model(tmp_path / "b", seed=1, **kw)
    size = (a / "model.safetensors").stat().st_size
    assert size > 90e6
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(a), str(b), str(tmp_path / "o")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    before, after = map(int, res.stdout.split())
    growth = (after - before) * 1024
    msg = f"peak RSS grew {growth / 1e6:.1f} MB for a {size / 1e6:.0f} MB model"
    assert growth < 0.25 * size, msg


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_merge_equals_the_candidate_byte_for_byte(tiny_model, read_tensors, tmp_path,
                                                       method, dtype):  # fmt: skip
    """Parallel workers, reused buffers and bf16 inputs give the search's candidate."""
    from evomerge.merge.candidate import CandidateMerger
    from evomerge.merge.io import open_checkpoint

    paths = [tiny_model(f"m{i}", seed=i, dtype=dtype, num_layers=3) for i in range(4)]
    per_model = {"weight": 0.7, "density": 0.4, "epsilon": 0.1}
    doc = {
        "merge_method": method, "base_model": str(paths[0]), "random_seed": 3,
        "models": [{"model": str(p), "parameters": dict(per_model)} for p in paths[1:]],
        "dtype": "float32",
    }  # fmt: skip
    if method == "linear":
        del doc["base_model"]
    recipe = parse_recipe(doc)
    out = read_tensors(merge_recipe(recipe, tmp_path / "out", progress=False))
    stage = recipe.final
    sources = {str(p): open_checkpoint(p) for p in paths}
    merger = CandidateMerger(stage, sources, num_layers=3)
    for name, x in merger.merged(stage):
        assert torch.equal(x.view(torch.int32), out[name].view(torch.int32)), name
