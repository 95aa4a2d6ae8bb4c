"""Prompts of the explain/simulate method of Bills et al. (2023), as the paper ran it (paper §5).

- Activations shown to a model are integers 0..10: floor(10 · relu(a) / max), max over the records shown
  together (`normalize`). Lines are `token<TAB>value`, records wrapped in <start> … <end>.
- The explainer sees few-shot neurons, then the target's records (repeated with zeros filtered out when fewer
  than 20% of the shown values are non-zero) and completes "…the main thing this neuron does is find".
- The all-at-once simulator sees few-shot explanations with their activations, then the target explanation and
  its tokens each followed by `<TAB>unknown`; the model's next-token distribution right after each tab, restricted
  to "0".."10", gives the expected activation of that token (`simulation_prompt` returns those character offsets).
- The logprob-free variant asks a chat model to write `token<TAB>value` lines (`parse_sampled_values`).

The few-shot neurons are our own (OpenAI's examples are not redistributed here); any change to the text below
must bump PROMPT_VERSION, which is part of every result's key (a golden-file test guards this).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PROMPT_VERSION = "crate-v1"
EXPLANATION_PREFIX = "the main thing this neuron does is find"
ZERO_FILTER_THRESHOLD = 0.2  # repeat the records without zeros when fewer than this fraction is non-zero
MAX_VALUE = 10
VALUE_STRINGS = tuple(str(v) for v in range(MAX_VALUE + 1))


class MalformedOutput(ValueError):
    """A model's output cannot be used (scored as failed with this reason, never raised out of a job)."""


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


EXPLANATION_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short document. "
    "Look at the parts of the document the neuron activates for and summarize in a single sentence what the neuron "
    "is looking for. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A neuron finding what "
    "it's looking for is represented by a non-zero activation value. The higher the activation value, the stronger "
    "the match."
)
SIMULATION_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short document. "
    "Look at an explanation of what the neuron does, and try to predict its activations on each token.\n\n"
    "The activation format is token<tab>activation, activations go from 0 to 10, \"unknown\" indicates an unknown "
    "activation. Most activations will be 0."
)
SAMPLED_SIMULATION_INSTRUCTIONS = (
    "Reply with one line per token of the document, in order: the token exactly as given, a tab, and an integer "
    "activation from 0 to 10. Write nothing else."
)


@dataclass(frozen=True)
class FewShotNeuron:
    tokens: tuple[str, ...]
    values: tuple[int, ...]  # already on the 0..10 scale
    explanation: str


FEW_SHOT = (
    FewShotNeuron((" The", " war", " ended", " in", " 1945", ",", " and", " by", " 1950", " the", " city", " had",
                   " been", " rebuilt", "."), (0, 0, 0, 0, 10, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0),
                  "years written as four-digit numbers"),
    FewShotNeuron(("    ", "return", " len", "(", "items", ")", " +", " count", "(", "x", "))", "\n"),
                  (0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 10, 0), "closing parentheses in code"),
    FewShotNeuron((" After", " the", " heavy", " rain", ",", " the", " river", " flooded", " the", " valley", "."),
                  (0, 0, 2, 7, 0, 0, 9, 8, 0, 3, 0), "words about water, rivers and floods"),
)


def normalize(activations: Sequence[np.ndarray]) -> list[np.ndarray]:
    """min(10, floor(10 · relu(a) / max)), max = the largest relu'd activation over all these records."""
    relu = [np.maximum(np.asarray(a, dtype=np.float64), 0.0) for a in activations]
    top = max((float(r.max()) for r in relu if r.size), default=0.0)
    if top <= 0:
        return [np.zeros(r.shape, dtype=np.int64) for r in relu]
    return [np.minimum(MAX_VALUE, np.floor(MAX_VALUE * r / top)).astype(np.int64) for r in relu]


def display_token(token: str) -> str:
    """Tokens are shown one per line, so their own tabs and newlines are written as escapes."""
    return token.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _lines(tokens: Sequence[str], values: Sequence[object]) -> str:
    return "".join(f"{display_token(t)}\t{v}\n" for t, v in zip(tokens, values))


def _activation_block(records: Sequence[tuple[Sequence[str], Sequence[int]]]) -> str:
    text = "".join(f"<start>\n{_lines(tokens, values)}<end>\n" for tokens, values in records)
    values = np.concatenate([np.asarray(v) for _, v in records]) if records else np.zeros(0)
    if values.size and np.count_nonzero(values) / values.size < ZERO_FILTER_THRESHOLD:
        text += "\nSame activations, but with all zeros filtered out:\n"
        for tokens, record_values in records:
            kept = [(t, v) for t, v in zip(tokens, record_values) if v]
            text += f"<start>\n{_lines([t for t, _ in kept], [v for _, v in kept])}<end>\n"
    return text


def _explanation_question(index: int, records: Sequence[tuple[Sequence[str], Sequence[int]]]) -> str:
    return f"Neuron {index}\nActivations:\n{_activation_block(records)}\n" \
           f"Explanation of neuron {index} behavior: {EXPLANATION_PREFIX}"


def explanation_prompt(excerpts: Sequence) -> list[Message]:
    """Chat messages asking for an explanation of the feature whose records are `excerpts` (records.Excerpt)."""
    messages = [Message("system", EXPLANATION_SYSTEM)]
    for i, example in enumerate(FEW_SHOT, start=1):
        messages.append(Message("user", _explanation_question(i, [(example.tokens, example.values)])))
        messages.append(Message("assistant", f" {example.explanation}."))
    values = normalize([e.activations for e in excerpts])
    messages.append(Message("user", _explanation_question(len(FEW_SHOT) + 1,
                                                          [(e.tokens, v) for e, v in zip(excerpts, values)])))
    return messages


def render_text(messages: Sequence[Message]) -> str:
    """One completion-style text: the system text, then every turn in order (the last user turn ends the text)."""
    parts = [m.content + ("\n\n" if m.role == "system" else "") for m in messages]
    return "".join(p if m.role != "assistant" else p + "\n\n" for m, p in zip(messages, parts))


def chat_turns(messages: Sequence[Message]) -> tuple[list[dict[str, str]], str]:
    """The explanation prompt for a chat template we render ourselves: EXPLANATION_PREFIX moves from the end of
    each user turn to the start of the assistant's answer, and the final answer is prefilled with it (returned
    separately), so an instruct model continues the sentence instead of restating it."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    for turn, following in zip(turns, turns[1:] + [None]):
        if turn["role"] == "user" and turn["content"].endswith(EXPLANATION_PREFIX):
            turn["content"] = turn["content"][:-len(EXPLANATION_PREFIX)].rstrip()
            if following is not None:
                following["content"] = EXPLANATION_PREFIX + following["content"]
    return turns, EXPLANATION_PREFIX


def parse_explanation(text: str) -> str:
    """The explanation a model wrote after EXPLANATION_PREFIX: its first line, without a final period."""
    line = text.strip().split("\n", 1)[0].strip()
    if line.lower().startswith(EXPLANATION_PREFIX):
        line = line[len(EXPLANATION_PREFIX):].strip()
    line = line.rstrip(".").strip()
    if not line:
        raise MalformedOutput(f"empty explanation (model output {text[:80]!r})")
    return line


def _simulation_example(index: int, explanation: str, tokens: Sequence[str], values: Sequence[object]) -> str:
    return (f"Neuron {index}\nExplanation of neuron {index} behavior: {EXPLANATION_PREFIX} {explanation}.\n"
            f"Activations:\n<start>\n{_lines(tokens, values)}<end>\n\n")


def simulation_prompt(explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """The all-at-once prompt, and for each token the character offset right after its tab: the model's
    distribution over the next token there is its belief about that token's activation."""
    text = SIMULATION_SYSTEM + "\n\n"
    for i, example in enumerate(FEW_SHOT, start=1):
        text += _simulation_example(i, example.explanation, example.tokens, example.values)
    index = len(FEW_SHOT) + 1
    text += f"Neuron {index}\nExplanation of neuron {index} behavior: {EXPLANATION_PREFIX} {explanation}.\n" \
            "Activations:\n<start>\n"
    offsets = []
    for token in tokens:
        text += f"{display_token(token)}\t"
        offsets.append(len(text))
        text += "unknown\n"
    return text + "<end>\n", offsets


def expected_values(probabilities: np.ndarray) -> np.ndarray:
    """(n, 11) unnormalised probabilities of "0".."10" -> expected value per row (0 where all are 0)."""
    total = probabilities.sum(axis=1)
    ev = probabilities @ np.arange(probabilities.shape[1], dtype=np.float64)
    return np.where(total > 0, ev / np.where(total > 0, total, 1.0), 0.0)


def sampled_simulation_prompt(explanation: str, tokens: Sequence[str]) -> list[Message]:
    """Chat messages for the logprob-free simulator: the model writes `token<TAB>value` lines."""
    messages = [Message("system", f"{SIMULATION_SYSTEM}\n\n{SAMPLED_SIMULATION_INSTRUCTIONS}")]
    for example in FEW_SHOT:
        messages.append(Message("user", _sampled_question(example.explanation, example.tokens)))
        messages.append(Message("assistant", _lines(example.tokens, example.values)))
    messages.append(Message("user", _sampled_question(explanation, tokens)))
    return messages


def _sampled_question(explanation: str, tokens: Sequence[str]) -> str:
    return (f"Explanation of the neuron's behavior: {EXPLANATION_PREFIX} {explanation}.\nDocument, one token per line:\n"
            "<start>\n" + "".join(f"{display_token(t)}\n" for t in tokens) + "<end>")


_SAMPLED_LINE = re.compile(r"^(.*)\t\s*([0-9]+(?:\.[0-9]+)?)\s*$")


def parse_sampled_values(text: str, tokens: Sequence[str]) -> np.ndarray | None:
    """Values of a sampled simulation, or None when the lines do not reproduce the tokens (then the whole
    excerpt counts as predicted zeros, as in OpenAI's logprob-free simulator). Values are clipped to 0..10."""
    lines = [line for line in text.replace("\r", "").split("\n") if "\t" in line]
    if len(lines) != len(tokens):
        return None
    values = []
    for line, token in zip(lines, tokens):
        match = _SAMPLED_LINE.match(line)
        if match is None or match.group(1).strip() != display_token(token).strip():
            return None
        values.append(min(MAX_VALUE, max(0.0, math.floor(float(match.group(2))))))
    return np.asarray(values, dtype=np.float64)
