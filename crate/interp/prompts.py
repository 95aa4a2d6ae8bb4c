"""Prompts of the explain/simulate method of Bills et al. (2023), in three formats (`BackendConfig.prompt_format`):

- "fork" and "openai": neuron_explainer's own text, character for character (golden-tested against prompts the
  released code renders, tests/fixtures/prompts/): TokenActivationPairExplainer's HARMONY_V4 messages and
  ExplanationNeuronSimulator's INSTRUCTION_FOLLOWING prompt with the ORIGINAL few-shot examples (vendored as data,
  few_shot_neuron_explainer.json), tokens written raw, the explanation prefix at the end of each user turn, the
  target's explanation followed by `<|endofprompt|>`, and the explainer's completion handed on raw (stripped, not
  cut to a line). The paper's fork renders exactly OpenAI's text; "fork" differs where its models met it: its
  explainer (api_client.mimic_api_explanation) merged the system message into the first user turn with " ".
- "crate-v1": this project's earlier format:
- Activations shown to a model are integers 0..10: floor(10 · relu(a) / max), max over the records shown
  together (`normalize`). Lines are `token<TAB>value`, records wrapped in <start> … <end>.
- The explainer sees few-shot neurons, then the target's records (repeated with zeros filtered out when fewer
  than 20% of the shown values are non-zero) and completes "…the main thing this neuron does is find".
- The all-at-once simulator sees few-shot explanations with their activations, then the target explanation and
  its tokens each followed by `<TAB>unknown`; the model's next-token distribution right after each tab, restricted
  to "0".."10", gives the expected activation of that token (`simulation_prompt` returns those character offsets).
- The logprob-free variant asks a chat model to write `token<TAB>value` lines (`parse_sampled_values`).

crate-v1's few-shot neurons are our own; any change to its text must bump PROMPT_VERSION. Every row records its
`prompt_format` and `prompt_version` (PROMPT_VERSIONS), part of the result key; golden-file tests guard all three.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

PROMPT_VERSION = "crate-v1"
PROMPT_FORMATS = ("fork", "openai", "crate-v1")
PROMPT_VERSIONS = {"fork": "fork@3d5027b", "openai": "neuron_explainer-0.0.1", "crate-v1": PROMPT_VERSION}
END_OF_PROMPT = "<|endofprompt|>"
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
    """min(10, floor(10 · relu(a) / max)), max = the largest relu'd activation over all these records; a NaN
    activation counts as 0 (as neuron_explainer's relu, `max(0.0, nan)`, makes it)."""
    relu = [np.nan_to_num(np.maximum(np.asarray(a, dtype=np.float64), 0.0), nan=0.0) for a in activations]
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


def explanation_prompt(excerpts: Sequence, prompt_format: str = "crate-v1") -> list[Message]:
    """Chat messages asking for an explanation of the feature whose records are `excerpts` (records.Excerpt)."""
    if prompt_format != "crate-v1":
        return _ne_explanation_prompt(excerpts)
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


def parse_explanation(text: str, prompt_format: str = "crate-v1") -> str:
    """The explanation a model wrote after EXPLANATION_PREFIX. crate-v1: its first line, without a final period;
    fork/openai: the whole completion, stripped (neuron_explainer hands the raw completion to the simulator, which
    strips it)."""
    if prompt_format != "crate-v1":
        if not text.strip():
            raise MalformedOutput(f"empty explanation (model output {text[:80]!r})")
        return text.strip()
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


def simulation_prompt(explanation: str, tokens: Sequence[str], prompt_format: str = "crate-v1") -> tuple[str, list[int]]:
    """The all-at-once prompt, and for each token the character offset right after its tab: the model's
    distribution over the next token there is its belief about that token's activation."""
    if prompt_format != "crate-v1":
        return _ne_simulation_prompt(explanation, tokens)
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


# -- the simulator's reading ---------------------------------------------------------------------------------------
def reading_top_k(reading: str) -> int | None:
    """K of a "top-K" reading, None for "full"; ConfigError naming `reading` for anything else."""
    from crate.errors import ConfigError

    match = re.fullmatch(r"top-([1-9][0-9]*)", reading)
    if reading != "full" and match is None:
        raise ConfigError("reading", f"must be full or top-K with K >= 1 (top-5: the paper's fork), got {reading!r}")
    return None if match is None else int(match.group(1))


def top_k_values(top: Sequence[tuple[str, float]]) -> np.ndarray:
    """Unnormalised probabilities of "0".."10" from a position's top next tokens (text, logprob or logit), best
    first: a token counts when its text is one of the value strings; a text seen twice keeps the later entry (the
    fork builds a dict from the decoded top 5). All 0 when no value token is among them (the position reads 0)."""
    by_text = {text: logprob for text, logprob in top if logprob is not None}
    return np.array([math.exp(by_text[v]) if v in by_text else 0.0 for v in VALUE_STRINGS])


# -- neuron_explainer's format ("fork", "openai") --------------------------------------------------------------------
NE_SIMULATION_SYSTEM = (
    "We're studying neurons in a neural network.\nEach neuron looks for some particular thing in a short document.\n"
    "Look at summary of what the neuron does, and try to predict how it will fire on each token.\n\n"
    "The activation format is token<tab>activation, activations go from 0 to 10, \"unknown\" indicates an unknown "
    "activation. Most activations will be 0.\n"
)
UNKNOWN = "unknown"


@dataclass(frozen=True)
class NeuronExample:
    explanation: str
    records: tuple[tuple[tuple[str, ...], np.ndarray], ...]  # (tokens, raw activations) per record
    first_revealed: tuple[int, ...]  # per record, the first token whose value the simulation prompt shows


@lru_cache(maxsize=1)
def neuron_explainer_examples() -> tuple[NeuronExample, ...]:
    """neuron_explainer's ORIGINAL few-shot examples (vendored data, source in the file)."""
    data = json.loads((Path(__file__).with_name("few_shot_neuron_explainer.json")).read_text())
    return tuple(NeuronExample(x["explanation"], tuple((tuple(r["tokens"]), np.asarray(r["activations"], dtype=np.float64))
                                                       for r in x["activation_records"]),
                               tuple(x["first_revealed_activation_indices"])) for x in data["examples"])


def _ne_records(records: Sequence[tuple[Sequence[str], Sequence[object]]]) -> str:
    """format_activation_records: records of `token<TAB>value` lines, each wrapped in <start> … <end>."""
    body = "\n<end>\n<start>\n".join("\n".join(f"{t}\t{v}" for t, v in zip(tokens, values)) for tokens, values in records)
    return f"\n<start>\n{body}\n<end>\n"


def _ne_explanation_question(index: int, records: Sequence[tuple[Sequence[str], np.ndarray]]) -> str:
    values = normalize([a for _, a in records])
    text = f"\n\nNeuron {index}\nActivations:{_ne_records([(t, v) for (t, _), v in zip(records, values)])}"
    shown = np.concatenate(values) if values else np.zeros(0)
    if shown.size and np.count_nonzero(shown) / shown.size < ZERO_FILTER_THRESHOLD:
        kept = [([t for t, x in zip(tokens, v) if x > 0], [x for x in v if x > 0]) for (tokens, _), v in zip(records, values)]
        text += f"\nSame activations, but with all zeros filtered out:{_ne_records(kept)}"
    return text + f"\nExplanation of neuron {index} behavior: {EXPLANATION_PREFIX}"


def _ne_explanation_prompt(excerpts: Sequence) -> list[Message]:
    messages = [Message("system", EXPLANATION_SYSTEM)]  # crate-v1 took neuron_explainer's explainer system text
    for i, example in enumerate(neuron_explainer_examples(), start=1):
        messages.append(Message("user", _ne_explanation_question(i, example.records)))
        messages.append(Message("assistant", f" {example.explanation}."))
    index = len(neuron_explainer_examples()) + 1
    messages.append(Message("user", _ne_explanation_question(index, [(e.tokens, e.activations) for e in excerpts])))
    return messages


def _ne_simulation_prompt(explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    text = NE_SIMULATION_SYSTEM
    for i, example in enumerate(neuron_explainer_examples(), start=1):
        values = normalize([a for _, a in example.records])
        shown = [(t, [UNKNOWN if j < first else int(x) for j, x in enumerate(v)])
                 for (t, _), v, first in zip(example.records, values, example.first_revealed)]
        text += f"\n\nNeuron {i}\nExplanation of neuron {i} behavior: {EXPLANATION_PREFIX} {example.explanation}"
        text += f"\nActivations: {_ne_records(shown)}\n"
    index = len(neuron_explainer_examples()) + 1
    text += (f"\n\nNeuron {index}\nExplanation of neuron {index} behavior: {EXPLANATION_PREFIX} "
             f"{explanation.strip()}{END_OF_PROMPT}\nActivations: \n<start>\n")
    offsets = []
    for i, token in enumerate(tokens):
        text += ("\n" if i else "") + f"{token}\t"
        offsets.append(len(text))
        text += UNKNOWN
    return text + "\n<end>\n", offsets


def completion_text(messages: Sequence[Message], prompt_format: str) -> str:
    """The explanation prompt as one completion text: crate-v1's `render_text`, or neuron_explainer's
    PromptFormat.NONE (the messages' contents joined)."""
    return render_text(messages) if prompt_format == "crate-v1" else "".join(m.content for m in messages)


def merged_system_turn(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The fork's explainer turns (api_client.mimic_api_explanation): the system text joined to the first user
    turn with one space."""
    system, first, *rest = messages
    return [{"role": first.role, "content": f"{system.content} {first.content}"},
            *({"role": m.role, "content": m.content} for m in rest)]
