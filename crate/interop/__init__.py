"""Interoperability with the Hugging Face ecosystem (needs `transformers`; crate.model stays torch-only).

Importing this package registers CRATE-LM (`model_type="crate-lm"`) with `AutoConfig` and
`AutoModelForCausalLM`. See docs/interop.md.
"""

from crate.interop.hf import (CrateLMConfig, CrateLMForCausalLM, from_gpt2, from_hf, hf_tokenizer, to_gpt2,
                              to_hf)

__all__ = ["CrateLMConfig", "CrateLMForCausalLM", "from_gpt2", "from_hf", "hf_tokenizer", "to_gpt2", "to_hf"]
