"""In-process Hugging Face causal LMs, as the paper ran them (Mistral-7B-Instruct explains, Llama-2-7B simulates,
both 4-bit): local files only (`local_files_only=True`, nothing is downloaded), optionally a GGUF file
(transformers' `gguf_file=`, dequantised; needs the `gguf` package) or bitsandbytes 4-bit on CUDA.

The simulator reads the next-token distribution at each position right after a tab (`BackendConfig.reading`):
- "top-K" (crate-paper: top-5, the fork's `mimic_api_simulation`): the K highest logits there, each token decoded
  on its own (`tokenizer.decode([id])`); those whose text is one of "0".."10" are renormalised among themselves,
  and a position with none of them in its top K reads 0 (counted in `n_defaulted`). Which tokens count is the
  decoded text: for Llama-2 "10" is never one token and "▁5" decodes to "5", exactly as in the fork.
- "full": the whole softmax renormalised over the tokens "0".."10" as they are tokenized after a tab. At start it
  checks that each of "0".."9" is one token after a tab and that a token boundary follows the tab. When "10" is
  not one token (Llama-2 splits it), the scale is 0..9: "10" gets probability 0 and a warning says so.
Prompts follow `BackendConfig.prompt_format`; the fork's explainer turns merge the system text into the first user
turn with " " (its api_client.mimic_api_explanation), and the completion is handed on raw.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from crate.interp.backends.base import Backend, BackendError, CallCounter, Explainer, Simulation, Simulator, backend_label
from crate.interp.prompts import (VALUE_STRINGS, chat_turns, completion_text, expected_values, explanation_prompt,
                                  merged_system_turn, parse_explanation, reading_top_k, simulation_prompt, top_k_values)
from crate.interp.records import Excerpt
from crate.model import resolve_device

log = logging.getLogger(__name__)
SIMULATION_BATCH = 8  # prompts per forward pass


def _dtype(config, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


class HFModel:
    """A tokenizer + causal LM loaded from a local directory (or a GGUF file inside it). `lock` lets one call at a
    time use the model: a seeded generation owns the global RNG from its seed to its last token (reproducible per
    seed whatever `workers.concurrency` is), and only one call's activations and KV cache occupy the device."""

    def __init__(self, path: str, gguf_file: str | None, config, calls: CallCounter):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.lock = threading.Lock()

        if not Path(path).is_dir():
            raise BackendError(f"no local model directory at {path} (models are never downloaded)")
        self.name = Path(path).name + (f"/{gguf_file}" if gguf_file else "")
        self.device, self.calls = resolve_device(config.device), calls
        if gguf_file:
            _check_gguf_support(Path(path) / gguf_file)
        kwargs = {"local_files_only": True, **({"gguf_file": gguf_file} if gguf_file else {})}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_kwargs = {**kwargs, "dtype": _dtype(config, self.device)}
        if config.load_in_4bit:
            model_kwargs.update(quantization_config=_four_bit(self.device), device_map={"": self.device.index or 0})
        self.model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        if not config.load_in_4bit:
            self.model = self.model.to(self.device)
        self.model.eval()

    def encode(self, texts: list[str]):
        return self.tokenizer(texts, return_offsets_mapping=True, padding=True, return_tensors="pt")


def _check_gguf_support(path: Path) -> None:
    if not path.is_file():
        raise BackendError(f"no GGUF file at {path}")
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        raise BackendError("GGUF models need the gguf and accelerate packages: pip install 'crate-lm-platform[gguf]'") from None


def _four_bit(device: torch.device):
    if device.type != "cuda":
        raise BackendError("load_in_4bit needs CUDA (bitsandbytes)")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise BackendError("load_in_4bit needs the bitsandbytes package (pip install bitsandbytes)") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


class HFExplainer(Explainer):
    def __init__(self, lm: HFModel, config):
        self.lm, self.config, self.model_name = lm, config, lm.name

    def _prompt_text(self, messages) -> str:
        tokenizer, fmt = self.lm.tokenizer, self.config.prompt_format
        if not getattr(tokenizer, "chat_template", None):
            return completion_text(messages, fmt)
        if fmt == "fork":  # mimic_api_explanation: system text + " " + first user turn, no prefill
            return tokenizer.apply_chat_template(merged_system_turn(messages), tokenize=False, add_generation_prompt=True)
        turns, prefill = chat_turns(messages) if fmt == "crate-v1" else ([{"role": m.role, "content": m.content}
                                                                          for m in messages], "")
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates without a system role (Mistral): prepend it, as the paper did
            system, first, *rest = turns
            merged = [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return text + prefill

    @torch.no_grad()
    def explain(self, excerpts: Sequence[Excerpt], seed: int) -> str:
        c, lm = self.config, self.lm
        inputs = lm.tokenizer(self._prompt_text(explanation_prompt(excerpts, c.prompt_format)), return_tensors="pt",
                              add_special_tokens=not getattr(lm.tokenizer, "chat_template", None)).to(lm.device)
        lm.calls.add()
        with lm.lock:
            torch.manual_seed(seed)
            output = lm.model.generate(**inputs, max_new_tokens=c.max_explanation_tokens, do_sample=c.temperature > 0,
                                       temperature=c.temperature if c.temperature > 0 else None, top_p=c.top_p,
                                       pad_token_id=lm.tokenizer.pad_token_id)
        completion = lm.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return parse_explanation(completion, c.prompt_format)


class HFSimulator(Simulator):
    kind = "logprob-ev"

    def __init__(self, lm: HFModel, config):
        self.lm, self.model_name, self.config = lm, lm.name, config
        self.top_k = reading_top_k(config.reading)
        self.value_ids = self._value_token_ids() if self.top_k is None else None
        self.value_text = self._value_texts() if self.top_k is not None else None
        probe = "x\tunknown\n"
        if not any(start == 2 for start, _ in lm.tokenizer(probe, return_offsets_mapping=True)["offset_mapping"]):
            raise BackendError(f"{lm.name}: its tokenizer merges a tab with the following text, so the "
                               "all-at-once simulator has no position to read values from")

    def _value_texts(self) -> dict[int, str]:
        """Top-K reading: the ids whose text, decoded alone, is a value string (what the fork's dict keys by)."""
        tokenizer = self.lm.tokenizer
        texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
        values = {i: t for i, t in texts.items() if t in VALUE_STRINGS}
        counted = sorted(set(values.values()), key=int)
        log.info("%s: top-%d reading counts %d tokens as the values %s", self.lm.name, self.top_k, len(values),
                 ",".join(counted))
        if "10" not in counted:
            log.warning("%s: no token decodes to \"10\": simulated values use the scale 0..9 (as the paper's Llama-2)",
                        self.lm.name)
        return values

    def _value_token_ids(self) -> list[int | None]:
        """The token id of each value string right after a tab (None where the tokenizer splits it)."""
        ids = []
        for value in VALUE_STRINGS:
            encoded = self.lm.tokenizer(f"x\t{value}\n", return_offsets_mapping=True)
            match = [i for i, span in zip(encoded["input_ids"], encoded["offset_mapping"]) if tuple(span) == (2, 2 + len(value))]
            ids.append(match[0] if match else None)
        if any(i is None for i in ids[:10]):
            raise BackendError(f"{self.lm.name}: the digits 0-9 are not single tokens after a tab")
        if ids[10] is None:
            log.warning("%s splits \"10\" into several tokens: simulated values use the scale 0..9", self.lm.name)
        return ids

    @torch.no_grad()
    def simulate(self, explanation: str, excerpts: Sequence[Excerpt]) -> Simulation:
        prompts = [simulation_prompt(explanation, e.tokens, self.config.prompt_format) for e in excerpts]
        values, defaulted = [], 0
        for start in range(0, len(prompts), SIMULATION_BATCH):
            batch = prompts[start:start + SIMULATION_BATCH]
            for probabilities in self._value_probabilities(batch):
                defaulted += int((probabilities.sum(axis=1) == 0).sum())
                values.append(expected_values(probabilities))
        return Simulation(values, defaulted)

    def _value_probabilities(self, batch: list[tuple[str, list[int]]]) -> list[np.ndarray]:
        lm = self.lm
        encoded = lm.encode([text for text, _ in batch])
        spans = encoded.pop("offset_mapping")
        lm.calls.add()
        with lm.lock:
            hidden = lm.model.base_model(**encoded.to(lm.device)).last_hidden_state  # (B, L, d)
        rows, positions, slots = [], [], []
        for b, (_, offsets) in enumerate(batch):
            starts = {int(s): i for i, (s, e) in enumerate(spans[b].tolist()) if e > s}
            for q, offset in enumerate(offsets):
                token = starts.get(offset)
                if token:  # the distribution of the token starting at `offset` is read at the position before it
                    rows.append(b)
                    positions.append(token - 1)
                    slots.append((b, q))
        out = [np.zeros((len(offsets), len(VALUE_STRINGS))) for _, offsets in batch]
        if not rows:
            return out
        logits = lm.model.get_output_embeddings()(hidden[rows, positions]).float()
        if self.top_k is not None:  # the fork: topk of the logits, each token decoded alone
            best = torch.topk(logits, self.top_k, dim=-1)
            for (b, q), ids, scores in zip(slots, best.indices.tolist(), best.values.tolist()):
                out[b][q] = top_k_values([(self.value_text.get(i, ""), s) for i, s in zip(ids, scores)])
            return out
        probs = torch.softmax(logits, dim=-1).cpu().numpy()
        for (b, q), p in zip(slots, probs):
            out[b][q] = [p[i] if i is not None else 0.0 for i in self.value_ids]
        return out


def build(config, seed: int = 0) -> Backend:
    calls = CallCounter()
    explainer_lm = HFModel(config.explainer_model, config.explainer_gguf, config, calls)
    simulator_gguf = config.simulator_gguf if config.simulator_model else config.explainer_gguf
    same = config.simulator == config.explainer_model and simulator_gguf == config.explainer_gguf
    simulator_lm = explainer_lm if same else HFModel(config.simulator, simulator_gguf, config, calls)
    return Backend(backend_label("hf", explainer_lm.name, simulator_lm.name), HFExplainer(explainer_lm, config),
                   HFSimulator(simulator_lm, config), calls)
