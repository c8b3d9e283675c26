"""HFBackend: a transformers causal LM loaded once, scored the way lm-eval's HFLM scores.

Tokenization follows HFLM exactly (trailing context spaces move to the continuation, the
whole string is encoded and split, BOS handling, left truncation to the model's max length),
so scores equal lm-eval's. Speed comes from what a candidate loop can reuse: encodings are
cached per string, identical model inputs run once, log-probs are computed only at the
continuation positions, and generation is a plain greedy loop over a KV cache that drops
finished rows instead of padding them to the end, that first verifies, in one forward
pass, the answer the previous candidate gave (a draft: see generate), and that stops a
row as soon as it can no longer score under exact match (the evaluator's answers hint,
see early_exit).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.common.device import default_device
from evomerge.common.model_dir import has_config
from evomerge.errors import CandidateError, ConfigError, did_you_mean
from evomerge.eval.chat import ChatTemplating
from evomerge.eval.hf.generate import greedy_generate, prefix_stable_decoding, trace_text
from evomerge.eval.hf.prefix import PrefixStore
from evomerge.eval.hf.score import plan, score_contexts
from evomerge.eval.hf.settings import eos_ids, model_max_length, parse_batch_size, resolve_dtype
from evomerge.eval.protocol import GenerationSpec

if TYPE_CHECKING:
    from evomerge.eval.early_exit import ExactAnswers

# batch_size "auto": rows x widest row per forward pass. Enough rows that per-call overhead
# (tens of Python-level ops per layer) is amortized; activations stay small
TOKEN_BUDGET = 4096
# logit elements one forward pass may return (512 MiB in float32), whatever the batch size
LOGITS_BUDGET = 2**27
# KV bytes one evaluation may keep for prefix reuse (see prefix): 1 GiB holds ~23k tokens
# of SmolLM2-135M in float32, ~8k of a 7B Llama in bfloat16
PREFIX_BUDGET = 1 << 30


class HFBackend(ChatTemplating):
    """A transformers model on one device. Use `HFBackend(dir)` or `HFBackend.from_model(...)`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 64,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        drafts: bool = True,
        early_exit: bool = True,
        prefix_reuse: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not has_config(path):
            raise ConfigError(f"expected a model folder with config.json, got '{model_dir}'")
        device = device or default_device()
        torch_dtype = resolve_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code
            ).to(device)
        except torch.OutOfMemoryError as exc:
            raise CandidateError(f"out of memory loading '{model_dir}' on {device}") from exc
        self._setup(model, tokenizer, batch_size=batch_size, max_length=max_length)
        self._speedups(drafts=drafts, early_exit=early_exit, prefix_reuse=prefix_reuse)
        self.name = path.as_posix()

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int | str = 64,
        max_length: int | None = None,
        drafts: bool = True,
        early_exit: bool = True,
        prefix_reuse: bool = True,
    ) -> HFBackend:
        """Wrap an already loaded model (shared, not copied: in-place writes reach it)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, batch_size=batch_size, max_length=max_length)
        self._speedups(drafts=drafts, early_exit=early_exit, prefix_reuse=prefix_reuse)
        self.name = str(getattr(model.config, "_name_or_path", type(model).__name__))
        return self

    def _setup(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int | str,
        max_length: int | None,
    ) -> None:
        self.batch_size = parse_batch_size(batch_size)  # None: "auto"
        self.token_budget, self.logits_budget = TOKEN_BUDGET, LOGITS_BUDGET
        self.model = model.eval()
        self.tokenizer = tokenizer
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else len(tokenizer)
        self.device = next(model.parameters()).device
        self.max_length = max_length or model_max_length(model.config, tokenizer)
        # lm-eval conditions an empty context on BOS, else EOS
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self._prefix_str = (
            tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        )
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = next(
            t for t in (tokenizer.pad_token_id, eos, 0) if t is not None
        )  # any id: padded positions are masked (generate) or after the scored ones (ll)
        forward_params = inspect.signature(model.forward).parameters
        self.logits_to_keep_ok = "logits_to_keep" in forward_params
        # transformers >= 5.24 renamed past_key_values to cache (the old name warns)
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._enc_cache: dict[str, list[int]] = {}
        self._live: dict[str, torch.Tensor] | None = None
        self.prefix_store: PrefixStore | None = None  # set inside reusing_prefixes()

    def _speedups(self, *, drafts: bool, early_exit: bool, prefix_reuse: bool) -> None:
        """Switches for what changes speed only, never a score (the benchmark turns them off)."""
        self.prefix_reuse = prefix_reuse  # see reusing_prefixes
        # the last answer generated for each (prompt, spec): the next candidate's draft
        self.drafts = drafts
        self._drafts: dict[tuple[str, GenerationSpec], list[int]] = {}
        # stop a generation once it cannot score (answers hint); needs text that only grows
        self.early_exit = early_exit and prefix_stable_decoding(self.tokenizer)

    @contextlib.contextmanager
    def reusing_prefixes(self, budget_bytes: int = PREFIX_BUDGET) -> Iterator[None]:
        """Within the block, rows of earlier forward passes lend their KV to later rows that
        begin with the same tokens (see prefix). The weights must not change inside it
        (load_weights ends the reuse); the Evaluator opens one block per evaluation."""
        outer = self.prefix_store
        self.prefix_store = PrefixStore(budget_bytes) if self.prefix_reuse else None
        try:
            yield
        finally:
            self.prefix_store = outer

    # ------------------------------------------------------------------ weights
    def live_tensors(self) -> dict[str, torch.Tensor]:
        if self._live is None:
            live, seen = {}, set()
            for name, t in self.model.state_dict().items():
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if key not in seen:  # tied weights: keep the first name (the embedding)
                    seen.add(key)
                    live[name] = t
            self._live = live
        return self._live

    @torch.no_grad()
    def pack_live(self, order: Sequence[str]) -> None:
        """Move the float32 parameters into one buffer per device, those named in `order`
        first and in that order (the rest follow): a CandidateMerger whose tensor order this
        is then writes every run of tensors merged with equal parameters in one kernel call
        (see CandidateMerger.apply). Same values, new storage; tied weights stay tied.
        On CUDA only when free memory holds the new buffer beside the old parameters."""
        params = [p for p in self.model.parameters() if p.dtype == torch.float32]
        by_name = dict(self.model.named_parameters())
        rank: dict[str, int] = {}
        for name in order:
            rank.setdefault(name, len(rank))
        first = {id(p): rank.get(n, len(rank)) for n, p in by_name.items()}
        params.sort(key=lambda p: first.get(id(p), len(rank)))  # stable: model order after
        for device in {p.device for p in params}:
            group = [p for p in params if p.device == device]
            total = sum(p.numel() for p in group)
            if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 1.1 * 4 * total:
                continue
            flat = torch.empty(total, dtype=torch.float32, device=device)
            a = 0
            for p in group:
                b = a + p.numel()
                flat[a:b].view(p.shape).copy_(p.data)
                p.data = flat[a:b].view(p.shape)
                a = b
        self._live = None

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.prefix_store is not None:  # stored rows were computed with the old weights
            self.prefix_store = PrefixStore(self.prefix_store.budget)
        live = self.live_tensors()
        everything = None
        for name, value in tensors:
            dst = live.get(name)
            if dst is None:  # the second name of a tied pair is accepted too
                everything = everything or self.model.state_dict()
                dst = everything.get(name)
            if dst is None:
                raise ConfigError(did_you_mean(name, live, "tensor name in the live model"))
            if tuple(dst.shape) != tuple(value.shape):
                raise ConfigError(
                    f"tensor '{name}': expected shape {tuple(dst.shape)}, got {tuple(value.shape)}"
                )
            dst.copy_(value)
        # nothing else to reset: no logits or KV cache outlive a call; encodings do not
        # depend on the weights, and drafts from the old weights change speed, not results

    # ------------------------------------------------------------------ tokenization
    def _encode(self, text: str) -> list[int]:
        """HFLM.tok_encode: the tokenizer's default special tokens, unless BOS is already there."""
        ids = self._enc_cache.get(text)
        if ids is None:
            kw = {}
            if self._prefix_str and text.startswith(self._prefix_str):
                kw["add_special_tokens"] = False
            ids = self._enc_cache[text] = list(self.tokenizer.encode(text, **kw))
        return ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's TemplateLM._encode_pair (+ the empty-context rule of loglikelihood)."""
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ batching
    def split(self, items: Sequence[tuple[int, int]]) -> Iterator[range]:
        """Consecutive forward-pass batches over items given as (input width, logit positions
        kept): at most batch_size rows, or with batch_size "auto" as many rows as keep rows x
        widest row within the token budget; and rows x positions x vocab within the logits
        budget. A batch holds at least one item."""
        start = 0
        while start < len(items):
            end, width, keep = start + 1, *items[start]
            while end < len(items):
                w, k = max(width, items[end][0]), max(keep, items[end][1])
                if not self._fits(end - start + 1, w, k):
                    break
                end, width, keep = end + 1, w, k
            yield range(start, end)
            start = end

    def _fits(self, rows: int, width: int, keep: int) -> bool:
        if self.batch_size is None:
            within = rows * width <= self.token_budget
        else:
            within = rows <= self.batch_size
        return within and rows * keep * self.vocab_size <= self.logits_budget

    # ------------------------------------------------------------------ log-likelihood
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        # Requests that share a context (the choices of a multiple-choice question) run the
        # context once, with what their continuations share (see score). lm-eval runs
        # context + continuation once per choice, and the context is most of the tokens.
        by_ctx: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(requests):
            ctx_ids, cont_ids = self._encode_pair(ctx, cont)
            if not cont_ids:
                raise ConfigError(f"empty continuation after tokenization: {cont!r}")
            # lm-eval's left truncation: the model sees the last max_length tokens of ctx+cont
            whole = (ctx_ids + cont_ids)[-(self.max_length + 1) :]
            kept_ctx = whole[: max(len(whole) - len(cont_ids), 0)]
            if not kept_ctx:
                raise ConfigError(
                    f"continuation of {len(cont_ids)} tokens does not fit the model's maximum "
                    f"length ({self.max_length}): {cont[:40]!r}"
                )
            by_ctx[tuple(kept_ctx)].append((i, cont_ids))
        contexts = sorted(by_ctx, key=lambda t: (-len(t), t))  # long first, like lm-eval
        plans = [plan(by_ctx[c]) for c in contexts]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        sizes = [
            (len(c) + len(p.stem), 1 + len(p.stem)) for c, p in zip(contexts, plans, strict=True)
        ]
        for batch in self.split(sizes):
            picked = [contexts[j] for j in batch]
            for i, score in score_contexts(self, picked, [plans[j] for j in batch]):
                out[i] = score
        return out

    def forward(self, ids, mask, pos, cache, logits_to_keep: int) -> Any:
        """One forward pass with a KV cache (logits_to_keep: 0 = all positions): the Runner
        interface that score, generate and prefill drive the model through."""
        kw = {"logits_to_keep": logits_to_keep} if self.logits_to_keep_ok else {}
        kw[self._cache_kw] = cache
        try:
            res = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw
            )
        except torch.OutOfMemoryError as exc:
            raise CandidateError(f"out of memory on a batch of {tuple(ids.shape)}") from exc
        if logits_to_keep and not self.logits_to_keep_ok:
            res.logits = res.logits[:, -logits_to_keep:]
        return res

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[tuple[str, GenerationSpec]],
        answers: Sequence[ExactAnswers | None] | None = None,
    ) -> list[str]:
        out = [""] * len(requests)
        prompts: dict[int, list[int]] = {}
        for i, (context, spec) in enumerate(requests):
            if spec.do_sample and spec.temperature > 0:
                raise ConfigError("proxy evaluation generates greedily; got do_sample: true")
            max_ctx = self.max_length - spec.max_gen_toks
            if max_ctx <= 0:
                raise ConfigError(
                    f"max_gen_toks ({spec.max_gen_toks}) must be below the model's maximum "
                    f"length ({self.max_length})"
                )
            if spec.max_gen_toks >= 1:
                prompts[i] = self._encode(context)[-max_ctx:]
        hints = list(answers) if answers is not None else [None] * len(requests)
        if len(hints) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(hints)} answers hints")
        keys = {i: (requests[i][0], requests[i][1]) for i in prompts}  # text fixes the ids
        drafts = {i: self._drafts.get(keys[i], []) for i in prompts} if self.drafts else {}
        for rows in self._generation_batches(requests, prompts, drafts):
            traces = greedy_generate(
                self,
                [prompts[i] for i in rows],
                [requests[i][1] for i in rows],
                [drafts[i] for i in rows] if drafts else None,
                [hints[i] for i in rows],
            )
            for i, trace in zip(rows, traces, strict=True):
                out[i] = trace_text(self, trace, requests[i][1])
                if self.drafts:
                    self._drafts[keys[i]] = trace
        return out

    def _generation_batches(
        self,
        requests: Sequence[tuple[str, GenerationSpec]],
        prompts: dict[int, list[int]],
        drafts: dict[int, list[int]],
    ) -> Iterator[list[int]]:
        """Request indices in forward-pass batches. Rows of a spec (a task, mostly) stay
        together, longest first (they share a prompt prefix and need little padding), but a
        batch may run on into the next spec's rows: each row ends by its own max_gen_toks
        and stop strings, so a small chunk of several tasks fills one batch, not one each."""
        group = {spec: g for g, spec in enumerate(dict.fromkeys(s for _, s in requests))}
        # what a row feeds first: its prompt and all but the last token of its draft (see
        # greedy_generate)
        width = {i: len(p) + max(len(drafts.get(i, ())) - 1, 0) for i, p in prompts.items()}
        order = sorted(prompts, key=lambda i: (group[requests[i][1]], -width[i], requests[i][0]))
        for batch in self.split([(width[i], 1) for i in order]):
            yield [order[j] for j in batch]
