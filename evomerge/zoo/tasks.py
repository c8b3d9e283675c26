"""Synthetic tasks of the tiny model zoo: generators with exactly checkable answers.

Four skills, each in an "easy" version (what the base model is taught: it learns the prompt
format and a little of the skill) and a "hard" version (what an expert is fine-tuned on and what
the evals/ suite scores):

  add  "add 67+85="    -> "152"       multi-digit addition          (generation, exact match)
  rev  "rev abcde="    -> "edcba"     reverse a short string        (generation, exact match)
  cap  "cap Velmora="  -> "Tarsk"     recall a synthetic fact table (multiple choice, loglik)
  fmt  "fmt upper ab=" -> "AB"        follow a format instruction   (generation, exact match)
       "fmt box ab="   -> "[ab]"

Every example is `prompt + answer + "\\n"`; generation stops at the newline. The fact tables,
word lists and eval sets are fixed (EVAL_SEED), independent of the zoo's training seed, so the
committed evals/ files always match any zoo.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

TASKS = ("add", "rev", "cap", "fmt")
EVAL_SEED = 1234  # fixes fact tables and eval sets (not the zoo's training seed)
N_PER_SPLIT = 300  # eval examples per split per task
N_FACTS = 200  # facts in the real table: 100 scored on the search split, 100 on held-out
N_BASE_FACTS = 100  # a different table, taught to the base so it knows the `cap` format
CAP_REPEATS = N_PER_SPLIT // (N_FACTS // 2)  # each fact asked with this many distractor sets
N_CHOICES = 4
FMT_RULES = ("upper", "box")
LETTERS = "abcdefghijklmnopqrstuvwxyz"

Example = tuple[str, str]  # (prompt, answer without the trailing newline)


@dataclass(frozen=True)
class FactTables:
    real: tuple[tuple[str, str], ...]  # (country, city): what the cap expert learns and evals score
    base: tuple[tuple[str, str], ...]  # a disjoint table that teaches the base the format


def _name(rng: random.Random, syllables: int) -> str:
    onsets = "b br c d f g k l m n p r s t v z sh th tr".split()
    vowels = "a e i o u ia ea".split()
    codas = ["", "", "n", "r", "s", "l", "sk", "nd"]
    parts = [rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(codas)).capitalize()


@lru_cache(maxsize=1)
def fact_tables() -> FactTables:
    """Invented country -> city facts; every name is unique across both tables."""
    rng = random.Random(EVAL_SEED)
    seen: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            name = _name(rng, syllables)
            if name not in seen and 4 <= len(name) <= 9:
                seen.add(name)
                return name

    n = N_FACTS + N_BASE_FACTS
    pairs = [(fresh(rng.choice((2, 3))), fresh(2)) for _ in range(n)]
    return FactTables(real=tuple(pairs[:N_FACTS]), base=tuple(pairs[N_FACTS:]))


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def format_answer(rule: str, word: str) -> str:
    """The exact answer to `fmt <rule> <word>=`."""
    if rule == "upper":
        return word.upper()
    if rule == "box":
        return f"[{word}]"
    raise ValueError(f"unknown format rule {rule!r}")  # internal: rules come from FMT_RULES


# --- samplers: (rng) -> (prompt, answer) --------------------------------------------------


def add_easy(rng: random.Random) -> Example:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a}+{b}=", str(a + b)


def add_hard(rng: random.Random) -> Example:
    a, b = rng.randint(50, 99), rng.randint(50, 99)  # 3-digit sums; the base saw operands < 50
    return f"add {a}+{b}=", str(a + b)


def rev_easy(rng: random.Random) -> Example:
    w = _word(rng, 2, 5)
    return f"rev {w}=", w[::-1]


def rev_hard(rng: random.Random) -> Example:
    w = _word(rng, 5, 7)
    return f"rev {w}=", w[::-1]


def cap_easy(rng: random.Random) -> Example:
    country, city = rng.choice(fact_tables().base)
    return f"cap {country}=", city


def cap_hard(rng: random.Random) -> Example:
    country, city = rng.choice(fact_tables().real)
    return f"cap {country}=", city


def fmt_easy(rng: random.Random) -> Example:
    rule, w = rng.choice(FMT_RULES), _word(rng, 2, 5)
    return f"fmt {rule} {w}=", format_answer(rule, w)


def fmt_hard(rng: random.Random) -> Example:
    rule, w = rng.choice(FMT_RULES), _word(rng, 5, 8)
    return f"fmt {rule} {w}=", format_answer(rule, w)


EASY: dict[str, Callable[[random.Random], Example]] = {
    "add": add_easy,
    "rev": rev_easy,
    "cap": cap_easy,
    "fmt": fmt_easy,
}
HARD: dict[str, Callable[[random.Random], Example]] = {
    "add": add_hard,
    "rev": rev_hard,
    "cap": cap_hard,
    "fmt": fmt_hard,
}


def check_answer(task: str, prompt: str, answer: str) -> bool:
    """Recompute the answer from the prompt alone (tests use this to audit every record)."""
    body = prompt.removesuffix("=")
    if task == "add":
        a, b = body.removeprefix("add ").split("+")
        return answer == str(int(a) + int(b))
    if task == "rev":
        return answer == body.removeprefix("rev ")[::-1]
    if task == "cap":
        return answer == dict(fact_tables().real + fact_tables().base)[body.removeprefix("cap ")]
    if task == "fmt":
        rule, word = body.removeprefix("fmt ").split(" ")
        return answer == format_answer(rule, word)
    raise ValueError(f"unknown task {task!r}")


# --- eval sets (the records of evals/data/zoo_<task>.jsonl) -------------------------------


def _generation_records(task: str) -> list[dict]:
    """N_PER_SPLIT unique prompts per split; prompts never repeat across splits."""
    rng = random.Random(f"{EVAL_SEED}-{task}")
    seen: set[str] = set()
    records: list[dict] = []
    for split in ("search", "heldout"):
        n = 0
        while n < N_PER_SPLIT:
            prompt, answer = HARD[task](rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            records.append({"id": len(records), "split": split, "prompt": prompt, "answer": answer})
            n += 1
    return records


def _cap_records() -> list[dict]:
    """Facts 0..99 are asked on the search split, 100..199 on held-out (never the same fact)."""
    rng = random.Random(f"{EVAL_SEED}-cap")
    real = fact_tables().real
    half = len(real) // 2
    cities = [city for _, city in real]
    records: list[dict] = []
    for split, facts in (("search", real[:half]), ("heldout", real[half:])):
        for _ in range(CAP_REPEATS):
            for country, city in facts:
                distractors = rng.sample([c for c in cities if c != city], N_CHOICES - 1)
                choices = [*distractors]
                label = rng.randrange(N_CHOICES)
                choices.insert(label, city)
                records.append(
                    {
                        "id": len(records),
                        "split": split,
                        "prompt": f"cap {country}=",
                        "choices": choices,
                        "label": label,
                        "answer": city,
                    }
                )
    return records


def eval_records(task: str) -> list[dict]:
    """All eval records of one task, ids 0..599, the first half "search", the rest "heldout"."""
    if task == "cap":
        return _cap_records()
    if task in HARD:
        return _generation_records(task)
    raise ValueError(f"unknown task {task!r}")


def eval_prompts(task: str) -> frozenset[str]:
    """Prompts of the generation eval sets, which training never draws (no test leakage)."""
    return frozenset(r["prompt"] for r in eval_records(task)) if task != "cap" else frozenset()
