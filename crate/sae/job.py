"""`jobs/train_sae.py`: train an SAE on one layer's neurons (or any other hook point, `site`) of a CRATE or GPT
checkpoint, evaluate it inside the model, save it as one file and track it all in MLflow.

Output directory (`output_dir`, default `sae-<checkpoint>-layer<L>`):
    sae.pt                the SAE (crate.sae.load_sae; `--features sae:PATH` for the interpretability job)
    train_state.pt        SAE + Adam + step + data-stream position, every `sae.checkpoint_every` steps: a
                          rerun with the same output_dir resumes there (activations that were still in the
                          shuffle buffer are not replayed: the stream continues with the next unread block)
    mlflow_runs.json      the run a resumed job keeps logging to (crate.tracking.job; older folders: mlflow_run_id)
    metrics.json          the evaluation (reconstruction, L0, dead fraction, loss recovered)
    feature_density.png   histogram of log10 feature firing frequency on the evaluation tokens
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from crate.data.config import DataConfig
from crate.config import Range
from crate.errors import ConfigError
from crate.plots import pyplot, save
from crate.model.checkpoint import load_data
from crate.model.hooks import LAYER, NEURONS
from crate.sae.activations import LayerActivations, shuffled_batches
from crate.sae.evaluate import SAEEvaluation, evaluate_sae
from crate.sae.model import SAESource, save_sae
from crate.sae.train import SAETrainConfig, SAETrainer, train_sae
from crate.files import replacing, write_atomic
from crate.tracking import TrackingConfig, resolve_locations
from crate.tracking.job import TrackedJob

log = logging.getLogger(__name__)


@dataclass
class TrainSAEConfig:
    checkpoint: str = ""  # the model whose neurons the SAE encodes
    layer: Annotated[int | None, Range(0)] = None  # the layer whose site the SAE encodes; required
    site: str = NEURONS  # the hook point it encodes, {l} = layer (e.g. blocks.{l}.hook_resid_post; docs/model.md)
    sae: SAETrainConfig = field(default_factory=SAETrainConfig)  # the SAE and its training (the paper's §5)
    data: DataConfig = field(default_factory=lambda: DataConfig(engine="local"))  # train: activation stream, val: evaluation
    blocks_per_forward: Annotated[int, Range(1)] = 4  # token blocks per model forward pass
    eval_blocks: Annotated[int, Range(1)] = 64  # held-out blocks (data.val) for the evaluation
    output_dir: str | None = None  # default: sae-<checkpoint stem>-layer<L>
    device: str = "auto"  # auto: cuda when available
    resume: bool = True  # continue from output_dir/train_state.pt when it exists
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the MLflow run

    @classmethod
    def defaults_for(cls, raw: dict) -> dict:
        """Config-loader hook: read the corpus in this process unless `data.engine` says otherwise (one consumer)."""
        return {"data": {"engine": "local"}}

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint", "a model checkpoint is required (--checkpoint PATH)")
        if self.layer is None:
            raise ConfigError("layer", "the layer whose neurons to encode is required (--layer L)")
        if self.site.count(LAYER) != 1 or not self.site.startswith("blocks."):
            raise ConfigError("site", f"{self.site!r}: a hook point of a block with {LAYER} for its index, e.g. "
                                      f"blocks.{LAYER}.hook_resid_post (docs/model.md)")

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"sae-{Path(self.checkpoint).stem}-layer{self.layer}")


def run_sae_training(config: TrainSAEConfig) -> tuple[Path, SAEEvaluation]:
    """Train (or resume), evaluate, save; returns the SAE file and its evaluation."""
    config = resolve_locations(config)
    from crate.data import check_sources, train_batches, val_batches
    from crate.model import load_checkpoint, resolve_device
    from crate.model.checkpoint import is_storage_uri

    if not is_storage_uri(config.checkpoint) and not Path(config.checkpoint).is_file():
        raise ConfigError("checkpoint", f"no model checkpoint at {config.checkpoint}")
    check_sources(config.data)  # both corpora exist and open, before the model loads
    model, metadata = load_checkpoint(config.checkpoint)
    model = model.to(resolve_device(config.device)).eval().requires_grad_(False)
    if config.layer >= model.config.n_layer:
        raise ConfigError("layer", f"the model has {model.config.n_layer} layers (0..{model.config.n_layer - 1})")
    if config.data.context > model.config.block_size:
        raise ConfigError("data.context", f"{config.data.context} exceeds the model's context "
                                          f"({model.config.block_size}); set data.context={model.config.block_size}")
    try:
        width = LayerActivations(model, config.layer, (), config.site).width
    except ValueError as error:
        raise ConfigError("site", str(error)) from None
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    source = _source(config, model, metadata)
    device = next(model.parameters()).device

    trainer = SAETrainer(config.sae, width, device)
    state_path = out / "train_state.pt"
    position = {"data": None}  # the stream position after the last batch read into the shuffle buffer
    if config.resume and state_path.is_file():
        state = load_data(state_path, map_location=device)
        trainer.load_state_dict(state["trainer"])
        position["data"] = state["data"]
        log.info("resuming %s at step %d", out, trainer.step)
    job = TrackedJob(config.tracking, "train_sae", f"sae-{out.name}", config=config,
                     params=_params(config, model, width), tags=_tags(source), location=out, resume=bool(trainer.step),
                     legacy_run_id=_legacy_run_id(out))
    with job:
        stream = train_batches(config.data, config.blocks_per_forward, rank=0, world_size=1, state=position["data"])

        def inputs():
            for batch in stream:
                position["data"] = batch.state
                yield batch.tokens[:, :-1]

        shuffle = torch.Generator().manual_seed(config.sae.seed + trainer.step)  # a resumed run reshuffles anew
        batches = shuffled_batches(LayerActivations(model, config.layer, inputs(), config.site), config.sae.buffer_size,
                                   config.sae.batch_size, shuffle)

        def save_state(t: SAETrainer) -> None:
            with replacing(state_path) as tmp:
                torch.save({"trainer": t.state_dict(), "data": position["data"]}, tmp)

        train_sae(trainer, batches, log_metrics=job.tracker.log_metrics, on_checkpoint=save_state)
        stream.close()
        held_out = (batch.tokens for batch in val_batches(config.data, config.blocks_per_forward, 0, 1,
                                                          config.eval_blocks))
        evaluation = evaluate_sae(model, config.layer, trainer.sae, held_out, config.site)
        metrics = evaluation.metrics()
        job.tracker.log_metrics(metrics, step=trainer.step)
        sae_path = save_sae(trainer.sae, out / "sae.pt", source, metrics=metrics,
                            training={**dataclasses.asdict(config.sae), "steps_done": trainer.step,
                                      "mlflow_run_id": job.run_id})
        write_atomic(out / "metrics.json", json.dumps({"step": trainer.step, **metrics}, indent=1))
        plot = _plot_density(evaluation, out / "feature_density.png", f"{out.name} (step {trainer.step})")
        for path in (out / "metrics.json", plot):
            job.tracker.log_artifact(path)
        job.tracker.set_tags({"crate.sae_checkpoint": str(sae_path.resolve())})
    return sae_path, evaluation


def describe_sae(sae_path: Path, evaluation: SAEEvaluation) -> str:
    """The one line the job prints: the file and its evaluation."""
    e = evaluation
    return (f"SAE {sae_path}: fvu {e.fvu:.3f}, L0 {e.l0:.1f}, dead {e.dead_fraction:.1%}, loss recovered "
            f"{e.loss_recovered:.1%} (clean {e.loss_clean:.3f}, spliced {e.loss_spliced:.3f}, zero-ablated "
            f"{e.loss_zero_ablated:.3f})")


def _source(config: TrainSAEConfig, model, metadata: dict) -> SAESource:
    from crate.model.checkpoint import is_storage_uri

    checkpoint = config.checkpoint if is_storage_uri(config.checkpoint) else str(Path(config.checkpoint).resolve())
    return SAESource(checkpoint=checkpoint, arch=model.config.arch, layer=config.layer, site=config.site,
                     model_run_id=metadata.get("mlflow_run_id"), corpus=config.data.train,
                     extra={"preset": model.config.preset, "n_layer": model.config.n_layer,
                            "step": metadata.get("step")})


def _params(config: TrainSAEConfig, model, width: int) -> dict:
    return {"model.arch": model.config.arch, "model.n_layer": model.config.n_layer,
            "model.n_neurons": model.config.n_neurons, "sae.d_in": width, "sae.n_features": config.sae.expansion * width}


def _tags(source: SAESource) -> dict[str, str]:
    tags = {"crate.arch": source.arch, "crate.layer": str(source.layer), "crate.site": source.site}
    if source.model_run_id:
        tags["crate.model_run_id"] = str(source.model_run_id)
    return tags


def _legacy_run_id(out: Path) -> str | None:
    """The run id an output folder written before `mlflow_runs.json` keeps in its `mlflow_run_id` file."""
    path = out / "mlflow_run_id"
    return path.read_text().strip() or None if path.is_file() else None


def _plot_density(evaluation: SAEEvaluation, path: Path, title: str) -> Path:
    plt = pyplot()

    density = evaluation.feature_density
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        ax.hist(np.log10(alive), bins=50)
    ax.set(xlabel="log10 firing frequency (alive features)", ylabel="features",
           title=f"{title}: {(density == 0).mean():.1%} dead, L0 {evaluation.l0:.1f}")
    return save(fig, path)
