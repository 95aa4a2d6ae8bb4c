"""The training loop in one process (no Ray): configs, schedule, loss, checkpoint/resume equality, exports."""

import json
import math
from pathlib import Path

import pytest
import torch

from crate.config import load_config
from crate.errors import ConfigError
from crate.model import load_checkpoint, load_model
from crate.train import PretrainConfig, launch
from crate.train.schedule import learning_rate

LOCAL = ["train.launcher=local", "data.engine=local", "tracking.system_metrics=false"]


def config(tmp_path, *overrides):
    return load_config(PretrainConfig, "smoke", [*LOCAL, f"train.storage_path={tmp_path / 'runs'}",
                                                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def history(result) -> dict[int, float]:
    state = json.loads((Path(result.checkpoint) / "trainer_state.json").read_text())
    return dict((step, loss) for step, loss in state["history"]["train"])


@pytest.mark.parametrize("override, field", [
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.global_batch_size=10", "train.global_batch_size"),
    ("train.max_stpes=10", "train.max_stpes"),
    ("model.ista_sparsity=-1", "model.ista_sparsity"),
    ("train.optim.lr=fast", "train.optim.lr"),
    ("data.context=4096", "data.context"),
])
def test_invalid_configs_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as error:
        config(tmp_path, override)
    assert error.value.field == field


def test_missing_corpus_fails_before_training(tmp_path):
    cfg = config(tmp_path, f"data.train={tmp_path / 'no-such-corpus'}")
    with pytest.raises(ConfigError, match="data.train|train"):
        launch(cfg)
    assert not (tmp_path / "runs").exists()


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [learning_rate(s, 6e-4, 6e-5, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(6e-5) and lrs[9] == pytest.approx(6e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5), rel=0.05)
    assert lrs[100] == lrs[119] == pytest.approx(6e-5)


def test_token_budget_sets_the_step_count(tmp_path):
    cfg = config(tmp_path, "train.max_tokens=2000")
    assert cfg.train.max_steps == math.ceil(2000 / (8 * 64))


@pytest.mark.integration  # whole tracked training runs: seconds each, not the inner loop
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_resume_continues_exactly_where_the_uninterrupted_run_would(tmp_path, engine):
    common = [f"train.engine={engine}", "train.log_interval=1", "train.optim.decay_steps=8",
              "train.checkpoint_interval=4", "train.eval_interval=4"]
    straight = launch(config(tmp_path, *common, "train.max_steps=8", "train.run_name=straight"))
    launch(config(tmp_path, *common, "train.max_steps=4", "train.run_name=interrupted"))
    resumed = launch(config(tmp_path, *common, "train.max_steps=8", "train.run_name=interrupted"))
    expected, got = history(straight), history(resumed)
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert expected[8] < expected[1]
    assert load_checkpoint(resumed.model_file).metadata["step"] == 8


@pytest.mark.integration
def test_the_plain_export_is_the_trained_model(tmp_path):
    result = launch(config(tmp_path, "train.engine=torch", "train.run_name=export"))
    model = load_model(result.model_file).eval()
    assert model.config.preset == "crate-tiny"
    assert result.metrics["step"] == 6 and result.metrics["val/loss"] < math.log(50304)
    engine_state = torch.load(Path(result.checkpoint) / "engine.pt", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, engine_state[name].float()), name


def test_workers_that_leave_no_cpu_for_reading_are_refused(tmp_path):
    from crate.train.launch import check_resources

    cfg = config(tmp_path, "train.launcher=ray", "data.engine=ray", "train.num_workers=2", "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match="read tasks would never start") as error:
        check_resources(cfg, {"CPU": 2.0})
    assert error.value.field == "train.cpus_per_worker"
    check_resources(config(tmp_path, "train.launcher=ray", "data.engine=ray", "train.cpus_per_worker=0.5",
                           "train.num_workers=2", "train.micro_batch_size=4"), {"CPU": 2.0})


@pytest.mark.integration
def test_submitting_a_finished_run_again_does_no_work(tmp_path):
    first = launch(config(tmp_path, "train.engine=torch", "train.run_name=twice"))
    again = launch(config(tmp_path, "train.engine=torch", "train.run_name=twice"))
    assert again.checkpoint == first.checkpoint
    assert again.metrics["val/loss"] == first.metrics["val/loss"] and again.metrics["step"] == 6


def test_checkpoints_on_cloud_storage_are_reported_as_uris():
    from crate.train.launch import checkpoint_uri

    assert checkpoint_uri("bucket/runs/a/checkpoint_00000006", "s3://bucket/runs") == "s3://bucket/runs/a/checkpoint_00000006"
    assert checkpoint_uri("/data/runs/a/checkpoint_00000006", "/data/runs") == "/data/runs/a/checkpoint_00000006"
