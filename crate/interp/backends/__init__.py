"""Explain/simulate backends: `build_backend(BackendConfig)` -> Backend(explainer, simulator).

- tokenset: offline token-set baseline (no model, deterministic);
- http: any OpenAI-compatible server (OpenAI legacy completions with echo+logprobs, vLLM prompt_logprobs, or a
  chat-only endpoint with the logprob-free simulator);
- hf: in-process Hugging Face causal LMs from local files (optionally 4-bit, or a GGUF file).
"""

from crate.interp.backends.base import (BACKENDS, Backend, BackendError, CallCounter, Explainer, Simulation, Simulator,
                                        build_backend)

__all__ = ["BACKENDS", "Backend", "BackendError", "CallCounter", "Explainer", "Simulation", "Simulator", "build_backend"]
