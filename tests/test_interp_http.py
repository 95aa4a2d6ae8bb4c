"""The HTTP backend end to end against a fake OpenAI-compatible server on loopback (real HTTP): echo+logprobs,
vLLM prompt_logprobs and the chat-only sampled simulator, plus 429s, timeouts, garbage and a key that never leaks."""

import json
import logging
import math
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from crate.interp.backends import build_backend
from crate.interp.config import BackendConfig
from crate.interp.protocols import metric_groups
from crate.interp.records import Excerpt, FeatureRecords
from crate.interp.scoring import score_task

SECRET = "sk-test-not-for-logs-31337"
TOKEN_PATTERN = re.compile(r"\t|\n|[^\t\n]+")
FIND = "the main thing this neuron does is find "
# A good request must answer within this on a loaded 2-core machine (a 0.4 s limit timed out good requests there
# and counted an extra attempt); an injected "timeout" sleeps past it.
TIMEOUT_S = 2.0


class FakeOpenAI:
    """An OpenAI-compatible server whose "model" is an oracle: it explains a neuron by its top token and simulates
    10 on tokens equal to the explanation, 0 elsewhere. `faults` are consumed one per request."""

    def __init__(self, latency_s: float = 0.0):
        self.faults: deque[str] = deque()
        self.latency_s = latency_s
        self.requests: list[tuple[str, str | None, dict]] = []
        self.vocab: dict[str, int] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, self.headers.get("Authorization"), payload))
                fault = fake.faults.popleft() if fake.faults else None
                time.sleep(fake.latency_s + (TIMEOUT_S + 1.0 if fault == "timeout" else 0.0))
                if fault in ("429", "500", "400"):
                    return self._send(int(fault), b'{"error": "injected"}', {"Retry-After": "0"})
                if fault == "garbage":
                    return self._send(200, b"<html>not json")
                if fault == "nochoices":
                    return self._send(200, b'{"id": "x"}')
                body = fake.chat(payload) if self.path.endswith("/chat/completions") else fake.completions(payload)
                self._send(200, json.dumps(body).encode())

            def _send(self, status, body, headers=None):
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- the oracle ---------------------------------------------------------------------------------------------
    @staticmethod
    def explanation_of(text: str) -> str:
        block = text[text.rindex("Activations:"):]
        lines = [line.split("\t") for line in block.split("\n") if "\t" in line]
        token, _ = max(lines, key=lambda pair: int(pair[1]))
        return f" the token <{token.strip()}>."

    @staticmethod
    def simulated(explanation: str, token: str) -> int:
        return 10 if f"<{token.strip()}>" in explanation else 0

    def chat(self, payload):
        text = payload["messages"][-1]["content"]
        if "Document, one token per line" in text:
            explanation = text[text.index(FIND) + len(FIND):text.index(".\nDocument")]
            tokens = text[text.rindex("<start>\n") + 8:text.rindex("\n<end>")].split("\n")
            content = "".join(f"{t}\t{self.simulated(explanation, t)}\n" for t in tokens)
        else:
            content = self.explanation_of(text)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    def completions(self, payload):
        prompts = payload["prompt"] if isinstance(payload["prompt"], list) else [payload["prompt"]]
        if not payload.get("echo") and "prompt_logprobs" not in payload:
            return {"choices": [{"index": 0, "text": self.explanation_of(prompts[0])}]}
        choices = [self.scored_prompt(i, text, payload) for i, text in enumerate(prompts)]
        return {"choices": choices[::-1]}  # out of order on purpose: clients must sort by index

    def scored_prompt(self, index, text, payload):
        explanation = text[text.rindex(FIND) + len(FIND):text.rindex(".\nActivations")]
        tokens = TOKEN_PATTERN.findall(text)
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
        tops = [None]
        for j in range(1, len(tokens)):
            if tokens[j - 1] == "\t":
                value = self.simulated(explanation, tokens[j - 2])
                other = 0 if value else 1
                tops.append({str(value): math.log(0.8), str(other): math.log(0.15), "unknown": math.log(0.05)})
            else:
                tops.append({tokens[j]: math.log(0.9)})
        if payload.get("echo"):
            return {"index": index, "text": text, "logprobs": {"tokens": tokens, "text_offset": offsets,
                                                                 "token_logprobs": [None] * len(tokens), "top_logprobs": tops}}
        ids = [self.vocab.setdefault(t, len(self.vocab)) for t in tokens]
        entries = [None] + [{str(self.vocab.setdefault(t, len(self.vocab))): {"logprob": lp, "rank": 1, "decoded_token": t}
                             for t, lp in {**top, tokens[j]: top.get(tokens[j], -9.0)}.items()}
                            for j, top in enumerate(tops[1:], start=1)]
        return {"index": index, "text": "", "prompt_logprobs": entries, "prompt_token_ids": ids}


@pytest.fixture(scope="module")
def server():
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture(autouse=True)
def reset(server, monkeypatch):
    server.faults.clear()
    server.requests.clear()
    monkeypatch.setenv("FAKE_OPENAI_KEY", SECRET)


def token_neuron(token: str = " cat") -> FeatureRecords:
    """A neuron that fires on `token` only; its records hold it at varying strengths."""
    rng = np.random.default_rng(0)
    vocabulary = [" the", " dog", " sat", " on", token]

    def excerpt(ref, with_token):
        tokens = [vocabulary[i] for i in rng.integers(0, 4, 12)]
        if with_token:
            tokens[rng.integers(0, 12)] = token
        activations = np.array([rng.uniform(2, 5) if t == token else 0.0 for t in tokens], dtype=np.float32)
        return Excerpt(ref, tuple(tokens), activations)

    return FeatureRecords(0, 5, top=[excerpt(f"top/{i}", True) for i in range(20)],
                          random=[excerpt(f"random/{i}", i % 3 == 0) for i in range(15)], top_focus=[0] * 20)


def backend_config(server, **overrides) -> BackendConfig:
    fields = dict(kind="http", explainer_model="fake-model", base_url=server.url, api_key_env="FAKE_OPENAI_KEY",
                  prompt_format="crate-v1", request_timeout_s=TIMEOUT_S, max_attempts=6, backoff_s=0.01, backoff_max_s=0.02)
    return BackendConfig(**{**fields, **overrides})


def score(server, protocol="crate-paper", metrics=("tar", "random"), **overrides) -> list[dict]:
    (group, wanted), = metric_groups(protocol, list(metrics), "rescore")
    backend = build_backend(backend_config(server, **overrides), seed=0)
    try:
        return score_task(group.task(token_neuron()), wanted, backend, seed=0)
    finally:
        backend.close()


@pytest.mark.parametrize("simulation", ["echo", "prompt_logprobs"])
def test_all_at_once_simulation_from_prompt_logprobs(server, simulation):
    rows = score(server, simulation=simulation)
    assert [(r["metric"], r["status"]) for r in rows] == [("tar", "scored"), ("random", "scored")]
    assert rows[0]["score"] > 0.95 and rows[0]["explanation"] == "the token <cat>" and rows[0]["simulator_kind"] == "logprob-ev"
    assert rows[0]["backend"] == "http:fake-model" and rows[0]["n_defaulted"] == 0
    paths = [path for path, _, _ in server.requests]
    assert paths == ["/v1/chat/completions", "/v1/completions"]  # one request explains, one simulates 10 excerpts
    payload = server.requests[1][2]
    assert len(payload["prompt"]) == 10
    if simulation == "echo":
        # crate-paper reads the top 5 (the fork's mimic_api_simulation)
        assert payload["echo"] is True and payload["max_tokens"] == 0 and payload["logprobs"] == 5
    else:
        assert payload["prompt_logprobs"] == 5 and payload["return_token_ids"] is True
    assert all(auth == f"Bearer {SECRET}" for _, auth, _ in server.requests)


def test_openai_protocol_and_completions_explainer(server):
    rows = score(server, protocol="openai", metrics=("tar", "top", "random"), explain_endpoint="completions")
    assert [r["metric"] for r in rows] == ["tar", "top", "random"] and rows[0]["score"] > 0.95
    assert server.requests[0][0] == "/v1/completions" and "prompt" in server.requests[0][2]


def test_chat_only_endpoints_get_the_labelled_logprob_free_simulator(server):
    rows = score(server, simulation="sampled")
    assert rows[0]["status"] == "scored" and rows[0]["score"] > 0.95
    assert rows[0]["simulator_kind"] == "sampled" and rows[0]["backend"] == "http:fake-model (sampled)"
    assert len(server.requests) == 11 and all(path.endswith("/chat/completions") for path, _, _ in server.requests)


def test_transient_failures_are_retried_with_backoff(server):
    server.faults.extend(["429", "timeout", "garbage", "500"])
    rows = score(server)
    assert rows[0]["status"] == "scored" and rows[0]["score"] > 0.95
    assert rows[0]["attempts"] == 6  # 4 failed + 2 good requests


def test_persistent_failures_and_unusable_output_become_failed_rows(server):
    server.faults.extend(["429"] * 3)
    rows = score(server, max_attempts=3)
    assert rows[0]["status"] == "failed" and rows[0]["reason"] == "HTTP 429 from /chat/completions after 3 attempts"
    assert math.isnan(rows[0]["score"]) and rows[0]["attempts"] == 3
    server.faults.extend(["400"])
    row = score(server)[0]
    assert row["status"] == "failed" and row["reason"].startswith("HTTP 400") and row["attempts"] == 1
    server.faults.extend([None, "nochoices"])
    row = score(server)[0]
    assert row["status"] == "failed" and row["reason"] == "response has no choices"


def test_the_api_key_is_never_logged_or_stored(server, caplog):
    caplog.set_level(logging.DEBUG)
    server.faults.extend(["429", "400"])
    rows = score(server)
    backend = build_backend(backend_config(server))
    assert rows[0]["status"] == "failed"
    assert SECRET not in caplog.text and SECRET not in json.dumps(rows, default=str)
    assert SECRET not in repr(backend.explainer.client) and SECRET not in repr(backend)
    backend.close()


def test_fork_format_sends_the_forks_explainer_turns_and_keeps_the_raw_completion(server):
    backend = build_backend(backend_config(server, prompt_format="fork"), seed=0)
    try:
        explanation = backend.explainer.explain(token_neuron().top[:5], seed=0)
    finally:
        backend.close()
    messages = server.requests[0][2]["messages"]
    assert messages[0]["role"] == "user" and messages[0]["content"].startswith("We're studying neurons")
    assert "the stronger the match. \n\nNeuron 1\nActivations:" in messages[0]["content"]  # system + " " + user
    assert messages[-1]["content"].endswith("Explanation of neuron 4 behavior: the main thing this neuron does is find")
    assert explanation == "the token <cat>."  # handed on raw (stripped), final period kept as the fork does
