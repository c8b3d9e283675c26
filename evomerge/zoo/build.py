"""`evomerge zoo`: train the tiny offline model zoo (a base and one expert per task) on CPU.

The zoo is where merging is a real problem: the base knows every prompt format and the easy
version of every skill; each expert is fine-tuned from the base on the hard version of one task
with replay of the base mix, so it stays in the base's basin (its task vector merges) and keeps
the other skills at base level. See tasks.py for the tasks and evals/ for their lm-eval form.

MLP experts (OUT/mlp/<task>) are trained like the experts but with everything except the MLP
weights frozen: attention, embeddings and norms stay the base's, so a mergekit-style MoE (base
attention + one MLP per expert, `evomerge moe`) keeps all of what each of them learned.

Depth experts (OUT/depth/<task>) are trained with only one half of the decoder layers free:
the tasks in `depth_lower` train the lower half, the others the upper half; embeddings, the
final norm and the other half stay the base's bytes. Their skills live at different depths,
the zoo where a layer-stacking search (which layers run, in which order) can differ from a
weight search: two experts of the same half fight in weight space, two of different halves
do not (scripts/bench_stacking.py).

Layout: OUT/base, OUT/<task> for task in tasks.TASKS, OUT/mlp/<task>, OUT/depth/<task>
(ordinary HF Qwen2 checkpoints), and OUT/zoo.json, written last, whose settings hashes mark a
finished zoo (then it is reused). OUT/mlp and OUT/depth are not model folders, so globs of
OUT/* for models skip them.
Each model is written to a temporary folder and renamed, so a crash leaves no half-written
model; an interrupted build resumes from the models it finished (training is deterministic, so
the result is bit-identical to an uninterrupted build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.zoo.tasks import TASKS, Example
from evomerge.zoo.tokenizer import EOS, build_tokenizer, tokenizer_config
from evomerge.zoo.training import base_mix, deterministic, expert_mix, freeze_all_but, train

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

ZOO_FORMAT = 2  # bump when the training code changes what a given setting produces
MLP_FORMAT = 1  # the same, for the MLP experts only
MLP_DIR = "mlp"  # OUT/mlp/<task>
DEPTH_FORMAT = 1  # the same, for the depth experts only
DEPTH_DIR = "depth"  # OUT/depth/<task>
MARKER = "zoo.json"
MODEL_META = "zoo_model.json"


@dataclass(frozen=True)
class ZooSettings:
    """Everything that determines the zoo's bytes (hashed into the marker)."""

    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    max_positions: int = 64
    base_steps: int = 800
    base_batch: int = 128
    base_lr: float = 1e-3
    expert_steps: int = 250
    expert_batch: int = 64
    expert_lr: float = 4e-4
    replay: float = 0.5  # share of each expert batch drawn from the base mix
    warmup: float = 0.05
    mlp_steps: int = 250  # MLP experts: only the MLP weights train (see the module docstring)
    mlp_batch: int = 64
    mlp_lr: float = 3e-3
    mlp_replay: float = 0.25
    depth_steps: int = 250  # depth experts: only one half of the layers trains (docstring)
    depth_batch: int = 64
    depth_lr: float = 2e-3
    depth_replay: float = 0.25
    depth_lower: tuple[str, ...] = ("add", "cap")  # these train the lower half, the rest the upper

    def _fields(self, *variants: str) -> dict[str, Any]:
        """The dense fields plus those of `variants` (each variant's fields leave the others'
        hashes unchanged, so adding one retrains nothing else)."""
        other = tuple(f"{v}_" for v in ("mlp", "depth") if v not in variants)
        return {k: v for k, v in asdict(self).items() if not k.startswith(other)}

    def digest(self) -> str:
        """Hash of the base and experts' settings (the mlp_*/depth_* fields leave it unchanged)."""
        return _hash({"format": ZOO_FORMAT, **self._fields()})

    def mlp_digest(self) -> str:
        """Hash of the MLP experts' settings (which include everything the base depends on)."""
        return _hash({"format": ZOO_FORMAT, "mlp_format": MLP_FORMAT, **self._fields("mlp")})

    def depth_digest(self) -> str:
        """Hash of the depth experts' settings (which include everything the base depends on)."""
        return _hash({"format": ZOO_FORMAT, "depth_format": DEPTH_FORMAT, **self._fields("depth")})

    def depth_layers(self, task: str) -> range:
        """The decoder layers a depth expert trains: the lower or the upper half (with an odd
        count the middle layer is in both; with one layer both halves are that layer)."""
        if task in self.depth_lower:
            return range(0, (self.layers + 1) // 2)
        return range(self.layers // 2, self.layers)


def _hash(obj: dict[str, Any]) -> str:
    blob = json.dumps(obj, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_SETTINGS = ZooSettings()


# --- model ---------------------------------------------------------------------------------


def model_config(s: ZooSettings, vocab_size: int, eos_id: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_sliding_window=False,
        dtype="float32",
    )


# --- saving / reuse ----------------------------------------------------------------------


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_model(model: Any, tok: Tokenizer, dest: Path, meta: dict[str, Any]) -> None:
    """Write a full HF checkpoint to a temp folder, then rename it into place."""
    from transformers import GenerationConfig

    tmp = dest.parent / f".tmp-{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    eos = tok.token_to_id(EOS)
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False, max_new_tokens=16
    )
    model.save_pretrained(tmp)
    tok.save(str(tmp / "tokenizer.json"))
    _write_json(
        tmp / "tokenizer_config.json", tokenizer_config(model.config.max_position_embeddings)
    )
    _write_json(tmp / MODEL_META, {**meta, "weights_sha256": _sha256(tmp / "model.safetensors")})
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finished(dest: Path, digest: str) -> bool:
    """A model folder written by this settings digest whose weights are intact."""
    try:
        meta = json.loads((dest / MODEL_META).read_text())
        return meta.get("settings") == digest and meta.get("weights_sha256") == _sha256(
            dest / "model.safetensors"
        )
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Stage:
    """One model of the zoo; every model but the base starts from the trained base."""

    name: str  # its folder under OUT: "base", "<task>" or "mlp/<task>"
    sample: Callable[[random.Random], Example]
    steps: int
    batch: int
    lr: float
    digest: str  # the settings hash its zoo_model.json must carry to be reused
    role: dict[str, str]
    trainable: tuple[str, ...] = ()  # name fragments of the parameters that train; () = all


def _stages(s: ZooSettings, with_mlp: bool = True, with_depth: bool = False) -> list[Stage]:
    dense, mlp, depth = s.digest(), s.mlp_digest(), s.depth_digest()
    stages = [
        Stage("base", base_mix, s.base_steps, s.base_batch, s.base_lr, dense, {"role": "base"})
    ]
    for t in TASKS:
        role = {"role": "expert", "task": f"zoo_{t}"}
        sample = expert_mix(t, s.replay)
        stages.append(Stage(t, sample, s.expert_steps, s.expert_batch, s.expert_lr, dense, role))
    for t in TASKS if with_mlp else ():
        role = {"role": "mlp_expert", "task": f"zoo_{t}"}
        sample = expert_mix(t, s.mlp_replay)
        name, only = f"{MLP_DIR}/{t}", (".mlp.",)
        stages.append(Stage(name, sample, s.mlp_steps, s.mlp_batch, s.mlp_lr, mlp, role, only))
    for t in TASKS if with_depth else ():
        layers = s.depth_layers(t)
        role = {
            "role": "depth_expert",
            "task": f"zoo_{t}",
            "layers": f"{layers.start}-{layers.stop}",
        }
        sample = expert_mix(t, s.depth_replay)
        only = tuple(f"model.layers.{i}." for i in layers)
        stages.append(
            Stage(
                f"{DEPTH_DIR}/{t}",
                sample,
                s.depth_steps,
                s.depth_batch,
                s.depth_lr,
                depth,
                role,
                only,
            )
        )
    return stages


def zoo_is_built(
    out: Path, settings: ZooSettings, mlp: bool = True, depth: bool | None = None
) -> bool:
    """True if `out` holds the zoo of `settings` (with its MLP experts if `mlp`, its depth
    experts if `depth`, which follows `mlp` when not given: both are extras of the full zoo)."""
    depth = mlp if depth is None else depth
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("settings") == settings.digest()
        and (not mlp or marker.get("mlp_settings") == settings.mlp_digest())
        and (not depth or marker.get("depth_settings") == settings.depth_digest())
        and all(_finished(out / st.name, st.digest) for st in _stages(settings, mlp, depth))
    )


def _load_weights(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    model.tie_weights()


def _train_stage(model: Any, tok: Tokenizer, st: Stage, s: ZooSettings, bar: Any) -> float:
    def on_step(loss: float) -> None:
        bar.set_postfix_str(f"{st.name} loss {loss:.3f}", refresh=False)
        bar.update(1)

    if st.trainable:
        freeze_all_but(model, st.trainable)
    return train(
        model,
        tok,
        st.sample,
        steps=st.steps,
        batch=st.batch,
        lr=st.lr,
        warmup=s.warmup,
        data_seed=f"{s.seed}-{st.name}",
        on_step=on_step,
    )


def build_zoo(
    out: str | Path,
    settings: ZooSettings | None = None,
    progress: bool = True,
    mlp: bool = True,
    depth: bool | None = None,
) -> Path:
    """Train (or reuse) the zoo under `out`; returns its folder. Same settings -> same bytes.
    `mlp` False skips the MLP experts (only `evomerge moe` uses them; the demo does not);
    `depth` (default: as `mlp`) the depth experts (only scripts/bench_stacking.py uses them)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import Qwen2ForCausalLM

    s = settings or DEFAULT_SETTINGS
    out = Path(out)
    depth = mlp if depth is None else depth
    if zoo_is_built(out, s, mlp, depth):
        return out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"zoo: expected a folder for --out, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # the zoo is unfinished until the marker is back
    stale_tmp = [
        *out.glob(".tmp-*"),
        *out.glob(f"{MLP_DIR}/.tmp-*"),
        *out.glob(f"{DEPTH_DIR}/.tmp-*"),
    ]
    for stale in stale_tmp:  # interrupted writes
        shutil.rmtree(stale)
    tok = build_tokenizer()
    config = model_config(s, tok.get_vocab_size(), tok.token_to_id(EOS))
    stages = _stages(s, mlp, depth)
    bar = tqdm(total=sum(st.steps for st in stages), desc="zoo", unit="step", disable=not progress)
    with deterministic(), bar:
        base_state: dict[str, torch.Tensor] = {}
        for st in stages:
            torch.manual_seed(s.seed)
            model = Qwen2ForCausalLM(config)  # float32; the base's init comes from the seed
            if base_state:
                model.load_state_dict(base_state)
            if _finished(out / st.name, st.digest):  # resume: reuse what a previous run finished
                _load_weights(model, out / st.name)
                bar.update(st.steps)
            else:
                loss = _train_stage(model, tok, st, s, bar)
                (out / st.name).parent.mkdir(parents=True, exist_ok=True)
                meta = {"settings": st.digest, "seed": s.seed, "loss": loss, **st.role}
                save_model(model, tok, out / st.name, meta)
            if st.name == "base":
                base_state = {k: v.clone() for k, v in model.state_dict().items()}
    marker = {
        "settings": s.digest(),
        "config": asdict(s),
        "base": "base",
        "experts": {f"zoo_{t}": t for t in TASKS},
    }
    if mlp or all(_finished(out / st.name, st.digest) for st in _stages(s)):  # built earlier
        marker["mlp_settings"] = s.mlp_digest()
        marker["mlp_experts"] = {f"zoo_{t}": f"{MLP_DIR}/{t}" for t in TASKS}
    if depth or all(_finished(out / st.name, st.digest) for st in _stages(s, False, True)):
        marker["depth_settings"] = s.depth_digest()
        marker["depth_experts"] = {f"zoo_{t}": f"{DEPTH_DIR}/{t}" for t in TASKS}
    _write_json(out / MARKER, marker)  # last: its presence means the zoo is complete
    return out


def cli_zoo(args: argparse.Namespace) -> int:
    """`evomerge zoo [--out DIR] [--seed N]`."""
    s = replace(DEFAULT_SETTINGS, seed=int(args.seed))
    out = Path(args.out)
    if zoo_is_built(out, s):
        print(f"zoo: {out} is up to date (settings {s.digest()})")
        return 0
    build_zoo(out, s, progress=True)
    print(f"zoo: built base + experts, MLP and depth experts {', '.join(TASKS)} in {out}")
    return 0
