"""Crash-test hook: a process SIGKILLs itself on reaching a named step.

With `ENV=k` a process kills itself the first time it reaches `steps[k-1]`; with `ENV=k.n`, the
n-th time (a step a loop reaches once per item, e.g. once per trial). Unset, malformed or out of
range, the hook does nothing. The steps of each user are numbered in one place beside its code
(merge/writer.py's STEPS, search/study.py's KILL_STEPS), so a test can kill at every one.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Sequence

_reached: Counter[tuple[str, str]] = Counter()


def kill_point(env: str, steps: Sequence[str], step: str) -> None:
    at = os.environ.get(env)
    if not at:
        return
    k, _, n = at.partition(".")
    if not (k.isdigit() and 0 < int(k) <= len(steps) and (n == "" or n.isdigit())):
        return
    if steps[int(k) - 1] != step:
        return
    _reached[env, step] += 1
    if _reached[env, step] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
