"""SAE training on a stream of activation batches, with Anthropic-style dead-feature resampling.

The paper's settings (§5, Conmy's `sae`): Adam(0.9, 0.999), lr 4e-4, α = 8e-5, 4×1024-token batches, a
2¹⁹-activation shuffle buffer, resampling at steps 10k/20k/50k/75k/100k. Resampling follows "Towards
Monosemanticity": score a sample of inputs by the SAE's loss, draw one input per dead feature with
probability ∝ loss², make the (centred, unit-norm) input that feature's atom, set its encoder row to the atom
times 0.2 × the mean encoder-row norm of the living features, zero its encoder bias, and reset its Adam
moments.

The core takes any iterator of (N, d_in) tensors, so it runs the same on a model's activation stream and on
synthetic data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from crate.config import Range
from crate.errors import ConfigError
from crate.sae.model import SAEConfig, SparseAutoencoder

log = logging.getLogger(__name__)


@dataclass
class SAETrainConfig:
    expansion: Annotated[int, Range(1)] = 16  # n_features = expansion · d_in
    l1_coefficient: Annotated[float, Range(0)] = 8e-5  # α
    lr: Annotated[float, Range(0, exclusive_low=True)] = 4e-4  # Adam's learning rate (the paper's)
    beta1: Annotated[float, Range(0, 1, exclusive_high=True)] = 0.9  # Adam's first-moment decay
    beta2: Annotated[float, Range(0, 1, exclusive_high=True)] = 0.999  # Adam's second-moment decay
    batch_size: Annotated[int, Range(1)] = 4096  # activations per step (the paper's 4 × 1024 tokens)
    steps: Annotated[int, Range(1)] = 100_000  # optimizer steps
    # + 100k in the paper, = its end
    resample_at: Annotated[list[int], Range(1)] = field(default_factory=lambda: [10_000, 20_000, 50_000, 75_000])
    dead_window: Annotated[int, Range(1)] = 5_000  # a feature that has not fired for this many steps is dead
    # activations scored to choose the resampled atoms (Anthropic: 819,200)
    resample_inputs: Annotated[int, Range(1)] = 2**17
    buffer_size: int = 2**19  # shuffle buffer, in activations (the paper's)
    log_every: Annotated[int, Range(1)] = 100  # steps between progress lines and MLflow points
    checkpoint_every: Annotated[int, Range(1)] = 2_000  # steps between resumable checkpoints in output_dir
    seed: int = 0  # the SAE's initialisation and the shuffle buffer

    def __post_init__(self) -> None:
        if self.buffer_size < 2 * self.batch_size:
            raise ConfigError("buffer_size", f"must hold at least two batches ({2 * self.batch_size}), "
                                             f"got {self.buffer_size}")


class SAETrainer:
    """One SAE with its optimizer and the per-feature record of when each last fired."""

    def __init__(self, config: SAETrainConfig, d_in: int, device: torch.device | str = "cpu"):
        self.config = config
        init = torch.Generator().manual_seed(config.seed)
        self.sae = SparseAutoencoder(SAEConfig(d_in, config.expansion, config.l1_coefficient), init).to(device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
        self.step = 0
        self.steps_since_fired = torch.zeros(self.sae.config.n_features, dtype=torch.long, device=device)
        self.resampled = 0  # features resampled so far, in total
        self.generator = torch.Generator(device=device).manual_seed(config.seed)

    @property
    def device(self) -> torch.device:
        return self.sae.b_dec.device

    def train_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Adam step on a batch (N, d_in); returns per-batch sums for logging (tensors: no host sync)."""
        if self.step == 0:
            with torch.no_grad():  # start the bias at the data's centre so features explain variation
                self.sae.b_dec.copy_(x.mean(0))
        loss, terms = self.sae.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.project_out_parallel_grads()
        self.optimizer.step()
        self.sae.normalize_decoder()
        fired = (terms["features"] > 0).any(0)
        self.steps_since_fired = torch.where(fired, 0, self.steps_since_fired + 1)
        self.step += 1
        with torch.no_grad():
            return {"loss": loss.detach() * len(x), "squared_error": terms["squared_error"].sum(),
                    "variance": (x - x.mean(0)).pow(2).sum(), "l1": terms["l1"].sum(),
                    "l0": (terms["features"] > 0).sum(), "count": torch.tensor(len(x))}

    def dead_features(self) -> torch.Tensor:
        return self.steps_since_fired >= self.config.dead_window

    @torch.no_grad()
    def resample_dead(self, inputs: torch.Tensor) -> int:
        """Re-initialise the dead features from inputs the SAE reconstructs worst (see the module docstring)."""
        dead = self.dead_features()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        sae = self.sae
        x_hat, _ = sae(inputs)
        weights = (x_hat - inputs).pow(2).sum(-1).pow(2)  # ∝ loss²
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            weights = torch.ones_like(weights)
        picks = torch.multinomial(weights, n_dead, replacement=n_dead > len(inputs), generator=self.generator)
        centred = inputs[picks] - sae.b_dec
        atoms = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        encoder_norm = sae.W_enc[alive].norm(dim=-1).mean() if alive.any() else torch.tensor(1.0, device=self.device)
        sae.W_dec[dead] = atoms
        sae.W_enc[dead] = atoms * 0.2 * encoder_norm
        sae.b_enc[dead] = 0.0
        for param in (sae.W_enc, sae.W_dec, sae.b_enc):
            state = self.optimizer.state.get(param, {})
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state:
                    state[moment][dead] = 0.0
        self.steps_since_fired[dead] = 0
        self.resampled += n_dead
        return n_dead

    def state_dict(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "steps_since_fired": self.steps_since_fired.cpu(), "resampled": self.resampled,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.steps_since_fired = state["steps_since_fired"].to(self.device)
        self.resampled = state["resampled"]
        self.generator.set_state(state["generator"])


def train_sae(trainer: SAETrainer, batches: Iterator[torch.Tensor],
              log_metrics: Callable[[dict[str, float], int], None] | None = None,
              on_checkpoint: Callable[[SAETrainer], None] | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Train until `config.steps` (continuing from `trainer.step`) or until the stream ends.

    Every `log_every` steps: loss, mse, fvu (Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the batch mean), L0, L1 and the dead
    fraction go to `log_metrics(metrics, step)` and the returned history. `on_checkpoint(trainer)` is
    called every `checkpoint_every` steps and at the end.
    """
    config = trainer.config
    resample_steps = {s for s in config.resample_at if s < config.steps}
    batches = iter(batches)
    history: list[dict[str, float]] = []
    window: dict[str, torch.Tensor] = {}
    bar = tqdm(total=config.steps, initial=trainer.step, desc="SAE", unit="step", disable=not progress,
               mininterval=2.0)
    while trainer.step < config.steps:
        if trainer.step in resample_steps:
            inputs = _take_rows(batches, config.resample_inputs)
            if inputs is None:
                break
            n = trainer.resample_dead(inputs.to(trainer.device, torch.float32))
            log.info("step %d: resampled %d dead features (%.1f%%)", trainer.step, n,
                     100 * n / trainer.sae.config.n_features)
        x = next(batches, None)
        if x is None:
            log.warning("the activation stream ended at step %d of %d", trainer.step, config.steps)
            break
        sums = trainer.train_step(x.to(trainer.device, torch.float32))
        window = {k: window.get(k, 0) + v for k, v in sums.items()}
        bar.update(1)
        if trainer.step % config.log_every == 0 or trainer.step == config.steps:
            metrics = _summarise(window, trainer)
            window = {}
            history.append({"step": trainer.step, **metrics})
            bar.set_postfix(fvu=f"{metrics['train/fvu']:.3f}", l0=f"{metrics['train/l0']:.1f}")
            if log_metrics is not None:
                log_metrics(metrics, trainer.step)
        if on_checkpoint is not None and trainer.step % config.checkpoint_every == 0:
            on_checkpoint(trainer)
    bar.close()
    if on_checkpoint is not None and trainer.step % config.checkpoint_every != 0:
        on_checkpoint(trainer)
    return history


def _summarise(window: dict[str, torch.Tensor], trainer: SAETrainer) -> dict[str, float]:
    count = float(window["count"])
    metrics = {
        "train/loss": float(window["loss"]) / count,
        "train/mse": float(window["squared_error"]) / (count * trainer.sae.config.d_in),
        "train/fvu": float(window["squared_error"]) / max(float(window["variance"]), 1e-12),
        "train/l0": float(window["l0"]) / count,
        "train/l1": float(window["l1"]) / count,
        "train/resampled_total": float(trainer.resampled),
    }
    if trainer.step >= trainer.config.dead_window:
        metrics["train/dead_fraction"] = float(trainer.dead_features().float().mean())
    return metrics


def _take_rows(batches: Iterator[torch.Tensor], n: int) -> torch.Tensor | None:
    rows, total = [], 0
    while total < n:
        x = next(batches, None)
        if x is None:
            break
        rows.append(x)
        total += len(x)
    return torch.cat(rows)[:n] if rows else None
