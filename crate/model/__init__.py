"""CRATE-LM and its GPT baseline in plain PyTorch (no Ray, DeepSpeed or MLflow here).

    from crate.model import build_model
    model = build_model("crate-12l", ista_sparsity=0.05)
    logits, loss = model(idx, targets)
"""

from crate.model.build import ARCHITECTURES, build_model, resolve_device
from crate.model.checkpoint import load_checkpoint, load_model, load_released, save_model, save_weights
from crate.model.config import PRESETS, ModelConfig, model_config
from crate.model.crate import CRATE
from crate.model.gpt import GPT
from crate.model.lm import LanguageModel

__all__ = [
    "ARCHITECTURES", "CRATE", "GPT", "LanguageModel", "ModelConfig", "PRESETS",
    "build_model", "load_checkpoint", "load_model", "load_released", "model_config", "resolve_device", "save_model",
    "save_weights",
]
