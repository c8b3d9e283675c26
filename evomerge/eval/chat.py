"""Chat-template prompts, the same for every backend: a task with `apply_chat_template` must
build identical prompts on hf and vLLM, or their scores could not be compared."""

from __future__ import annotations

from typing import Any


class ChatTemplating:
    """lm-eval's HFLM.apply_chat_template and tokenizer_name, for a backend with a
    `tokenizer` (transformers) and a `name` (the model folder)."""

    tokenizer: Any
    name: str

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")
