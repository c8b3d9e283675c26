"""`evomerge moe`: config validation, router rows, tensor layout, loading and generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.moe.build import build_moe
from evomerge.moe.config import parse_moe_config

PROMPTS = {"a": ["add 1+2=", "add 33+4="], "b": ["rev abc=", "rev hello="], "neg": ["cap x="]}


def _cfg(base: Path, experts: list[Path], mode: str = "hidden", **extra) -> dict:
    names = list(PROMPTS)
    ex = [{"source_model": str(p), "positive_prompts": PROMPTS[names[i % 2]]}
          for i, p in enumerate(experts)]  # fmt: skip
    return {"base_model": str(base), "gate_mode": mode, "experts": ex, **extra}


def _load(out: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensors
    return model.eval()


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_identical_experts_reproduce_the_dense_model(tiny_model, tmp_path, arch):
    """Experts equal to the base: any routing mixes the same MLP, so logits equal the base's
    (and the zero-size Qwen2-MoE shared expert adds nothing)."""
    from transformers import AutoModelForCausalLM

    base = tiny_model(arch=arch, seed=0)
    out = build_moe(parse_moe_config(_cfg(base, [base, base])), tmp_path / "moe")
    moe = _load(out)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 17, 30, 8, 44]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    assert type(moe).__name__ == (
        "Qwen2MoeForCausalLM" if arch == "qwen2" else "MixtralForCausalLM"
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_expert_mlps_and_base_tensors_land_in_place(tiny_model, tmp_path, arch):
    base, e1, e2 = (tiny_model(arch=arch, seed=s) for s in range(3))
    out = build_moe(parse_moe_config(_cfg(base, [e1, e2], mode="random")), tmp_path / "moe")
    sd = _load(out).state_dict()
    src = [load_file(p / "model.safetensors") for p in (base, e1, e2)]
    for i in range(2):
        p = f"model.layers.{i}."
        for j, ex in enumerate(src[1:]):
            gate_up = torch.cat([ex[p + "mlp.gate_proj.weight"], ex[p + "mlp.up_proj.weight"]])
            torch.testing.assert_close(sd[p + "mlp.experts.gate_up_proj"][j], gate_up)
            torch.testing.assert_close(
                sd[p + "mlp.experts.down_proj"][j], ex[p + "mlp.down_proj.weight"]
            )
        for name in (
            "self_attn.q_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        ):
            torch.testing.assert_close(sd[p + name], src[0][p + name])
        if arch == "qwen2":  # no shared expert configured: width 1, all zeros (adds nothing)
            shared = {k: v for k, v in sd.items() if k.startswith(p + "mlp.shared_expert.")}
            assert {k: tuple(v.shape) for k, v in shared.items()} == {
                p + "mlp.shared_expert.gate_proj.weight": (1, 32),
                p + "mlp.shared_expert.up_proj.weight": (1, 32),
                p + "mlp.shared_expert.down_proj.weight": (32, 1),
            }
            assert all(torch.count_nonzero(v) == 0 for v in shared.values())
    torch.testing.assert_close(sd["model.embed_tokens.weight"], src[0]["model.embed_tokens.weight"])


def _mlp_inputs(model, ids: list[int]) -> torch.Tensor:
    """Mean post-attention-norm output per layer -> (n_layers, hidden), hooked independently."""
    outs = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, o: outs.append(o[0].mean(dim=0))
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return torch.stack(outs)


def test_hidden_router_rows_match_hand_computation(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, e1, e2 = (tiny_model(arch="qwen2", seed=s) for s in range(3))
    cfg = _cfg(base, [e1, e2])
    cfg["experts"][1]["negative_prompts"] = PROMPTS["neg"]
    out = build_moe(parse_moe_config(cfg), tmp_path / "moe")
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)

    def mean_over(prompts: list[str]) -> torch.Tensor:  # BOS + prompt, as mergekit tokenizes
        ids = [tok("<s>" + p, add_special_tokens=False)["input_ids"] for p in prompts]
        return torch.stack([_mlp_inputs(dense, i) for i in ids]).mean(dim=0)

    v0 = mean_over(PROMPTS["a"])
    v1 = mean_over(PROMPTS["b"]) - mean_over(PROMPTS["neg"])
    t = _tensors(out)
    for i in range(2):
        gate = t[f"model.layers.{i}.mlp.gate.weight"]  # (n_experts, hidden)
        torch.testing.assert_close(gate[0], v0[i] / v0[i].norm(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate[1], v1[i] / v1[i].norm(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate.norm(dim=1), torch.ones(2))


def test_other_gate_modes(tiny_model, tmp_path):
    base, e1, e2 = (tiny_model(arch="llama", seed=s) for s in range(3))
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    t = _tensors(build_moe(parse_moe_config(_cfg(base, [e1, e2], "cheap_embed")), tmp_path / "c"))
    ids = [1] + [4 + "abcdefghijklmnopqrstuvwxyz0123456789 .,+=?!-".index(c) for c in "add 1+2="]
    ids += [1] + [4 + "abcdefghijklmnopqrstuvwxyz0123456789 .,+=?!-".index(c) for c in "add 33+4="]
    v = embed[ids].mean(dim=0)
    for i in range(2):
        torch.testing.assert_close(
            t[f"model.layers.{i}.block_sparse_moe.gate.weight"][0], v / v.norm()
        )
    t = _tensors(build_moe(parse_moe_config(_cfg(base, [e1, e2], "uniform")), tmp_path / "u"))
    assert torch.count_nonzero(t["model.layers.1.block_sparse_moe.gate.weight"]) == 0
    r1 = _tensors(build_moe(parse_moe_config(_cfg(base, [e1, e2], "random")), tmp_path / "r1"))
    r2 = _tensors(build_moe(parse_moe_config(_cfg(base, [e1, e2], "random")), tmp_path / "r2"))
    g = r1["model.layers.0.block_sparse_moe.gate.weight"]
    assert g.shape == (2, 32) and g.std() > 0.5
    torch.testing.assert_close(g, r2["model.layers.0.block_sparse_moe.gate.weight"])


def test_cli_writes_a_model_that_generates(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    base, e1, e2 = (tiny_model(arch="qwen2", seed=s) for s in range(3))
    cfg_file = tmp_path / "moe.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(base, [e1, e2], experts_per_token=1)))
    assert main(["moe", str(cfg_file), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    model = _load(out)
    assert model.config.num_experts == 2 and model.config.num_experts_per_tok == 1
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("add 1+2=", return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, ids["input_ids"].shape[1] + 6)
    # greedy decoding must agree with argmax of a plain forward pass
    with torch.no_grad():
        nxt = model(ids["input_ids"]).logits[0, -1].argmax()
    assert gen[0, ids["input_ids"].shape[1]] == nxt


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(gate_mod="hidden"), "Did you mean 'gate_mode'"),
        (
            lambda c: c["experts"][0].update(positive_prompt=["x"]),
            "Did you mean 'positive_prompts'",
        ),
        (lambda c: c["experts"][0].pop("positive_prompts"), "need at least one positive prompt"),
        (lambda c: c["experts"].pop(), "at least 2 experts, but got 1"),
        (lambda c: c.update(experts_per_token=3), "from 1 to the number of experts (2), but got 3"),
        (lambda c: c.update(gate_mode="hiden"), "Did you mean 'hidden'"),
        (lambda c: c.update(dtype="fp32"), "Available: bfloat16, float16, float32"),
    ],
)
def test_bad_configs_exit_2(tiny_model, tmp_path, capsys, change, message):
    base = tiny_model(arch="qwen2", seed=0)
    cfg = _cfg(base, [base, base])
    change(cfg)
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert main(["moe", str(cfg_file), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_mismatched_expert_leaves_nothing_behind(tiny_model, tmp_path):
    base = tiny_model(arch="llama", seed=0)
    wide = tiny_model("wide", arch="llama", seed=1, hidden=64)
    qwen = tiny_model(arch="qwen2", seed=2)
    for other, message in ((wide, "hidden_size=32"), (qwen, "model_type 'llama'")):
        with pytest.raises(ConfigError, match=message):
            build_moe(parse_moe_config(_cfg(base, [base, other], "random")), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_logistic_router_separates_the_experts_prompts(tiny_model, tmp_path):
    """Rows fit on each expert's tokens (run through the base with that expert's MLPs) send
    most tokens of those prompts top-1 to that expert in the built MoE (the shared BOS token,
    and a few tokens a random tiny model cannot tell apart, excepted)."""
    from transformers import AutoTokenizer

    from evomerge.moe.router import top1_choices

    base, e1, e2 = (tiny_model(arch="qwen2", seed=s) for s in range(3))
    out = build_moe(parse_moe_config(_cfg(base, [e1, e2], "logistic")), tmp_path / "moe")
    moe, tok = _load(out), AutoTokenizer.from_pretrained(out)
    for j, key in enumerate(("a", "b")):
        picks = torch.cat([p[:, 1:] for p in top1_choices(moe, tok, PROMPTS[key])], dim=1)
        assert (picks == j).float().mean() >= 0.75, (key, picks)


def test_logistic_rejects_negative_prompts(tiny_model):
    base = tiny_model(arch="qwen2", seed=0)
    cfg = _cfg(base, [base, base], "logistic")
    cfg["experts"][1]["negative_prompts"] = PROMPTS["neg"]
    with pytest.raises(ConfigError, match="negative_prompts: expected none"):
        parse_moe_config(cfg)
