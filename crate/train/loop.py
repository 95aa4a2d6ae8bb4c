"""The per-worker training loop.

Ray Train runs `train_worker` in every worker; `launcher: local` runs `run_training` in one plain process with
`LocalRuntime`. It is the same code either way: resume first, then optimizer steps of `grad_accum_steps`
micro-batches, with periodic logging, evaluation and checkpoints. Rank 0 alone talks to MLflow.

Every step the loss is averaged over the workers (so every rank decides alike): a non-finite loss, or
`train.max_skipped_steps` optimizer steps in a row that the engine skipped, stops the run with `TrainingDiverged`.
Under Ray Train, errors that a restart would only repeat (a diverged run, a config that does not match the
checkpoint, no checkpoint that verifies) end the job at once instead of being retried `max_failures` times: the
workers return the error instead of raising it, and the driver raises it (`raise_returned_error`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
import yaml

from crate.config import dump_yaml, from_dict, to_dict
from crate.data import train_batches, val_batches
from crate.errors import CheckpointError, ConfigError
from crate.model import build_model
from crate.plots import pyplot
from crate.tracking import Tracker
from crate.tracking.job import TrackedJob
from crate.train.checkpoint import (MODEL_FILE, checkpoint_run_id, load_weights_into, plan_resume, restore_engine,
                                    write_checkpoint)
from crate.train.config import PretrainConfig
from crate.train.engine import build_engine
from crate.train.errors import TrainingDiverged
from crate.train.evaluate import all_gather, all_reduce, evaluate
from crate.train.metrics import LossHistory, Throughput, peak_flops
from crate.train.runtime import RayRuntime
from crate.train.schedule import learning_rate

log = logging.getLogger("crate.train")


@dataclass
class RunInfo:
    """What the driver resolved once for every worker."""

    name: str
    code_version: str = "unknown"
    packages: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None  # MLflow run this one nests under (a sweep)


# Deterministic failures: a restart from the same checkpoint with the same config would fail the same way.
FINAL_ERRORS = {error.__name__: error for error in (TrainingDiverged, CheckpointError, ConfigError)}


def train_worker(job: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's `train_loop_per_worker`. Ray retries a worker group that raised; one of the FINAL_ERRORS is
    returned instead (every rank meets it at the same point: the decisions behind them are collective)."""
    from crate.logs import configure

    configure()
    try:
        run_training(job, RayRuntime())
    except tuple(FINAL_ERRORS.values()) as error:
        return {"error": type(error).__name__, "args": list(error.__reduce__()[1])}
    return None


def raise_returned_error(returned: dict[str, Any] | None) -> None:
    """On the driver: raise the error that rank 0's `train_worker` returned, if any."""
    if returned:
        raise FINAL_ERRORS[returned["error"]](*returned["args"])


def chain_digest(previous: str, tokens: torch.Tensor) -> str:
    """sha256 of the previous digest (hex, "" at the start) and a batch's token ids: a digest of every block so far,
    in order."""
    return hashlib.sha256(bytes.fromhex(previous) + tokens.cpu().numpy().astype("int64").tobytes()).hexdigest()


def run_training(job: dict[str, Any], runtime) -> dict[str, float]:
    """Train until `max_steps` (or the token budget ends the stream); returns the final metrics."""
    trainer = Trainer(from_dict(PretrainConfig, job["config"]), RunInfo(**job["run"]), runtime)
    with trainer.tracked_job():
        return trainer.fit()


class Trainer:
    def __init__(self, cfg: PretrainConfig, run: RunInfo, runtime):
        self.cfg, self.run, self.runtime = cfg, run, runtime
        self.rank, self.world_size = runtime.rank, runtime.world_size
        self.device = runtime.device(cfg.train.use_gpu)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        with runtime.latest_checkpoint() as directory:
            resume = plan_resume(directory, cfg, self.rank, self.world_size)
            if resume and not resume.full_engine_state:
                load_weights_into(model, resume)
            self.engine = build_engine(model, cfg.train, self.device)
            if resume and resume.full_engine_state:
                restore_engine(self.engine, resume, self.rank)
        self.device = self.engine.device  # data, evaluation and metrics go where the engine put the model
        if resume is None:
            torch.manual_seed(cfg.train.seed + self.rank)
        saved = resume.trainer_state if resume else {}
        self.step = saved.get("step", 0)
        self.final_metrics = saved.get("metrics", {})  # what the last checkpoint reported
        self.history = LossHistory.from_dict(saved.get("history"))
        self.mixture: dict[str, int] = dict(saved.get("mixture", {}))  # tokens per pile_set_name, this rank
        self.data_state = resume.data_state if resume else None
        self.loss: float | None = saved.get("loss")  # the last step's loss, averaged over the workers
        self.nodes = all_gather(runtime.node_id, self.world_size)  # the node each rank runs on, in rank order
        # A hash chain over every block this rank trained on, in order, carried across resumes at the same world
        # size: two runs with equal digests saw the same blocks in the same order on every rank.
        digests = saved.get("data_digests") or []
        self.data_digest = digests[self.rank] if len(digests) == self.world_size else ""
        self.skipped_in_a_row = 0
        self.skipped_before = self.engine.skipped_steps
        self.resume = resume
        self.tracker = Tracker(cfg.tracking)  # inactive until `tracked_job` opens the run
        self.batches = train_batches(cfg.data, cfg.train.micro_batch_size, self.rank, self.world_size, self.data_state)
        self.throughput = Throughput(self.engine.module.flops_per_token(cfg.data.context),
                                     peak_flops(self.device, cfg.train.peak_flops), self.world_size)

    @contextlib.contextmanager
    def tracked_job(self) -> Iterator[TrackedJob]:
        """The run's MLflow run (rank 0 alone logs), reopened when the checkpoint resumed names it, ended with the
        job's outcome (crate.tracking.job)."""
        cfg, run, resume = self.cfg, self.run, self.resume
        tracking = cfg.tracking if self.rank == 0 else dataclasses.replace(cfg.tracking, enabled=False)
        params = {"run.code_version": run.code_version, "run.world_size": self.world_size,
                  "run.grad_accum_steps": cfg.train.grad_accum_steps, "run.tokens_per_step": cfg.tokens_per_step,
                  "run.params": self.engine.num_params, **{f"packages.{k}": v for k, v in run.packages.items()}}
        tags = {"crate.run_name": run.name, "crate.arch": cfg.model.arch, "crate.model": cfg.model.preset or "custom",
                **run.tags}
        resume_run_id = checkpoint_run_id(resume.directory, resume.trainer_state) if resume else None
        with TrackedJob(tracking, "train", run.name, config=cfg, params=params, tags=tags, resume_run_id=resume_run_id,
                        parent_run_id=run.parent_run_id, skip_logged_steps=True, code_version=run.code_version) as job:
            self.tracker = job.tracker
            if not resume_run_id:
                self.tracker.log_text(dump_yaml(cfg), "config.yaml")
            if resume:
                self._log_resume(resume)
            yield job

    def _log_resume(self, resume) -> None:
        self._log(f"resumed at step {self.step} from {resume.directory.name}")
        self.tracker.log_metrics({"train/resumed_from_step": self.step}, step=self.step)
        if resume.changes:
            changes = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in resume.changes.items())
            self._log(f"config changed on resume (allowed): {changes}")
            if self.rank == 0:  # MLflow cannot change a logged param: the changes go beside them
                self.tracker.log_text(yaml.safe_dump({name: {"checkpoint": old, "now": new}
                                                      for name, (old, new) in resume.changes.items()}),
                                      f"config_changes/resume_at_step_{self.step:08d}.yaml")

    # ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        train = self.cfg.train
        if self.step >= train.max_steps:  # a finished run submitted again: nothing to do
            self._log(f"{self.run.name} is already complete at step {self.step}")
            return self.final_metrics
        metrics: dict[str, float] = {}
        self._log(f"training {self.cfg.model.preset or self.cfg.model.arch} for {train.max_steps} steps of "
                  f"{self.cfg.tokens_per_step:,} tokens on {self.world_size} worker(s), engine {train.engine}"
                  + (f" ZeRO-{train.zero_stage}" if train.engine == "deepspeed" else ""))
        while self.step < train.max_steps:
            loss = self.train_step()
            if loss is None:
                self._log("the data stream ended (token budget reached)")
                break
            if self.step % train.log_interval == 0 or self.step == train.max_steps:
                metrics = self.log_progress(loss)
            if self.step == train.max_steps:
                break  # the final evaluation and checkpoint follow
            if self.step % train.eval_interval == 0:
                metrics = {**metrics, **self.evaluate()}
            if self.step % train.eval_interval == 0 or self.step % train.checkpoint_interval == 0:
                self.report(metrics, checkpoint=self.step % train.checkpoint_interval == 0)
        if not self.history.val or self.history.val[-1][0] != self.step:
            metrics = {**metrics, **self.evaluate()}
        metrics = self.report(metrics, checkpoint=True, final=True)
        self.finish()
        return metrics

    def train_step(self) -> float | None:
        """One optimizer step over grad_accum_steps micro-batches; the mean loss, or None at the stream's end."""
        o = self.cfg.train.optim
        self.engine.set_lr(learning_rate(self.step, o.lr, o.min_lr, o.warmup_steps, self.cfg.decay_steps))
        losses = []
        for _ in range(self.cfg.train.grad_accum_steps):
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.data_digest = chain_digest(self.data_digest, batch.tokens)
            tokens = batch.tokens.to(self.device, non_blocking=True)
            losses.append(self.engine.forward_backward(tokens[:, :-1], tokens[:, 1:]))
            self.data_state = batch.state
            for name, count in batch.set_tokens.items():
                self.mixture[name] = self.mixture.get(name, 0) + count
            self.throughput.add(tokens[:, 1:].numel() * self.world_size)
        self.grad_norm = self.engine.finish_step()
        self.step += 1
        loss = all_reduce(torch.stack(losses).float().mean()).item() / self.world_size
        self.check_divergence(loss)
        self.loss = loss
        return loss

    def check_divergence(self, loss: float) -> None:
        """Stop on a non-finite loss, or on `max_skipped_steps` engine-skipped steps in a row. Every rank sees the
        same averaged loss and the same (all-reduced) overflow decision, so every rank stops at the same step."""
        if not math.isfinite(loss):
            raise TrainingDiverged(self.step, f"loss {loss} (averaged over {self.world_size} worker(s)), grad "
                                              f"norm {self.grad_norm}")
        skipped = self.engine.skipped_steps
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped > self.skipped_before else 0
        self.skipped_before = skipped
        if self.skipped_in_a_row >= self.cfg.train.max_skipped_steps:
            raise TrainingDiverged(self.step, f"the engine skipped the last {self.skipped_in_a_row} optimizer steps in "
                                              f"a row (non-finite gradients: DeepSpeed's 'OVERFLOW! Skipping step'; "
                                              f"train.max_skipped_steps={self.cfg.train.max_skipped_steps}), loss "
                                              f"{loss}, grad norm {self.grad_norm}")

    @property
    def tokens_seen(self) -> int:
        return self.step * self.cfg.tokens_per_step

    # ----------------------------------------------------------------------------------------------
    def log_progress(self, loss: float) -> dict[str, float]:
        o = self.cfg.train.optim
        metrics = {"train/loss": loss, "train/grad_norm": self.grad_norm, "train/tokens_seen": self.tokens_seen,
                   "train/lr": learning_rate(self.step - 1, o.lr, o.min_lr, o.warmup_steps, self.cfg.decay_steps),
                   **self.throughput.measure(self.device), **self._data_metrics()}
        self.history.train.append((self.step, loss))
        self.tracker.log_metrics(metrics, step=self.step)
        mfu = f" | mfu {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""
        self._log(f"step {self.step}/{self.cfg.train.max_steps} | loss {loss:.4f} | lr {metrics['train/lr']:.2e} | "
                  f"grad {self.grad_norm:.2f} | {metrics['perf/tokens_per_s']:,.0f} tok/s{mfu} | "
                  f"{self.tokens_seen:,} tokens")
        return metrics

    def _data_metrics(self) -> dict[str, float]:
        """The mixture seen (share of tokens per pile_set_name, whole run) and the stream's counters (documents,
        skipped records by reason, ... since this worker started), all ranks together."""
        local = {"mixture": self.mixture, "stream": self.batches.stats()}
        parts = [local]
        if dist.is_initialized() and self.world_size > 1:
            parts = [{} for _ in range(self.world_size)]
            dist.all_gather_object(parts, local)
        mixture, stream = Counter(), Counter()  # update() keeps zero counts, so "skipped: 0" is logged too
        for part in parts:
            mixture.update(part["mixture"])
            stream.update(part["stream"])
        total = max(sum(mixture.values()), 1)
        return {**{f"data/share/{name}": count / total for name, count in mixture.items()},
                **{f"data/stream/{key}": value for key, value in stream.items()}}

    def evaluate(self) -> dict[str, float]:
        batches = val_batches(self.cfg.data, self.cfg.train.micro_batch_size, self.rank, self.world_size,
                              self.cfg.train.eval_blocks)
        metrics = evaluate(self.engine.module, batches, self.device, self.engine.eval_context)
        self.history.val.append((self.step, metrics["val/loss"]))
        self.tracker.log_metrics(metrics, step=self.step)
        sparsity = f" | active/token {metrics['neurons/active_per_token']:.1f}"
        lasso = (f" | lasso {metrics['neurons/lasso_objective']:.3f} | recon err "
                 f"{metrics['neurons/relative_recon_error']:.3f}" if "neurons/lasso_objective" in metrics else "")
        self._log(f"eval step {self.step} | val loss {metrics['val/loss']:.4f} | ppl {metrics['val/ppl']:.1f}"
                  f"{sparsity}{lasso}")
        return metrics

    def report(self, metrics: dict[str, float], checkpoint: bool, final: bool = False) -> dict[str, float]:
        """Report metrics to the runtime (Ray Train / Tune), with a checkpoint when due. Every rank calls this."""
        metrics = {**metrics, "step": self.step, "tokens_seen": self.tokens_seen}
        directory = self.runtime.new_checkpoint_dir(self.step) if checkpoint else None
        if directory is not None:
            write_checkpoint(directory, self.engine, self.rank, self.world_size, self._trainer_state(metrics),
                             self.data_state or {}, self.cfg.model)
            if final and self.rank == 0:
                self.tracker.log_artifact(directory / MODEL_FILE, "model")
        self.runtime.report(metrics, directory, step=self.step)
        if directory is not None:
            self._log(f"checkpoint at step {self.step} ({self.tokens_seen:,} tokens)")
        return metrics

    def _trainer_state(self, metrics: dict[str, float]) -> dict[str, Any]:
        t = self.cfg.train
        return {"step": self.step, "tokens_seen": self.tokens_seen, "engine": t.engine, "zero_stage": t.zero_stage,
                "mlflow_run_id": self.tracker.run_id, "run_name": self.run.name, "history": self.history.to_dict(),
                "mixture": self.mixture, "metrics": metrics, "loss": self.loss, "config": to_dict(self.cfg),
                "nodes": self.nodes, "data_digests": all_gather(self.data_digest, self.world_size)}

    def finish(self) -> None:
        if self.rank != 0:
            return
        figure = self.history.figure(f"{self.run.name}: {self.cfg.model.preset or self.cfg.model.arch}")
        self.tracker.log_figure(figure, "plots/loss_curve.png")
        pyplot().close(figure)
        self._log(f"done: {self.step} steps, {self.tokens_seen:,} tokens")

    def _log(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

