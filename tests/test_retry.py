"""The one retry policy (crate.retry) that corpus reads and HTTP model servers share: bounded attempts, full jitter
under a doubling ceiling, the other side's Retry-After as a floor, a deadline over everything, final errors at once."""

import random

import pytest

from crate.data.sources import MissingFile, Retry, SourceError
from crate.retry import GaveUp, RetryPolicy, TryAgain


def flaky(failures: int, at_least_s: float = 0.0):
    calls = []

    def attempt(remaining_s):
        calls.append(remaining_s)
        if len(calls) <= failures:
            raise TryAgain(f"failure {len(calls)}", at_least_s)
        return "ok"

    return attempt, calls


def test_waits_are_full_jitter_under_a_doubling_capped_ceiling_and_reproducible_with_a_seed():
    policy = RetryPolicy(attempts=6, backoff_s=1.0, backoff_max_s=4.0)
    waits = []
    attempt, calls = flaky(5)
    assert policy.call(attempt, "x", random.Random(0), sleep=waits.append) == "ok" and len(calls) == 6
    ceilings = [1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(0 <= w <= c for w, c in zip(waits, ceilings)) and len(set(waits)) == 5
    again = []
    policy.call(flaky(5)[0], "x", random.Random(0), sleep=again.append)
    assert again == waits
    samples = [policy.wait_s(3, random.Random(seed)) for seed in range(200)]
    assert max(samples) <= 4.0 and min(samples) < 0.5 and max(samples) > 3.5  # spread over [0, ceiling]


def test_the_other_sides_retry_after_is_a_floor():
    waits = []
    RetryPolicy(attempts=3, backoff_s=0.01).call(flaky(2, at_least_s=2.5)[0], "x", sleep=waits.append)
    assert waits == [2.5, 2.5]


def test_attempts_run_out_and_final_errors_pass_at_once():
    attempt, calls = flaky(10)
    with pytest.raises(GaveUp, match=r"x: failure 3 \(no attempt left after 3 attempts\)") as error:
        RetryPolicy(attempts=3, backoff_s=0.0).call(attempt, "x", sleep=lambda s: None)
    assert (error.value.attempts, error.value.deadline, len(calls)) == (3, False, 3)

    def final(_):
        calls.append(1)
        raise KeyError("not retried")

    calls.clear()
    with pytest.raises(KeyError):
        RetryPolicy(attempts=5, backoff_s=0.0).call(final, "x")
    assert len(calls) == 1


def test_a_deadline_bounds_attempts_and_waits_together_and_tells_the_attempt_what_is_left():
    attempt, calls = flaky(10, at_least_s=0.3)
    with pytest.raises(GaveUp, match="deadline") as error:
        RetryPolicy(attempts=100, backoff_s=0.0, deadline_s=1.0).call(attempt, "x")
    assert error.value.deadline and 3 <= error.value.attempts <= 4  # 0.3 s apart within 1 s
    assert all(0 < left <= 1.0 for left in calls) and calls == sorted(calls, reverse=True)


def test_corpus_reads_use_the_policy_and_never_retry_a_missing_file():
    tries = []

    def gone():
        tries.append(1)
        raise FileNotFoundError("x.jsonl")

    with pytest.raises(MissingFile):
        Retry(retries=5, backoff_s=0.0)(gone, "reading x.jsonl")
    assert len(tries) == 1

    def down():
        tries.append(1)
        raise ConnectionError("reset")

    tries.clear()
    with pytest.raises(SourceError, match=r"reading x.jsonl: ConnectionError: reset \(gave up after 3 attempts\)"):
        Retry(retries=2, backoff_s=0.0)(down, "reading x.jsonl")
    assert len(tries) == 3
