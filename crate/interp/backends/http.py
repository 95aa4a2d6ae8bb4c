"""OpenAI-compatible HTTP backend (OpenAI, vLLM, llama.cpp server, ...).

Explanations: /chat/completions (or /completions with the rendered prompt). Simulation, by `simulation`:
- echo: legacy /completions with `echo: true, logprobs: k, max_tokens: 0` — the prompt's tokens come back with
  `text_offset` and `top_logprobs` (Bills et al.'s all-at-once simulator; vLLM supports it too);
- prompt_logprobs: vLLM's `prompt_logprobs: k` with `return_token_ids` (entries keyed by token id);
- sampled: chat-only endpoints, no logprobs: the model writes the values (rows say simulator_kind="sampled"); its
  prompt is crate-v1's in every prompt_format (neither release's scores used a logprob-free simulator).
k is the K of `BackendConfig.reading` ("top-K"; crate-paper top-5, openai top-15): a value is read from the digits
among a position's k most likely tokens (prompts.top_k_values), 0 when there are none. The "full" reading needs
every token's probability, which a server does not return (the config refuses it for http).
All excerpts of a feature go in one /completions request (`prompt` is a list).

Requests are retried on timeouts, connection errors, 429 and 5xx under the platform's one retry policy
(crate.retry: exponential backoff with full jitter, `Retry-After` honoured); other 4xx fail at once. One request, all attempts and waits together, ends by
`request_deadline_s`. A circuit breaker shared by the client's threads counts failed attempts in a row (timeouts,
connection errors, 5xx): at `breaker_failures` it opens and every call fails at once, without a request, for
`breaker_cooldown_s`; then one trial call goes through, and any answer from the server closes it again. The API key comes from the environment variable named in the
config and is only ever put in the Authorization header — never logged, never in an error or a result.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Sequence

import numpy as np
import requests

from crate.interp.backends.base import Backend, BackendError, CallCounter, Explainer, Simulation, Simulator, backend_label
from crate.interp.prompts import (MalformedOutput, Message, completion_text, expected_values, explanation_prompt,
                                  merged_system_turn, parse_explanation, parse_sampled_values, reading_top_k,
                                  sampled_simulation_prompt, simulation_prompt, top_k_values)
from crate.interp.records import Excerpt
from crate.retry import GaveUp, RetryPolicy, TryAgain

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 425, 429}


class CircuitBreaker:
    """Open after `failures` failed attempts in a row; while open, `check` raises; after `cooldown_s` one trial."""

    def __init__(self, failures: int, cooldown_s: float):
        self.failures, self.cooldown_s = failures, cooldown_s
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._open_until: float | None = None

    def check(self, path: str) -> None:
        with self._lock:
            if self._open_until is None:
                return
            now = time.monotonic()
            if now < self._open_until:
                raise BackendError(f"circuit open: {self._in_a_row} failed calls in a row; /{path} not sent "
                                   f"(next trial in {self._open_until - now:.0f}s)")
            self._open_until = now + self.cooldown_s  # this caller is the trial; the others keep failing fast

    def failed(self) -> bool:
        """Count a failed attempt; True when that opened the breaker."""
        with self._lock:
            self._in_a_row += 1
            if self._in_a_row >= self.failures:
                self._open_until = time.monotonic() + self.cooldown_s
                return True
            return False

    def answered(self) -> None:
        with self._lock:
            self._in_a_row, self._open_until = 0, None


class HTTPClient:
    def __init__(self, config, seed: int, calls: CallCounter):
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.calls = calls
        self.rng = random.Random(seed)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self.session = requests.Session()
        key = os.environ.get(config.api_key_env)
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:  # never show the session (and its headers)
        return f"HTTPClient({self.base_url})"

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        policy = RetryPolicy(c.max_attempts, c.backoff_s, c.backoff_max_s, c.request_deadline_s, logging.DEBUG)
        attempts = 0

        def attempt(remaining_s: float | None) -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            self.breaker.check(path)
            self.calls.add()
            timeout = min(c.request_timeout_s, remaining_s)
            try:
                response = self.session.post(f"{self.base_url}/{path}", json=payload, timeout=max(timeout, 1e-3))
            except (requests.Timeout, requests.ConnectionError) as error:
                self._backend_failed(path, type(error).__name__, attempts)
                raise TryAgain(type(error).__name__) from None
            if response.status_code >= 500:
                self._backend_failed(path, f"HTTP {response.status_code}", attempts)
            else:
                self.breaker.answered()
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise TryAgain("a response that is not JSON") from None
            if response.status_code in RETRYABLE_STATUS or response.status_code >= 500:
                raise TryAgain(f"HTTP {response.status_code}", _retry_after(response))
            raise BackendError(f"HTTP {response.status_code} from /{path}: {response.text[:200]}")

        try:
            return policy.call(attempt, f"/{path}", self.rng)
        except GaveUp as error:
            if error.deadline:
                raise BackendError(f"{error.problem} from /{path}: request_deadline_s ({c.request_deadline_s:g}s) "
                                   f"reached after {error.attempts} attempts") from None
            raise BackendError(f"{error.problem} from /{path} after {error.attempts} attempts") from None

    def _backend_failed(self, path: str, problem: str, attempt: int) -> None:
        """The server did not answer, or answered 5xx: counted by the breaker, which may open now."""
        if self.breaker.failed():
            raise BackendError(f"{problem} from /{path} (attempt {attempt}); circuit open after "
                               f"{self.config.breaker_failures} failed calls in a row")

    def close(self) -> None:
        self.session.close()


def _retry_after(response: requests.Response) -> float:
    try:
        return min(float(response.headers.get("Retry-After", 0)), 300.0)
    except ValueError:
        return 0.0


def _field(payload: Any, *path: Any) -> Any:
    """payload[path[0]][path[1]]…, or MalformedOutput naming what is missing."""
    node = payload
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise MalformedOutput(f"response has no {'.'.join(map(str, path))}") from None
    return node


def _choices_in_order(response: dict, n: int) -> list[dict]:
    choices = _field(response, "choices")
    if not isinstance(choices, list) or len(choices) != n:
        raise MalformedOutput(f"expected {n} choices, got {len(choices) if isinstance(choices, list) else choices!r}")
    return sorted(choices, key=lambda c: c.get("index", 0))


class HTTPExplainer(Explainer):
    def __init__(self, client: HTTPClient, config):
        self.client, self.config, self.model_name = client, config, config.explainer_model

    def explain(self, excerpts: Sequence[Excerpt], seed: int) -> str:
        c = self.config
        messages = explanation_prompt(excerpts, c.prompt_format)
        payload = {"model": self.model_name, "max_tokens": c.max_explanation_tokens, "temperature": c.temperature,
                   "top_p": c.top_p, "seed": seed}
        if c.explain_endpoint == "chat":
            turns = merged_system_turn(messages) if c.prompt_format == "fork" else _chat(messages)
            response = self.client.post("chat/completions", {**payload, "messages": turns})
            text = _field(response, "choices", 0, "message", "content")
        else:
            response = self.client.post("completions", {**payload, "prompt": completion_text(messages, c.prompt_format)})
            text = _field(response, "choices", 0, "text")
        if not isinstance(text, str):
            raise MalformedOutput(f"explanation is not text: {text!r}")
        return parse_explanation(text, c.prompt_format)

    def close(self) -> None:
        self.client.close()


def _chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class LogprobSimulator(Simulator):
    """All-at-once simulation from prompt logprobs (echo, or vLLM's prompt_logprobs)."""

    kind = "logprob-ev"

    def __init__(self, client: HTTPClient, config):
        self.client, self.config, self.model_name = client, config, config.simulator

    def simulate(self, explanation: str, excerpts: Sequence[Excerpt]) -> Simulation:
        prompts = [simulation_prompt(explanation, e.tokens, self.config.prompt_format) for e in excerpts]
        payload = {"model": self.model_name, "prompt": [text for text, _ in prompts], "temperature": 0.0}
        k = reading_top_k(self.config.reading)  # never None: BackendConfig refuses the full reading over HTTP
        if self.config.simulation == "echo":
            payload.update(max_tokens=0, echo=True, logprobs=k)
            parse = _echo_positions
        else:
            payload.update(max_tokens=1, prompt_logprobs=k, return_token_ids=True)
            parse = _prompt_logprob_positions
        choices = _choices_in_order(self.client.post("completions", payload), len(prompts))
        values, defaulted = [], 0
        for (text, offsets), choice in zip(prompts, choices):
            distributions = parse(choice, text)  # char offset -> {token text: logprob}
            probabilities = np.array([top_k_values(_best(distributions.get(offset) or {}, k)) for offset in offsets])
            defaulted += int((probabilities.sum(axis=1) == 0).sum())
            values.append(expected_values(probabilities))
        return Simulation(values, defaulted)


def _best(top: dict[str, float], k: int) -> list[tuple[str, float]]:
    """A position's k most likely tokens, best first (a server may return the sampled token beside its top k)."""
    entries = [(text, float(logprob)) for text, logprob in top.items() if logprob is not None]
    return sorted(entries, key=lambda e: -e[1])[:k]


def _echo_positions(choice: dict, text: str) -> dict[int, dict[str, float]]:
    logprobs = _field(choice, "logprobs")
    offsets, top = _field(logprobs, "text_offset"), _field(logprobs, "top_logprobs")
    if len(offsets) != len(top):
        raise MalformedOutput("text_offset and top_logprobs differ in length")
    return {int(o): t for o, t in zip(offsets, top) if isinstance(t, dict)}


def _prompt_logprob_positions(choice: dict, text: str) -> dict[int, dict[str, float]]:
    entries, ids = _field(choice, "prompt_logprobs"), choice.get("prompt_token_ids")
    if ids is None:
        raise MalformedOutput("the server returned no prompt_token_ids (needs vLLM's return_token_ids; "
                              "or use simulation=echo)")
    if len(entries) != len(ids):
        raise MalformedOutput("prompt_logprobs and prompt_token_ids differ in length")
    decoded = []
    for entry, token_id in zip(entries[1:], ids[1:]):
        actual = (entry or {}).get(str(token_id))
        if actual is None:
            raise MalformedOutput(f"prompt_logprobs lacks the prompt token {token_id}")
        decoded.append(actual.get("decoded_token", ""))
    offset = len(text) - sum(len(d) for d in decoded)  # where the second token starts
    if offset < 0:
        raise MalformedOutput("decoded prompt tokens are longer than the prompt")
    positions = {}
    for entry, piece in zip(entries[1:], decoded):
        positions[offset] = {e.get("decoded_token"): e.get("logprob") for e in entry.values()}
        offset += len(piece)
    return positions


class SampledSimulator(Simulator):
    """Logprob-free: a chat model writes `token<TAB>value` lines (one request per excerpt)."""

    kind = "sampled"

    def __init__(self, client: HTTPClient, config):
        self.client, self.config, self.model_name = client, config, config.simulator

    def simulate(self, explanation: str, excerpts: Sequence[Excerpt]) -> Simulation:
        values, defaulted = [], 0
        for excerpt in excerpts:
            payload = {"model": self.model_name, "temperature": 0.0, "max_tokens": 16 * len(excerpt.tokens) + 32,
                       "messages": _chat(sampled_simulation_prompt(explanation, excerpt.tokens))}
            text = _field(self.client.post("chat/completions", payload), "choices", 0, "message", "content")
            parsed = parse_sampled_values(text if isinstance(text, str) else "", excerpt.tokens)
            if parsed is None:
                defaulted += len(excerpt.tokens)
                parsed = np.zeros(len(excerpt.tokens))
            values.append(parsed)
        if defaulted == sum(len(e.tokens) for e in excerpts):
            raise MalformedOutput("no simulated excerpt reproduced its tokens")
        return Simulation(values, defaulted)


def build(config, seed: int = 0) -> Backend:
    calls = CallCounter()
    client = HTTPClient(config, seed, calls)
    sampled = config.simulation == "sampled"
    simulator = SampledSimulator(client, config) if sampled else LogprobSimulator(client, config)
    return Backend(backend_label("http", config.explainer_model, config.simulator, sampled),
                   HTTPExplainer(client, config), simulator, calls)
