"""The offline token-set baseline: explanation = the tokens that carry the shown records' activation mass, each
with its mean normalised activation; simulation = look the token up. Deterministic, no model, no network — for CI,
sweeps, quick looks, and as the floor every LLM explanation should beat."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Sequence

import numpy as np

from crate.interp.backends.base import Backend, Explainer, Simulation, Simulator
from crate.interp.prompts import MalformedOutput, normalize
from crate.interp.records import Excerpt

PREFIX = "tokens "  # explanations read `tokens [["ing", 9.5], [" the", 3.0]]`


class TokenSetExplainer(Explainer):
    model_name = "token-set"

    def __init__(self, size: int = 5):
        self.size = size

    def explain(self, excerpts: Sequence[Excerpt], seed: int = 0) -> str:
        mass: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        for excerpt, values in zip(excerpts, normalize([e.activations for e in excerpts])):
            for token, value in zip(excerpt.tokens, values):
                mass[token] += float(value)
                count[token] += 1
        tokens = sorted((t for t in mass if mass[t] > 0), key=lambda t: (-mass[t], t))[:self.size]
        return PREFIX + json.dumps([[t, round(mass[t] / count[t], 2)] for t in tokens], ensure_ascii=False)


def parse_token_set(explanation: str) -> dict[str, float]:
    if not explanation.startswith(PREFIX):
        raise MalformedOutput(f"not a token-set explanation: {explanation[:60]!r}")
    try:
        return {str(token): float(weight) for token, weight in json.loads(explanation[len(PREFIX):])}
    except (ValueError, TypeError) as error:
        raise MalformedOutput(f"unreadable token set ({error}): {explanation[:60]!r}") from None


class TokenMatchSimulator(Simulator):
    model_name = "token-set"
    kind = "token-match"

    def simulate(self, explanation: str, excerpts: Sequence[Excerpt]) -> Simulation:
        weights = parse_token_set(explanation)
        return Simulation([np.array([weights.get(t, 0.0) for t in e.tokens]) for e in excerpts])


def build(config, seed: int = 0) -> Backend:
    return Backend("tokenset", TokenSetExplainer(config.tokenset_size), TokenMatchSimulator())
