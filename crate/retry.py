"""The one retry policy for remote calls (corpus listing and reads, HTTP model servers).

    policy = RetryPolicy(attempts=6, backoff_s=1.0, backoff_max_s=60.0, deadline_s=180.0)
    value = policy.call(lambda remaining_s: fetch(timeout=remaining_s), "reading shard 7", rng)

An attempt that may succeed when tried again raises `TryAgain` (with the least wait the other side asked for, e.g. a
`Retry-After` header); anything else it raises is final and passes through. Attempt n waits a uniform random time
in [0, min(backoff_max_s, backoff_s * 2**(n-1))] before the next ("full jitter": clients that failed together do
not come back together), at least what the other side asked for. The attempts stop at `attempts`, or when the
next wait would end past `deadline_s` (all attempts and waits together): then `GaveUp` says why.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class TryAgain(Exception):
    """Raised by an attempt that failed in a way another attempt may not: `problem` says what happened."""

    def __init__(self, problem: str, at_least_s: float = 0.0):
        super().__init__(problem)
        self.problem, self.at_least_s = problem, at_least_s


class GaveUp(RuntimeError):
    """Every attempt failed (`attempts` of them), or the deadline came first (`deadline`); `problem` is the last."""

    def __init__(self, what: str, problem: str, attempts: int, deadline: bool):
        self.what, self.problem, self.attempts, self.deadline = what, problem, attempts, deadline
        why = "the deadline was reached" if deadline else "no attempt left"
        super().__init__(f"{what}: {problem} ({why} after {attempts} attempts)")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # tries in all, >= 1
    backoff_s: float  # the ceiling of the first wait; it doubles per attempt
    backoff_max_s: float = math.inf  # ... up to this
    deadline_s: float | None = None  # all attempts and waits together (None: no bound)
    log_level: int = logging.WARNING  # of the line each retry logs

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"a retry policy needs attempts >= 1 and 0 <= backoff_s <= backoff_max_s: {self}")

    def wait_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt `attempt` (1-based): full jitter under the doubling ceiling."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return ceiling * (rng or random).random()

    def call(self, attempt: Callable[[float | None], T], what: str, rng: random.Random | None = None,
             sleep: Callable[[float], None] = time.sleep) -> T:
        """`attempt(remaining_s)` until it returns; `remaining_s` is the time left before the deadline (None
        without one), for the attempt's own timeout. A seeded `rng` makes the waits reproducible."""
        deadline = time.monotonic() + self.deadline_s if self.deadline_s is not None else math.inf
        for n in range(1, self.attempts + 1):
            remaining = deadline - time.monotonic() if self.deadline_s is not None else None
            try:
                return attempt(remaining)
            except TryAgain as error:
                if n == self.attempts:
                    raise GaveUp(what, error.problem, n, deadline=False) from error
                wait = max(self.wait_s(n, rng), error.at_least_s)
                if time.monotonic() + wait >= deadline:
                    raise GaveUp(what, error.problem, n, deadline=True) from error
                log.log(self.log_level, "%s: %s; retry %d/%d in %.1fs", what, error.problem, n, self.attempts - 1,
                        wait)
                sleep(wait)
        raise AssertionError("unreachable")
