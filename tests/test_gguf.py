"""`evomerge export --gguf`: a GGUF that transformers loads back (llama.cpp's layout, Q/K permuted
for Llama/Mistral) with the checkpoint's logits, against weights rounded by hand to what each
GGUF type stores (f16, bf16, llama.cpp's q8_0 blocks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model

pytest.importorskip("gguf")


def _round_q8_0(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 by hand (ggml-quants.c quantize_row_q8_0_ref): blocks of 32 along a row,
    d = max|x| / 127, q = round-half-away(x / d) as int8, d stored as f16; dequantized q * d."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    x = blocks * torch.where(d > 0, 1 / d, 0)
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)
    return (q * d.half().float()).reshape(w.shape)


ROUND = {
    "f16": lambda w: w.half().float(),
    "bf16": lambda w: w.bfloat16().float(),
    "q8_0": _round_q8_0,
}


def _reference_logits(model_dir: Path, qtype: str, ids: torch.Tensor) -> torch.Tensor:
    """The safetensors model with every matrix rounded as the GGUF type stores it (norms and
    biases stay float32, as llama.cpp keeps them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(ROUND[qtype](p))
        return model(ids).logits


def _gguf_logits(folder: Path, file: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_gguf_logits_per_architecture(tmp_path: Path, arch: str):
    from evomerge.export.gguf import write_gguf

    model = write_tiny_model(tmp_path / arch, arch=arch, seed=5, hidden=64)
    ids = torch.arange(3, 45).unsqueeze(0)
    for qtype in ("f16", "bf16", "q8_0"):
        out = write_gguf(model, model / f"model-{qtype}.gguf", qtype)
        got = _gguf_logits(model, out.name, ids)
        want = _reference_logits(model, qtype, ids)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=f"{arch} {qtype}")
    # every weight read back is the checkpoint's, rounded as the type stores it: the Q/K rows
    # are where the loader's reverse permutation puts them (the tiny model's near-uniform
    # attention would hide a scrambled head order from the logits)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = load_file(str(model / "model.safetensors"))
    for qtype in ("f16", "q8_0"):
        loaded = AutoModelForCausalLM.from_pretrained(
            model, gguf_file=f"model-{qtype}.gguf", dtype=torch.float32
        ).state_dict()
        for name, w in src.items():
            want = ROUND[qtype](w) if w.dim() == 2 else w
            torch.testing.assert_close(loaded[name], want, atol=1e-6, rtol=0, msg=name)


def test_gguf_tokenizer_round_trip(tmp_path: Path):
    """The zoo's byte-level BPE tokenizer and the tests' char-level WordLevel one, read back from
    the GGUF by transformers, encode as the folder's tokenizer.json does."""
    from transformers import AutoTokenizer

    from evomerge.export.gguf import write_gguf

    zoo = Path(__file__).parents[1] / "zoo" / "base"
    char = write_tiny_model(tmp_path / "char", arch="llama", seed=0)
    for src in (zoo, char):
        if not (src / "tokenizer.json").is_file():
            continue
        folder = tmp_path / f"g-{src.name}"
        folder.mkdir()
        shutil.copy(src / "tokenizer.json", folder / "src-tokenizer.json")
        out = write_gguf(src, folder / "m.gguf", "q8_0")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=out.name)
        ref = AutoTokenizer.from_pretrained(src)
        # the char vocabulary has no newline: transformers' GGUF tokenizer drops an unknown
        # character where tokenizer.json's WordLevel gives <unk>, so only the zoo's is tried
        for text in ("abc", "hello world", "12+3=", *(("a\nb é",) if src == zoo else ())):
            assert tok(text).input_ids == ref(text).input_ids, (src.name, text)


def test_export_gguf_through_the_cli(tmp_path: Path, capsys):
    """`evomerge export --gguf q8_0` on a study of tiny Llamas: model-q8_0.gguf beside the
    safetensors, loading back with the exported checkpoint's logits; bad input exits 2 and
    writes nothing."""
    from test_export import _make_study

    from evomerge.cli import main

    study = _make_study(tmp_path, "g")
    out = tmp_path / "w"
    assert main(["export", str(study), "--out", str(out), "--gguf", "q8_0"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "model-q8_0.gguf").is_file()
    ids = torch.arange(3, 30).unsqueeze(0)
    torch.testing.assert_close(
        _gguf_logits(out, "model-q8_0.gguf", ids),
        _reference_logits(out, "q8_0", ids),
        atol=2e-5,
        rtol=0,
    )
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["export", str(study), "--out", str(bad), "--gguf", "q8"]) == 2
    err = capsys.readouterr().err
    assert "unknown GGUF type 'q8'. Did you mean 'q8_0'?" in err and len(err.splitlines()) == 1
    assert main(["export", str(study), "--out", str(bad), "--gguf", "f16", "--no-checkpoint"]) == 2
    assert not bad.exists()
