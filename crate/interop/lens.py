"""The exported GPT baseline (or any local GPT-2-shaped Hugging Face directory) as TransformerLens's
`HookedTransformer`, offline. Needs the `interop` extra (`transformer-lens`).

TransformerLens 3.x's `HookedTransformer.from_pretrained` accepts only its list of official hub names, but its
loaders read a local directory; `hooked_transformer` runs the same steps as `from_pretrained` on one:

    lens = hooked_transformer("hf-gpt/")             # config, weights and tokenizer from the directory
    logits, cache = lens.run_with_cache(tokens)      # cache["blocks.0.mlp.hook_post"]: the baseline's neurons
"""

from __future__ import annotations

import os
from pathlib import Path

from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as loading
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase


def hooked_transformer(path: str | os.PathLike, hf_model: PreTrainedModel | None = None,
                       tokenizer: PreTrainedTokenizerBase | None = None, fold_ln: bool = True,
                       center_writing_weights: bool = True, center_unembed: bool = True,
                       device: str = "cpu") -> HookedTransformer:
    """A HookedTransformer from a local GPT-2 directory (`jobs/export.py --to hf` of a GPT checkpoint).

    `hf_model` / `tokenizer` default to the ones saved in `path`. The processing flags are TransformerLens's
    (folding LayerNorm and centring change logits only by a per-position constant); all False keeps the logits
    equal to the native model's."""
    path = str(Path(path).resolve())
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model at {path} (config.json missing)")
    cfg = loading.get_pretrained_model_config(path, fold_ln=fold_ln, device=device)
    hf_model = hf_model if hf_model is not None else GPT2LMHeadModel.from_pretrained(path)
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    state = loading.get_pretrained_state_dict(path, cfg, hf_model)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                      center_unembed=center_unembed)
    model.move_model_modules_to_device()
    return model
