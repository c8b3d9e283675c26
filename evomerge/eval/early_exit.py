"""Early exit for exact-match generation: which rows may stop before their end, and when.

A row of a generate_until task scored by lm-eval's own exact_match (no ignore_case,
ignore_punctuation, ignore_numbers or regexes_to_ignore), whose filter pipeline at most strips
whitespace before take_first, scores 1 only if its final text equals a gold target. Once the
text generated so far can no longer grow into one, its score is 0 whatever comes next, so a
backend may stop the row there and return the text so far: lm-eval scores that 0 as well.

Everything here is about strings; the backend adds what it knows about its tokenizer (which
characters of a decoded prefix later tokens may still change, see hf.generate.settled_text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.eval.lm_compat import filter_ensembles, has_metric, metric_fn, metric_kwargs

# exact_match keyword arguments that leave the comparison exact when false/None
_EXACT_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")


@dataclass(frozen=True)
class ExactAnswers:
    """The final texts that score for one generation request (a hint for the backend).

    `answers`: the gold targets as lm-eval compares them; `strip`: the task's filter strips
    the response first. A backend may stop a row once `could_match` says False, or ignore it.
    """

    answers: tuple[str, ...]
    strip: bool = False

    def could_match(self, text: str, stops: Sequence[str] = ()) -> bool:
        """Whether `text`, a generation so far that holds none of `stops`, can still end as a
        final answer equal to one of the answers, whatever is generated after it."""
        head = committed_prefix(before_partial_stop(text, stops), self.strip)
        # lm-eval compares numpy string arrays, which drop trailing NUL characters
        return any(a.rstrip("\0").startswith(head) for a in self.answers)


def before_partial_stop(text: str, stops: Sequence[str]) -> str:
    """`text` without its longest suffix that begins a stop string: the final answer, cut
    before the first stop string, starts with what is returned."""
    cut = len(text)
    for stop in (s for s in stops if s):
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut]


def committed_prefix(text: str, strip: bool) -> str:
    """The prefix that every final answer grown from `text` has, as lm-eval compares it:
    trailing NULs may vanish (numpy), and with `strip` leading whitespace goes and trailing
    whitespace may go."""
    if not strip:
        return text.rstrip("\0")
    head = text.lstrip()
    end = len(head)
    while end and (head[end - 1].isspace() or head[end - 1] == "\0"):
        end -= 1
    return head[:end]


# ---------------------------------------------------------------------- from a task's config
def early_exit_blocker(task: Any) -> str | None:
    """Why rows of this lm-eval task must be generated in full (None: early exit is exact).

    The primary metric must be lm-eval's exact_match with no option that loosens it, scored
    by lm-eval's own process_results, on the first filter pipeline's output (the one a proxy
    score uses) when that pipeline is remove_whitespace steps, if any, then take_first.
    """
    from lm_eval.api.metrics import exact_match_fn
    from lm_eval.api.task import ConfigurableTask

    if task.get_config("output_type") != "generate_until":
        return "not a generate_until task"
    metric = next(iter(task.aggregation()), None)
    if metric != "exact_match":
        return f"its metric is {metric}, not exact_match"
    if (
        task.get_config("process_results") is not None
        or type(task).process_results is not ConfigurableTask.process_results
    ):
        return "it has its own process_results"
    if metric_fn(task, metric) is not exact_match_fn:
        return "its exact_match is not lm-eval's own"
    for key, value in metric_kwargs(task, metric).items():
        if key not in _EXACT_OPTIONS or value:
            return f"exact_match has {key}: {value!r}"
    if _strips(task) is None:
        return "its filter pipeline transforms the response"
    return None


def _strips(task: Any) -> bool | None:
    """True: the first filter pipeline strips whitespace, then takes the first response;
    False: it only takes the first response; None: it does anything else."""
    from lm_eval.filters.extraction import WhitespaceFilter
    from lm_eval.filters.selection import TakeFirstFilter

    ensembles = filter_ensembles(task)
    if not ensembles:
        return False
    steps = [(getattr(f, "func", f), getattr(f, "keywords", None)) for f in ensembles[0].filters]
    if not steps or steps[-1][0] is not TakeFirstFilter or steps[-1][1]:
        return None
    if any(cls is not WhitespaceFilter or kw for cls, kw in steps[:-1]):
        return None
    return len(steps) > 1


def exact_answers(task: Any, doc: dict) -> ExactAnswers | None:
    """The answers a document's response is compared with, exactly as lm-eval's
    process_results derives them for exact_match (None where a gold is not a string).
    Call only for a task with no early_exit_blocker."""
    gold = task.doc_to_target(doc)
    if task.get_config("doc_to_choice") is not None:
        golds = [task.doc_to_choice(doc)[gold]]
    elif task.multiple_target:  # lm-eval's list(gold): a lone string becomes its characters
        golds = list(gold) if isinstance(gold, (str, list, tuple)) else []
    elif type(gold) is str or has_metric(task, "bypass"):
        golds = [gold]
    else:
        golds = [str(gold)]  # lm-eval casts the gold to the response's type
    if not golds or any(type(g) is not str for g in golds):
        return None
    return ExactAnswers(tuple(golds), strip=bool(_strips(task)))
