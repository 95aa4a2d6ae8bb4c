"""Training faults, each reproduced first (issue 13, items 2, 5, 6, 7): a diverging run, engine-skipped steps,
torn and damaged checkpoints, a crafted pickle, a config changed on resume. One process (the local runtime),
the smoke model, a few steps; the one Ray test is the fault only Ray has (its checkpoint rotation, its retries)."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from crate.config import load_config
from crate.errors import CheckpointError, ConfigError
from crate.model import build_model
from crate.train import PretrainConfig, launch
from crate.train.checkpoint import load_data, verify, write_checkpoint
from crate.train.engine import build_engine
from crate.train.errors import TrainingDiverged
from crate.train.loop import RunInfo, Trainer
from crate.train.runtime import LocalRuntime

LOCAL = ["train.launcher=local", "data.engine=local", "tracking.enabled=false"]
# The finished run every checkpoint test starts from: DeepSpeed ZeRO-2 (the default engine), checkpoints at 3, 6.
FINISHED = ["train.run_name=good", "train.max_steps=6", "train.optim.decay_steps=12", "train.log_interval=1"]
ENGINE = "engine/mp_rank_00_model_states.pt"
OPTIMIZER = "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def config(storage: Path, *overrides):
    return load_config(PretrainConfig, "smoke", [*LOCAL, f"train.storage_path={storage}", *overrides])


def history(checkpoint: Path) -> dict[int, float]:
    return dict(map(tuple, json.loads((checkpoint / "trainer_state.json").read_text())["history"]["train"]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("finished") / "runs"
    launch(config(storage, *FINISHED))
    return storage


@pytest.fixture
def storage(finished, tmp_path) -> Path:
    """A copy of the finished run's storage to damage."""
    shutil.copytree(finished, tmp_path / "runs")
    return tmp_path / "runs"


def flip(path: Path, start: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    data[start:start + length] = bytes(b ^ 0xFF for b in data[start:start + length])
    path.write_bytes(bytes(data))


def cut(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def torn(checkpoint: Path) -> None:
    """What a disk-full error leaves: a 0-byte model.pt and half the optimizer states."""
    (checkpoint / "model.pt").write_bytes(b"")
    cut(checkpoint / OPTIMIZER, 0.5)


DAMAGE = {
    "0-byte model.pt": (lambda c: (c / "model.pt").write_bytes(b""), "model.pt has 0 bytes"),
    "truncated trainer state": (lambda c: cut(c / "trainer_state.json", 0.5), "trainer_state.json has"),
    "deleted engine directory": (lambda c: shutil.rmtree(c / "engine"), f"{ENGINE} is missing"),
    "4 KiB flipped in the optimizer states": (lambda c: flip(c / OPTIMIZER, 2**20, 4096),
                                              f"{OPTIMIZER} does not match its sha256"),
    "4 KiB flipped in the model states": (lambda c: flip(c / ENGINE, 2**20, 4096), f"{ENGINE} does not match"),
    "torn before its manifest": (lambda c: ((c / "manifest_rank0.json").unlink(), cut(c / OPTIMIZER, 0.5)),
                                 "manifest_rank0.json is missing"),
}


@pytest.mark.integration
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file(storage, damage, caplog):
    apply, named = DAMAGE[damage]
    apply(storage / "good/checkpoint_00000006")
    with caplog.at_level(logging.WARNING), LocalRuntime(storage / "good", 3).latest_checkpoint() as chosen:
        assert chosen == storage / "good/checkpoint_00000003"
    [skipped] = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert "checkpoint_00000006" in skipped and named in skipped, skipped


@pytest.mark.integration
def test_resume_skips_a_torn_checkpoint_and_continues_exactly(finished, storage, caplog):
    full = (storage / "good/checkpoint_00000006" / OPTIMIZER).stat().st_size
    torn(storage / "good/checkpoint_00000006")
    with caplog.at_level(logging.INFO):
        result = launch(config(storage, *FINISHED, "train.max_steps=8"))  # a longer budget: allowed, logged
    log = caplog.text
    assert "skipping checkpoint" in log and f"{OPTIMIZER} has {full // 2:,} bytes, its manifest says {full:,}" in log
    assert "resumed at step 3 from checkpoint_00000003" in log
    assert "config changed on resume (allowed): train.max_steps 6 -> 8" in log
    expected, got = history(finished / "good/checkpoint_00000006"), history(Path(result.checkpoint))
    assert sorted(got) == list(range(1, 9)) and Path(result.checkpoint).name == "checkpoint_00000008"
    for step in (4, 5, 6):  # from the older checkpoint, the very same steps again
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    verify(storage / "good/checkpoint_00000006")  # the torn one was rewritten whole


@pytest.mark.integration
def test_without_a_checkpoint_that_verifies_the_resume_is_a_checkpoint_error(storage):
    (storage / "good/checkpoint_00000006/model.pt").write_bytes(b"")
    cut(storage / "good/checkpoint_00000003/trainer_state.json", 0.5)
    with pytest.raises(CheckpointError) as error:
        launch(config(storage, *FINISHED))
    message = str(error.value)
    assert "checkpoint_00000006: model.pt has 0 bytes" in message
    assert "checkpoint_00000003: trainer_state.json has" in message and "train.run_name" in message


@pytest.mark.integration
def test_a_changed_config_is_refused_on_resume_naming_the_fields(storage):
    with pytest.raises(ConfigError) as error:  # the resubmission: lambda 0.1 -> 0.5 and a new LR
        launch(config(storage, *FINISHED, "model.ista_sparsity=0.5", "train.optim.lr=1e-3", "train.max_steps=12",
                      "train.eval_interval=2"))
    assert error.value.field == "model.ista_sparsity, train.optim.lr"  # the budget and interval may change
    assert "0.1 -> 0.5" in error.value.message and "new train.run_name" in error.value.message
    assert sorted(p.name for p in (storage / "good").iterdir()) == ["checkpoint_00000003", "checkpoint_00000006"]


class Crafted:
    """A pickle that runs code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.integration
def test_a_crafted_pickle_in_a_checkpoint_is_refused_naming_the_file(storage, tmp_path):
    checkpoint = storage / "good/checkpoint_00000006"
    marker = tmp_path / "code-ran"
    torch.save({"model": Crafted(marker)}, checkpoint / "model.pt")
    manifest = json.loads((checkpoint / "manifest_rank0.json").read_text())  # who can write it, can rewrite this
    data = (checkpoint / "model.pt").read_bytes()
    manifest["files"]["model.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest_rank0.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.pt: refused: it holds pickled objects"):
        # another engine: the run continues from model.pt (weights only)
        launch(config(storage, *FINISHED, "train.engine=torch", "train.max_steps=8"))
    torch.save({"python": Crafted(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: refused"):
        load_data(tmp_path / "rng_rank0.pt")
    assert not marker.exists()


@pytest.mark.integration
def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path):
    storage = tmp_path / "runs"
    with pytest.raises(TrainingDiverged, match=r"at step 2: loss nan") as error:
        launch(config(storage, "train.engine=torch", "train.run_name=diverges", "train.optim.lr=1e30",
                      "train.checkpoint_interval=1", "train.keep_checkpoints=1", "train.max_steps=8"))
    assert error.value.step == 2
    [kept] = sorted((storage / "diverges").glob("checkpoint_*"))
    assert kept.name == "checkpoint_00000001"
    state = verify(kept)
    weights = load_data(kept / "model.pt")["model"]
    assert state["loss"] == pytest.approx(10.8, abs=0.2) and all(torch.isfinite(w).all() for w in weights.values())


def test_a_checkpoint_of_a_non_finite_model_is_never_written(tmp_path):
    cfg = config(tmp_path, "train.engine=torch")
    model = build_model(cfg.model)
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("inf")
    engine = build_engine(model, cfg.train, torch.device("cpu"))
    with pytest.raises(TrainingDiverged, match=r"at step 5: the model has non-finite parameters \(transformer.wte"):
        write_checkpoint(tmp_path, engine, 0, 1, {"step": 5, "tokens_seen": 0, "loss": 3.0}, {}, cfg.model)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_steps_the_engine_skips_in_a_row_stop_the_run(tmp_path):
    cfg = config(tmp_path / "runs", "train.run_name=skips", "train.max_skipped_steps=3", "train.log_interval=1")
    trainer = Trainer(cfg, RunInfo("skips"), LocalRuntime(tmp_path / "runs/skips", 3))
    for parameter in trainer.engine.module.parameters():  # a poisoned gradient; the loss itself stays finite
        parameter.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(TrainingDiverged, match=r"at step 3: the engine skipped the last 3 optimizer steps in a row"):
        trainer.fit()
    assert trainer.engine.skipped_steps == 3 and not list((tmp_path / "runs/skips").glob("checkpoint_*"))


@pytest.mark.integration
def test_under_ray_a_diverged_run_fails_at_once_keeping_its_last_good_checkpoint(ray_cluster, tmp_path):
    """Ray Train rotates what is reported (keep 1 here): a NaN checkpoint reported would evict the good one;
    and a divergence raised in the workers would be retried from it max_failures times, diverging each time."""
    from mlflow.tracking import MlflowClient

    cfg = load_config(PretrainConfig, "smoke", [
        "train.engine=torch", "data.engine=local", "train.cpus_per_worker=0.5", "train.controller_failure_limit=0",
        "train.max_failures=2", "tracking.system_metrics=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"train.storage_path={tmp_path / 'runs'}", "train.run_name=diverges", "train.optim.lr=1e30",
        "train.checkpoint_interval=1", "train.keep_checkpoints=1", "train.max_steps=8"])
    with pytest.raises(TrainingDiverged, match=r"at step 2: loss nan"):
        launch(cfg)
    run_dir = tmp_path / "runs/diverges"
    [kept] = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept.name == "checkpoint_00000001"
    assert kept.name in (run_dir / "checkpoint_manager_snapshot.json").read_text()  # what Ray has registered
    verify(kept)
    assert all(torch.isfinite(w).all() for w in load_data(kept / "model.pt")["model"].values())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs(client.get_experiment_by_name("crate-lm").experiment_id)
    assert run.info.status == "FAILED"
    assert client.get_metric_history(run.info.run_id, "train/resumed_from_step") == []  # never retried
