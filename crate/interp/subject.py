"""The model whose activations we read: one of our checkpoints (CRATE, GPT, the paper's released layout) or any
local Hugging Face causal LM directory, behind one interface.

    subject = Subject.load("runs/crate-2l/checkpoint_00001000/model.pt")    # or "/models/gpt2" (config.json)
    acts = subject.model.read(tokens, ["blocks.1.ista.hook_dtx"])          # {name: (B, T, features)}

`SubjectModel.read` runs one forward pass with a hook on each named site and stops it as soon as every site has
fired, so the layers above the deepest site and the LM head never run. Sites of our models are their hook points
(`model.hook_dict`, docs/model.md); sites of a Hugging Face model are module paths (`model.named_modules()`), read
at the module's output. A Hugging Face model must read GPT-2 token ids, as the corpora and records here are: its
vocabulary holds GPT-2's 50257 tokens and, where the directory has a tokenizer, it encodes text as GPT-2 does.
Nothing is downloaded: the directory is loaded with `local_files_only`, without remote code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import torch
import torch.nn as nn

from crate.errors import CheckpointError, ConfigError
from crate.interp.sites import HF_NEURONS, NEURONS

# HF config entries that say where or with which library version a model was saved, not what it is.
_NOT_IDENTITY = {"transformers_version", "torch_dtype", "dtype"}
_PROBE_TEXT = "The cat sat on the mat.\n\tdef area(r): return 3.14 * r ** 2  # Ünïcödé, 日本語"


def model_sha256(model: nn.Module) -> str:
    """The model's identity by content: SHA-256 over its config and every tensor of its state dict (name, dtype,
    shape, bytes), so the same weights hash alike wherever and in whatever file layout (one file, shards,
    safetensors or pickle) they are stored. For a Hugging Face model the config is its `to_dict()` without the
    entries that only say how it was saved."""
    config = model.config
    if dataclasses.is_dataclass(config):
        described = dataclasses.asdict(config)
    else:
        described = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


class _AllSitesRead(Exception):
    """Raised by the hook of the last site to fire: the rest of the forward pass is not needed."""


class SubjectModel(nn.Module):
    """A causal LM read at named sites. `arch`, `n_layer`, `context` (tokens per forward) and `neurons` (the site
    template of its neurons, None where unknown) describe it; `read` and `width` read it."""

    arch: str
    n_layer: int
    context: int
    preset: str | None = None
    neurons: str | None

    def __init__(self, model: nn.Module, metadata: dict | None = None):
        super().__init__()
        self.inner = model
        self.metadata = dict(metadata or {})  # what its checkpoint file records (step, run); {} for others

    def hooked(self, name: str, fn) -> torch.utils.hooks.RemovableHandle:
        """Call `fn(output)` on every output of site `name`; a ConfigError on `features` when there is none."""
        raise NotImplementedError

    def run(self, tokens: torch.Tensor) -> None:
        """One forward pass over (B, T) token ids."""
        raise NotImplementedError

    @torch.no_grad()
    def read(self, tokens: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """{name: (B, T, features)} for each site in `names`, from one forward pass stopped once all have fired."""
        wanted, captured = set(names), {}

        def store(name):
            def hook(output):
                if not isinstance(output, torch.Tensor) or output.dim() < 3 or output.shape[:2] != tokens.shape:
                    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                    raise ConfigError("features", f"site {name} gives {shape}, not a (batch, tokens, ...) "
                                                  f"activation of {tuple(tokens.shape)} tokens; name a module whose "
                                                  f"output is one activation per token")
                captured[name] = output.detach().reshape(*tokens.shape, -1)
                if captured.keys() >= wanted:
                    raise _AllSitesRead

            return hook

        handles = []
        try:
            for name in dict.fromkeys(names):  # in the try: a site that does not exist removes the hooks already added
                handles.append(self.hooked(name, store(name)))
            self.run(tokens)
        except _AllSitesRead:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = wanted - captured.keys()
        if missing:
            raise ConfigError("features", f"sites {sorted(missing)} did not run in a forward pass of the {self.arch} model")
        return {name: captured[name] for name in names}

    def width(self, name: str) -> int:
        """Features at site `name` (a one-token forward pass)."""
        device = next(self.parameters()).device
        return self.read(torch.zeros(1, 1, dtype=torch.int64, device=device), [name])[name].shape[-1]


class NativeSubject(SubjectModel):
    """One of our LanguageModels; sites are its hook points (`model.hook_dict`), hooked as `model.hooks` does."""

    neurons = NEURONS

    def __init__(self, model: nn.Module, metadata: dict | None = None):
        super().__init__(model, metadata)
        c = model.config
        self.arch, self.n_layer, self.context, self.preset = c.arch, c.n_layer, c.block_size, c.preset

    def hooked(self, name: str, fn) -> torch.utils.hooks.RemovableHandle:
        point = self.inner.hook_dict.get(name)
        if point is None:
            first = [n for n in self.inner.hook_dict if n.startswith("blocks.0.")]
            raise ConfigError("features", f"the {self.arch} model has no hook point {name!r} (the names: docs/model.md, "
                                          f"model.hook_dict; those of its first block: {', '.join(first)})")
        return point.add_hook(lambda activation, hook: fn(activation))

    def run(self, tokens: torch.Tensor) -> None:
        self.inner(tokens)


class HFSubject(SubjectModel):
    """A Hugging Face causal LM; sites are module paths, read at the module's output (a forward hook)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        c = model.config
        self.arch = c.model_type
        self.n_layer, self.context = getattr(c, "num_hidden_layers", None), getattr(c, "max_position_embeddings", None)
        if not self.n_layer or not self.context:
            raise ConfigError("checkpoint", f"the {self.arch} model's config names no number of layers "
                                            f"(num_hidden_layers) or context length (max_position_embeddings)")
        self.neurons = HF_NEURONS.get(self.arch)

    def hooked(self, name: str, fn) -> torch.utils.hooks.RemovableHandle:
        try:
            module = self.inner.get_submodule(name)
        except AttributeError:
            first = [n for n, _ in self.inner.named_modules() if re.search(r"\.0\.", n)][:12]
            raise ConfigError("features", f"the {self.arch} model has no module {name!r} (modules of its first layer: "
                                          f"{', '.join(first)}, ...)") from None
        return module.register_forward_hook(lambda module, inputs, output: fn(output))

    def run(self, tokens: torch.Tensor) -> None:
        self.inner(input_ids=tokens, use_cache=False)


def subject_model(model: nn.Module) -> SubjectModel:
    """`model` as a SubjectModel: itself if it is one, our LanguageModel wrapped (no copy)."""
    return model if isinstance(model, SubjectModel) else NativeSubject(model)


def is_hf_directory(checkpoint: str) -> bool:
    return Path(checkpoint).is_dir() and (Path(checkpoint) / "config.json").is_file()


def load_hf_subject(directory: str) -> HFSubject:
    """A local Hugging Face causal LM in float32, checked to read GPT-2 token ids (ConfigError on `checkpoint`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from crate.tokenizer import N_VOCAB, gpt2_tokenizer

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if config.vocab_size < N_VOCAB:
            raise ConfigError("checkpoint", f"{directory}: a {config.vocab_size}-token vocabulary; the corpora and "
                                            f"records here are GPT-2 token ids ({N_VOCAB} tokens)")
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:  # no weights, an unknown model type, a damaged file
        raise ConfigError("checkpoint", f"{directory} does not load as a Hugging Face causal LM: "
                                        f"{str(error).splitlines()[0]}") from None
    if any((Path(directory) / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(directory, local_files_only=True).encode(_PROBE_TEXT)
        if list(theirs) != gpt2_tokenizer().encode(_PROBE_TEXT):
            raise ConfigError("checkpoint", f"{directory}'s tokenizer does not encode text as GPT-2 does; the "
                                            f"corpora and records here are GPT-2 token ids")
    return HFSubject(model.eval())


@dataclass
class Subject:
    """The model under study and where it came from. `model_id` is its name in tables and plots (`<run>@<step>`
    for platform checkpoints, `<file or directory name>-<sha12>` for others); `sha256` (model_sha256) is what it is."""

    model: SubjectModel
    checkpoint: str
    model_id: str
    sha256: str
    run_id: str | None
    step: int | None

    @classmethod
    def load(cls, checkpoint: str) -> "Subject":
        from crate.model.checkpoint import is_storage_uri

        model = load_subject_model(checkpoint)
        if not is_storage_uri(checkpoint):  # results name a local model by its absolute path
            checkpoint = str(Path(checkpoint).resolve())
        sha256 = model_sha256(model.inner)
        metadata = model.metadata  # empty for released and HF models
        run_id, step = metadata.get("mlflow_run_id"), metadata.get("step")
        trained_as = metadata.get("run_name") or run_id  # tables and plots label the model by its run name
        if trained_as and step is not None:
            model_id = f"{trained_as}@{step}"
        else:
            path = PurePosixPath(checkpoint)
            model_id = f"{path.name if is_hf_directory(checkpoint) else path.stem}-{sha256[:12]}"
        return cls(model, checkpoint, model_id, sha256, run_id, step)

    @property
    def folder(self) -> str:
        """The default output folder's name: the label and the content hash, in characters safe in a path."""
        label = re.sub(r"[^\w.@+-]", "_", self.model_id)
        return label if label.endswith(self.sha256[:12]) else f"{label}-{self.sha256[:12]}"

    @property
    def provenance(self) -> dict:
        m = self.model
        return {"checkpoint": self.checkpoint, "checkpoint_run_id": self.run_id, "checkpoint_step": self.step,
                "model": self.model_id, "model_sha256": self.sha256, "preset": m.preset, "arch": m.arch,
                "n_layer": m.n_layer}


def load_subject_model(checkpoint: str) -> SubjectModel:
    """One of our checkpoint files (a path or storage URI) or a local Hugging Face directory, as a SubjectModel;
    a ConfigError on `checkpoint` when it is neither."""
    from crate.model import load_checkpoint
    from crate.model.checkpoint import is_storage_uri

    if is_hf_directory(checkpoint):
        return load_hf_subject(checkpoint)
    if not is_storage_uri(checkpoint):
        if Path(checkpoint).is_dir():
            raise ConfigError("checkpoint", f"{checkpoint} is a directory without config.json: give a model file "
                                            f"or a Hugging Face model directory")
        if not Path(checkpoint).is_file():
            raise ConfigError("checkpoint", f"no checkpoint file at {checkpoint}")
    try:
        return NativeSubject(*load_checkpoint(checkpoint))
    except CheckpointError as error:  # a storage URI that does not open, a damaged or crafted file
        raise ConfigError("checkpoint", str(error)) from None
