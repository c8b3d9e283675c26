"""Tokenizers of a merge: `tokenizer_source` (base, a model, or union), per-token embedding
overrides, vocabulary padding, embedding surgery and chat templates.

Embedding rows are permuted into the output vocabulary *before* the merge method runs, so every
method sees aligned rows. A model that lacks a token gets a default row, as mergekit does: the
base's row if the base has the token, else the mean of the models that have it (the donor's row
when only one has it), else zeros; `tokens: {tok: {source: ..., force: ...}}` overrides the
default, and with `force` also the rows of the models that have the token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

    from evomerge.recipe.schema import MergeStage

VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + "
        "eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor has one row per token (input embeddings or the output head)."""
    return name.endswith(VOCAB_TENSOR_SUFFIXES)


def read_vocab(folder: Path) -> dict[str, int]:
    """token -> id of a model's tokenizer (tokenizer.json; else transformers' AutoTokenizer)."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception as exc:
        raise ConfigError(f"{folder}: no tokenizer could be loaded ({exc})") from None


@dataclass
class VocabPlan:
    """How embedding rows of each source map into the output vocabulary.

    perms[key][i] is the row of model `key` holding output token i, or -1 if it lacks it.
    """

    vocab_size: int  # rows of the output embeddings (after padding)
    tokenizer_dir: Path  # tokenizer files are copied from here...
    files: dict[str, str] = field(default_factory=dict)  # ...then these override them
    perms: dict[str, torch.Tensor] = field(default_factory=dict)
    base_key: str | None = None  # the recipe's base_model: its rows are the default rows
    overrides: dict[int, tuple[Any, bool]] = field(default_factory=dict)  # id -> (source, force)
    vocabs: dict[str, dict[str, int]] = field(default_factory=dict)
    identity: bool = False

    def align(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each model's (rows, hidden) tensor -> (vocab_size, hidden), rows in output order."""
        import torch

        if self.identity:
            return dict(tensors)
        keys = list(tensors)
        hidden = tensors[keys[0]].shape[1]
        present = torch.stack([self.perms[k] >= 0 for k in keys])  # (n, V)
        rows = {k: tensors[k][self.perms[k].clamp(min=0)] for k in keys}  # each (V, hidden)
        count = present.sum(0)  # (V,)
        default = sum(rows[k] * present[i, :, None] for i, k in enumerate(keys))
        default = default / count.clamp(min=1)[:, None]  # mean of the models that have the token
        if self.base_key in tensors:
            has = present[keys.index(self.base_key)]
            default[has] = rows[self.base_key][has]
        force = torch.zeros(self.vocab_size, dtype=torch.bool)
        for tid, (source, forced) in self.overrides.items():
            default[tid] = self._override_row(source, tid, tensors, hidden)
            force[tid] = forced
        out = {}
        for i, k in enumerate(keys):
            own = present[i] & ~force
            out[k] = torch.where(own[:, None], rows[k], default)
        return out

    def _override_row(
        self, source: Any, tid: int, tensors: Mapping[str, torch.Tensor], hidden: int
    ):
        import torch

        if isinstance(source, dict) and source.get("kind") == "zero":
            return torch.zeros(hidden, dtype=tensors[next(iter(tensors))].dtype)
        key = source["model"] if isinstance(source, dict) else source
        if key not in tensors:
            raise ConfigError(f"tokenizer.tokens: model '{key}' is not a model of this merge")
        if isinstance(source, dict):  # {kind: model_token, model, token | token_id}
            src = source.get("token_id")
            if src is None:
                src = self.vocabs[key].get(source["token"])
                if src is None:
                    raise ConfigError(f"tokenizer.tokens: token {source['token']!r} not in '{key}'")
            if not 0 <= src < tensors[key].shape[0]:
                raise ConfigError(f"tokenizer.tokens: token_id {src} out of range for '{key}'")
            return tensors[key][src]
        src = int(self.perms[key][tid])
        if src < 0:
            raise ConfigError(f"tokenizer.tokens: model '{key}' has no token with output id {tid}")
        return tensors[key][src]


def _pick(name: str, keys: list[str], where: str) -> str:
    """A model named in the recipe -> its key among the stage's models (str(ModelRef))."""
    if name in keys:
        return name
    by_path = [k for k in keys if k.partition("@")[0] == name]
    if len(by_path) == 1:
        return by_path[0]
    raise ConfigError(f"{where}: " + did_you_mean(name, keys, "model"))


def _union_tokenizer(dirs: Mapping[str, Path], order: list[str]) -> tuple[str, dict[str, int]]:
    """Base's tokenizer.json plus the tokens of the others, in order, as added tokens."""
    from tokenizers import AddedToken, Tokenizer

    for k in order:
        if not (dirs[k] / "tokenizer.json").is_file():
            raise ConfigError(f"tokenizer union needs tokenizer.json, but {dirs[k]} has none")
    tok = Tokenizer.from_file(str(dirs[order[0]] / "tokenizer.json"))
    seen = set(tok.get_vocab(with_added_tokens=True))
    for k in order[1:]:
        other = Tokenizer.from_file(str(dirs[k] / "tokenizer.json"))
        special = {a.content for a in other.get_added_tokens_decoder().values() if a.special}
        vocab = other.get_vocab(with_added_tokens=True)
        for t in sorted(vocab, key=vocab.__getitem__):
            if t not in seen:
                tok.add_tokens([AddedToken(t, special=t in special, normalized=t not in special)])
                seen.add(t)
    return tok.to_str(pretty=True), tok.get_vocab(with_added_tokens=True)


def plan_vocab(
    stage: MergeStage,
    dirs: Mapping[str, Path],
    embed_rows: Mapping[str, int],
    base_key: str,
) -> VocabPlan | None:
    """The vocabulary plan of a stage, or None when the recipe sets no tokenizer (then every
    model must have the same embedding shape and rows are merged as they are).

    dirs: model key (str(ModelRef)) -> folder, for every model of the stage; base_key: the base
    (or first) model; embed_rows: rows of each model's input embedding.
    """
    cfg = stage.tokenizer
    if cfg is None:
        return None
    keys = list(dirs)
    vocabs = {k: read_vocab(dirs[k]) for k in keys}
    files: dict[str, str] = {}
    if cfg.source == "union":
        order = [base_key] + [k for k in keys if k != base_key]
        text, vocab = _union_tokenizer(dirs, order)
        files["tokenizer.json"] = text
        src_key, n_rows = base_key, len(vocab)
    else:
        src_key = base_key if cfg.source == "base" else _pick(cfg.source, keys, "tokenizer.source")
        vocab = vocabs[src_key]
        n_rows = max(len(vocab), embed_rows[src_key])
    pad = cfg.pad_to_multiple_of or 1
    size = -(-n_rows // pad) * pad
    default_key = str(stage.base_model) if stage.base_model is not None else None
    plan = VocabPlan(size, dirs[src_key], files, base_key=default_key, vocabs=vocabs)
    same = all(vocabs[k] == vocab and embed_rows[k] == size for k in keys)
    if same and not cfg.tokens:
        plan.identity = True
        return plan
    plan.perms = {
        k: _perm(vocab, vocabs[k], size, embed_rows[k], cfg.source != "union") for k in keys
    }
    for tok, spec in cfg.tokens.items():
        if tok not in vocab:
            raise ConfigError(f"tokenizer.tokens: token {tok!r} is not in the output vocabulary")
        source = spec.source
        if isinstance(source, str):
            source = _pick(source, keys, f"tokenizer.tokens[{tok!r}].source")
        elif source.get("kind") == "model_token":
            source = {**source, "model": _pick(source["model"], keys, f"tokenizer.tokens[{tok!r}]")}
        plan.overrides[vocab[tok]] = (source, spec.force)
    return plan


def _perm(out_vocab: dict[str, int], vocab: dict[str, int], size: int, rows: int, keep_pad: bool):
    """(size,) long: row of this model holding each output token, -1 where it has none."""
    import torch

    perm = torch.full((size,), -1, dtype=torch.long)
    for tok, i in out_vocab.items():
        j = vocab.get(tok)
        if j is not None and j < rows and i < size:
            perm[i] = j
    if keep_pad and min(size, rows) > len(out_vocab):  # padding rows past the tokenizer
        ids = torch.arange(len(out_vocab), min(size, rows))
        perm[ids] = ids
    return perm


def resolve_chat_template(spec: str, dirs: Mapping[str, Path], base_key: str) -> str | None:
    """`chat_template:` -> jinja text: a known name, "base", a model of the merge, jinja, or
    "auto" (None when no input has a template: the tokenizer source's files stay as they are)."""
    if "{{" in spec or "{%" in spec:
        return spec
    if spec == "auto":
        return plurality_chat_template(dirs)
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    keys = list(dirs)
    if spec == "base" or spec in keys or any(k.partition("@")[0] == spec for k in keys):
        key = base_key if spec == "base" else _pick(spec, keys, "chat_template")
        text = model_chat_template(dirs[key])
        if text is None:
            raise ConfigError(f"chat_template: model '{key}' has no chat template")
        return text
    raise ConfigError(
        "chat_template: " + did_you_mean(spec, [*CHAT_TEMPLATES, "auto", "base", *keys], "template")
    )


def plurality_chat_template(dirs: Mapping[str, Path]) -> str | None:
    """mergekit's `chat_template: auto`: the template most inputs carry (compared stripped, as
    mergekit does). mergekit counts over a set of models, so its tie order is arbitrary; here a
    tie goes to the model listed first (base, models, slices)."""
    from collections import Counter

    found = [t.strip() for t in (model_chat_template(d) for d in dirs.values()) if t]
    if not found:
        return None
    counts = Counter(found)  # most_common keeps first-seen order among equal counts
    return counts.most_common(1)[0][0]


def model_chat_template(folder: Path) -> str | None:
    """A model's chat template as transformers reads it: chat_template.jinja first, else
    tokenizer_config.json's `chat_template` (a string, or a list of named templates whose
    "default" entry counts, as mergekit takes it)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        tpl = json.loads(cfg_file.read_text()).get("chat_template")
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        return tpl if isinstance(tpl, str) else None
    return None


def tokenizer_files(
    stage: MergeStage, plan: VocabPlan | None, dirs: Mapping[str, Path], base_key: str
) -> tuple[Path, dict[str, str]]:
    """(folder to copy tokenizer files from, files to write over them) for the output."""
    src = plan.tokenizer_dir if plan else dirs[base_key]
    files = dict(plan.files) if plan else {}
    cfg_file = src / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    changed = False
    if plan and "tokenizer.json" in files and "added_tokens_decoder" in tok_cfg:
        tok_cfg["added_tokens_decoder"] = _added_tokens_decoder(files["tokenizer.json"])
        changed = True
    text = stage.chat_template and resolve_chat_template(stage.chat_template, dirs, base_key)
    if text:
        tok_cfg["chat_template"] = text
        files["chat_template.jinja"] = text  # transformers 5 reads this file before the config
        changed = True
    if changed:
        files["tokenizer_config.json"] = json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n"
    return src, files


def _added_tokens_decoder(tokenizer_json: str) -> dict[str, dict]:
    added = json.loads(tokenizer_json).get("added_tokens", [])
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {str(a["id"]): {k: a[k] for k in keys if k in a} for a in added}


UNION_HINT = "set `tokenizer_source: union` (or base) to align embedding rows"


def check_vocab_rows(
    name: str, shapes: Mapping[str, tuple[int, ...]], hint: str = UNION_HINT
) -> None:
    """Without a tokenizer plan, vocab tensors must agree in shape across models. `hint`
    says what to do about it (a search space, which has no tokenizer rule, says another)."""
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k}: {list(s)}" for k, s in shapes.items())
        raise ConfigError(
            f"tensor '{name}' has different shapes ({desc}): the vocabularies differ; {hint}"
        )
