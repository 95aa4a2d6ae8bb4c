"""One trial, as Ray Train V2 pairs Tune with Train: a Tune function that builds the trial's PretrainConfig and
launches a normal pretraining run (its own TorchTrainer; `TuneReportCallback` passes every training report up to
Tune), then scores the interpretability proxy on the final model and reports once more, marked completed.

A retried or resumed trial launches the same run name again, so Ray Train continues from its last checkpoint
and the pretraining loop reopens the trial's MLflow run.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from crate.logs import configure as configure_logging
from crate.data import read_blocks
from crate.model import load_checkpoint
from crate.sweep.config import ProxyConfig, trial_config
from crate.tracking import Tracker
from crate.train import PretrainConfig, TrainingResult, launch

log = logging.getLogger("crate.sweep")

COMPLETED = "trial/completed"  # in a trial's last result only when its training ran to the end
SWEEP_TAG = "crate.sweep.id"  # on the sweep's parent run and on every trial's run
TRIAL_TAG = "crate.sweep.trial"  # the Tune trial id, on the trial's run


@dataclass(frozen=True)
class TrialSetup:
    """What every trial receives from the sweep driver."""

    sweep_id: str
    name: str
    base: PretrainConfig  # every trial's config before its sampled fields (paths made absolute by the driver)
    parent_run_id: str | None
    proxy: ProxyConfig

    def run_name(self, trial_id: str) -> str:
        return f"{self.name}-{trial_id}"

    def config(self, params: Mapping[str, Any], trial_id: str) -> PretrainConfig:
        named = dataclasses.replace(self.base.train, run_name=self.run_name(trial_id))
        return trial_config(dataclasses.replace(self.base, train=named), params, f"trial {trial_id}")


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable (`params`: the sampled dotted fields)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    configure_logging()
    trial_id = tune.get_context().get_trial_id()
    cfg = setup.config(params, trial_id)
    result = launch(cfg, parent_run_id=setup.parent_run_id, tags={SWEEP_TAG: setup.sweep_id, TRIAL_TAG: trial_id},
                    callbacks=[TuneReportCallback()])
    objectives = score_proxy(result, cfg, setup.proxy) if setup.proxy.enabled else {}
    tune.report({**result.metrics, **objectives, COMPLETED: 1})


def score_proxy(result: TrainingResult, cfg: PretrainConfig, proxy: ProxyConfig) -> dict[str, float]:
    """The offline token-set TaR of a seeded neuron sample per layer, on the final model; also logged to the
    trial's MLflow run. A failure here is logged and leaves the objective out: the training is not lost."""
    try:
        from crate.interp import proxy_score

        model, metadata = load_checkpoint(result.model_file)  # a local path or a storage URI
        blocks = np.stack(list(read_blocks(cfg.data.val, cfg.data.context, proxy.blocks, cfg.data.text_field)))
        scores = proxy_score(model, blocks, neurons_per_layer=proxy.neurons_per_layer, seed=proxy.seed)
    except Exception:  # noqa: BLE001 - the proxy is an extra objective, never worth the trial
        log.exception("the interpretability proxy failed for %s; the trial's other results stand", result.run_name)
        return {}
    log.info("%s: proxy TaR %.2f (mean over layers, %d neurons per layer, %d blocks)", result.run_name,
             scores["proxy_tar/mean"], proxy.neurons_per_layer, len(blocks))
    run_id = metadata.get("mlflow_run_id")
    if run_id:
        tracker = Tracker.start(dataclasses.replace(cfg.tracking, system_metrics=False), result.run_name,
                                resume_run_id=run_id)
        tracker.log_metrics(scores, step=int(result.metrics.get("step", 0)))
        tracker.end("FINISHED")
    return scores

