"""Plain single-file checkpoints (config + fp32 weights), and the adapter for the paper's released layout.

Our parameter names are nanoGPT's, which the paper's code also uses, so the adapter only has to undo what
differs: CRATE's `prenorm_1/2` LayerNorm names, wrapper prefixes (`_orig_mod.` from torch.compile, `module.`
from DDP) and the causal-mask buffers of the non-flash attention path.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from crate.errors import CheckpointError, ConfigError
from crate.files import replacing
from crate.model.build import build_model
from crate.model.config import ModelConfig
from crate.model.lm import LanguageModel

FORMAT = "crate-lm-checkpoint"
VERSION = 1

# The released small models are d=128 with 4 heads, the 6/12-layer ones d=768 with 12 (paper's model table).
_RELEASED_HEADS_BY_WIDTH = {128: 4, 768: 12}


def save_model(model: LanguageModel, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write config + fp32 state dict (+ metadata such as step or MLflow run id) atomically to `path`."""
    return save_weights(model.config, model.state_dict(), path, **metadata)


def save_weights(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 **metadata: Any) -> Path:
    """The same file from a config and a state dict (e.g. gathered from ZeRO-3 shards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()}
    payload = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(config), "model": state,
               "metadata": metadata}
    with replacing(path) as tmp:  # never leave a half-written checkpoint under the final name
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw payload of a checkpoint file (ours or the released nanoGPT-style dict): a local path, or a
    storage URI (`s3://`, `gs://`, ... — where training jobs keep their checkpoints) read through pyarrow."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return load_data(io.BytesIO(_read_remote(str(path))), name=str(path))
    path = Path(str(path).removeprefix("file://"))
    if not path.is_file():
        raise CheckpointError("no checkpoint file there", field=str(path))
    return load_data(path)


def load_data(source: str | os.PathLike | io.BytesIO, name: str | None = None,
              map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` of data only — tensors, containers, numbers, strings — never code: a pickle that would
    construct anything else is refused, so a crafted file cannot run code on the machine that opens it.
    A refused, damaged or unreadable file is a CheckpointError naming it."""
    name = name or str(source)
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise CheckpointError(f"refused: it holds pickled objects, not only tensors and plain data (it names "
                                  f"{found.group(1)}, which loading would call)", field=name) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        raise CheckpointError(f"damaged ({detail.group(1) if detail else first_line(error)})", field=name) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"unreadable, truncated or not a torch file ({first_line(error)})", field=name) from None


def first_line(error: BaseException) -> str:
    return next(iter(str(error).splitlines()), "")


def _read_remote(uri: str) -> bytes:
    from pyarrow import fs  # lazily: local use needs torch alone

    try:
        filesystem, location = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(location) as stream:
            return stream.read()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot be read: {first_line(error)}", field=uri) from None


class LoadedCheckpoint(NamedTuple):
    model: LanguageModel
    metadata: dict[str, Any]  # what `save_model` was given (step, mlflow_run_id, run_name...); {} for released files


def load_checkpoint(path: str | os.PathLike, **overrides: Any) -> LoadedCheckpoint:
    """The model of one of our checkpoint files (or of a file in the paper's released layout) and its metadata."""
    payload = read_checkpoint(path)
    if payload.get("format") != FORMAT:
        return LoadedCheckpoint(load_released(payload, **overrides), {})
    model = build_model(ModelConfig(**payload["config"]), **overrides)
    model.load_state_dict(payload["model"])
    return LoadedCheckpoint(model, dict(payload.get("metadata", {})))


def load_model(path: str | os.PathLike, **overrides: Any) -> LanguageModel:
    """The model alone of `load_checkpoint`."""
    return load_checkpoint(path, **overrides).model


def load_released(source: str | os.PathLike | Mapping[str, Any], n_head: int | None = None, **overrides: Any) -> LanguageModel:
    """A model from the paper's released code layout: a nanoGPT checkpoint dict (`model`, `model_args`) or a
    bare state dict. The config is read from `model_args` where present, else inferred from tensor shapes."""
    payload = read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    state = payload["model"] if "model" in payload and isinstance(payload["model"], Mapping) else payload
    model_args = payload.get("model_args", {}) if state is not payload else {}
    state = _rename_released_keys(state)
    config = _infer_config(state, n_head or model_args.get("n_head"), overrides)
    model = build_model(config)
    model.load_state_dict(state)
    return model


def _rename_released_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^(_orig_mod\.|module\.)+", "", key)
        key = key.replace(".prenorm_1.", ".ln_1.").replace(".prenorm_2.", ".ln_2.")
        if re.search(r"\.attn\.bias$", key):  # causal mask buffer of the non-flash path
            continue
        renamed[key] = value
    if "lm_head.weight" not in renamed and "transformer.wte.weight" in renamed:
        renamed["lm_head.weight"] = renamed["transformer.wte.weight"]
    return renamed


def _infer_config(state: Mapping[str, torch.Tensor], n_head: int | None, overrides: dict[str, Any]) -> ModelConfig:
    try:
        vocab_size, n_embd = state["transformer.wte.weight"].shape
        block_size = state["transformer.wpe.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"not a CRATE/GPT state dict in the released layout: {missing} is missing") from None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    arch = "crate" if "transformer.h.0.ista.weight" in state else "gpt"
    if n_head is None:
        n_head = _RELEASED_HEADS_BY_WIDTH.get(n_embd)
        if n_head is None:
            known = ", ".join(f"{width} ({heads} heads)" for width, heads in _RELEASED_HEADS_BY_WIDTH.items())
            raise ConfigError("n_head", f"the head count of a width-{n_embd} model is not in its weights; give it "
                                        f"(load_model(path, n_head=...)); known widths: {known}")
    fields: dict[str, Any] = dict(arch=arch, n_layer=len(layers), n_head=n_head, n_embd=n_embd,
                                  block_size=block_size, vocab_size=vocab_size)
    if arch == "crate":
        fields["ista_overcomplete"] = state["transformer.h.0.ista.weight"].shape[0] // n_embd
    else:
        fields["bias"] = "transformer.h.0.ln_1.bias" in state
    return ModelConfig(**{**fields, **overrides})


def is_storage_uri(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (`s3://…`, `gs://…`, `file://…`) that `read_checkpoint` opens, not a local path."""
    return "://" in str(path)
