"""The export job: a native checkpoint to a Hugging Face directory, and back.

    run_export(ExportConfig(checkpoint="runs/crate-2l/checkpoint_000010", to="hf", output="hf-crate-2l"))
    run_export(ExportConfig(checkpoint="hf-crate-2l", to="native", output="crate-2l.pt"))

`--to hf` writes `config.json`, `generation_config.json`, `model.safetensors` and (by default) GPT-2's
tokenizer files: a CRATE checkpoint as `crate-lm` (load it with `import crate.interop` then
`AutoModelForCausalLM.from_pretrained`), a GPT checkpoint as a stock GPT-2 (no crate import needed).
`--to native` writes one `crate.model.save_model` file from a CRATE-LM or GPT-2 directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from crate.errors import ConfigError
from crate.interop.hf import from_hf, hf_tokenizer, to_hf
from crate.model import load_model, save_model

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    # --to hf: a training checkpoint directory (its model.pt), a save_model file or the paper's released layout;
    # --to native: a Hugging Face directory (CRATE-LM or GPT-2)
    checkpoint: str = ""
    to: Literal["hf", "native"] = "hf"  # hf: a Hugging Face directory; native: a model file
    output: str = ""  # --to hf: the directory to write; --to native: the model file to write
    tokenizer: bool = True  # --to hf: save GPT-2's tokenizer with the model (needs encoder.json + vocab.bpe)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint", "a checkpoint to convert is required (--checkpoint PATH)")
        if not self.output:
            raise ConfigError("output", "where to write the converted model is required (--output PATH)")
        source = Path(self.checkpoint)
        if self.to == "native" and not (source / "config.json").is_file():
            raise ConfigError("checkpoint", f"--to native reads a Hugging Face directory; {source} has no config.json")
        if self.to == "hf" and "://" not in self.checkpoint and not native_file(source).is_file():
            raise ConfigError("checkpoint", f"no checkpoint file at {native_file(source)}")
        if Path(self.output).resolve() == source.resolve():
            raise ConfigError("output", "must differ from the checkpoint")


def native_file(path: Path) -> Path:
    """A checkpoint file as given, or a training checkpoint directory's model file."""
    if path.is_dir():
        from crate.train.checkpoint import MODEL_FILE  # the training package's file name

        return path / MODEL_FILE
    return path


def run_export(config: ExportConfig) -> Path:
    output = Path(config.output)
    if config.to == "native":
        model = from_hf(config.checkpoint)
        save_model(model, output, exported_from=str(config.checkpoint))
        log.info("wrote the native %s model %s", model.config.arch, output)
        return output
    remote = "://" in config.checkpoint  # a storage URI: load_model reads it through pyarrow
    model = load_model(config.checkpoint if remote else native_file(Path(config.checkpoint)))
    tokenizer = hf_tokenizer() if config.tokenizer else None  # fail on a missing vocabulary before writing
    hf = to_hf(model)
    hf.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.model_max_length = model.config.block_size
        tokenizer.save_pretrained(output)
    log.info("wrote %s (%s) to %s", type(hf).__name__, model.config.arch, output)
    return output
