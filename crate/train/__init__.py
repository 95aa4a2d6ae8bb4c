"""Pretraining: the per-worker loop (Ray Train or one plain process), engines, checkpoints, evaluation.

    from crate.train import PretrainConfig, launch
    result = launch(load_config(PretrainConfig, "crate-2l-pile"))
"""

from crate.train.config import OptimConfig, PretrainConfig, TrainConfig
from crate.train.launch import TrainingResult, launch

__all__ = ["OptimConfig", "PretrainConfig", "TrainConfig", "TrainingResult", "launch"]
