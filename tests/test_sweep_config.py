"""Sweep configs fail before any trial starts, naming the field; the report's pieces (Pareto front, table,
markdown, plots) from hand-made trial records. No Ray here."""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from crate.config import load_config, to_dict
from crate.errors import ConfigError
from crate.sweep import SweepConfig
from crate.sweep.report import TrialRecord, markdown, pareto_front, summary_table, write_report
from crate.sweep.run import check_capacity, param_space, run_sweep, searcher, trial_resources
from crate.sweep.state import SweepState, check_same_config, write_state

REPO = Path(__file__).resolve().parents[1]
GRID = {"space": {"model.ista_sparsity": {"grid": [0.05, 0.1]}, "model.ista_step_size": {"grid": [0.1]}}}


def sweep_config(raw=None, *overrides):
    return load_config(SweepConfig, {"recipe": "smoke", "scheduler": {"grace_period": 3}, **GRID, **(raw or {})},
                       list(overrides))


def error_of(*overrides, raw=None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        sweep_config(raw, *overrides)
    return caught.value


@pytest.mark.parametrize("shipped", sorted((REPO / "tune").glob("*.yaml")))
def test_shipped_search_spaces_load(shipped):
    cfg = load_config(SweepConfig, shipped)
    assert {"model.ista_sparsity", "model.ista_step_size"} <= set(cfg.space)
    assert cfg.expected_trials >= 4


def test_a_grid_around_the_paper_default_expands_to_every_combination():
    cfg = load_config(SweepConfig, REPO / "tune/ista-grid.yaml")
    assert 0.1 in cfg.space["model.ista_sparsity"].grid and 0.1 in cfg.space["model.ista_step_size"].grid
    assert cfg.expected_trials == len(cfg.space["model.ista_sparsity"].grid) * len(cfg.space["model.ista_step_size"].grid)


@pytest.mark.parametrize("overrides, field, message", [
    (["space.model.ista_sparsity_typo={grid: [0.1]}"], "space.model.ista_sparsity_typo", "not a trial config field"),
    (["space.train={grid: [1]}"], "space.train", "not a section"),
    (["space.model.ista_sparsity={grid: []}"], "space.model.ista_sparsity.grid", "empty"),
    (["space.model.ista_sparsity={loguniform: [0.5, 0.5]}"], "space.model.ista_sparsity.loguniform", "low < high"),
    (["space.model.ista_sparsity={uniform: [0.2, 0.1]}"], "space.model.ista_sparsity.uniform", "low < high"),
    (["space.model.ista_sparsity={grid: [0.1, -0.05]}"], "space.model.ista_sparsity", "λ must be >= 0"),
    (["space.model.ista_sparsity={uniform: [-0.1, 0.1]}"], "space.model.ista_sparsity", "λ must be >= 0"),
    (["space.model.ista_step_size={grid: [0.0]}"], "space.model.ista_step_size", "η must be > 0"),
    (["space.model.ista_step_size={loguniform: [0.0, 1.0]}"], "space.model.ista_step_size.loguniform", "low > 0"),
    (["space.model.ista_steps={uniform: [1, 4]}"], "space.model.ista_steps", "expected an integer"),
    (["space.model.preset={choice: [crate-1l]}"], "space.model.preset", "search the fields themselves"),
    (["space.model.ista_sparsity={grid: [0.1], choice: [0.2]}"], "space.model.ista_sparsity.kind", "exactly one"),
    (["trial.train.checkpoint_interval=4"], "trial.train.checkpoint_interval", "multiple of train.eval_interval"),
    (["trial.train.run_name=mine"], "trial.train.run_name", "leave it unset"),
    (["trial.train.launcher=local", "trial.data.engine=local"], "trial.train.launcher", "Ray Train"),
    (["scheduler.grace_period=4"], "scheduler.grace_period", "at or before the last evaluation"),
    (["metric=train/loss"], "metric", "not reported by every trial result"),
    (["metric=proxy_tar/mean"], "metric", "not reported by every trial result"),  # only once, after training
    (["search.algorithm=optuna"], "space.model.ista_sparsity", "use choice instead of grid"),
    (["search.points_to_evaluate=[{model.ista_sparsity: 0.1}]"], "search.points_to_evaluate[0].model.ista_step_size",
     "missing"),
    (["search.points_to_evaluate=[{model.ista_sparsity: -1, model.ista_step_size: 0.1}]"],
     "search.points_to_evaluate[0]", "λ must be >= 0"),
    (["max_concurrent_trials=0"], "max_concurrent_trials", ">= 1"),
    (["name=../escape"], "name", "names a folder"),
    (["recipe=no-such-recipe"], "recipe", "neither a YAML file nor a recipe"),
])
def test_bad_sweep_configs_name_the_field(overrides, field, message):
    error = error_of(*overrides)
    assert error.field == field and message in error.message, str(error)


def test_ista_fields_are_rejected_for_a_gpt_trial():
    error = error_of("trial.model.preset=gpt-tiny")
    assert error.field == "space.model.ista_sparsity" and "CRATE" in error.message


def test_an_override_replaces_or_drops_a_dimension():
    cfg = sweep_config(None, "space.model.ista_sparsity={loguniform: [0.01, 1.0]}", "space.model.ista_step_size=null",
                       "space.train.optim.lr={choice: [1.0e-3, 3.0e-3]}")
    assert {key: dim.kind for key, dim in cfg.space.items()} == {"model.ista_sparsity": "loguniform",
                                                                 "train.optim.lr": "choice"}
    assert load_config(SweepConfig, to_dict(cfg)).space == cfg.space  # what --print-config and resume read back


def test_space_cannot_be_empty():
    error = error_of(raw={"space": {}})
    assert error.field == "space" and "empty" in error.message


def test_expected_trials_count_points_and_grid_repeats():
    assert sweep_config(None, "search.num_samples=3").expected_trials == 6
    point = "search.points_to_evaluate=[{model.ista_sparsity: 0.3, model.ista_step_size: 0.3}]"
    assert sweep_config(None, "search.num_samples=3", point).expected_trials == 1 + 2 * 2
    ranges = ["space.model.ista_sparsity={loguniform: [0.01, 1]}", "space.model.ista_step_size={loguniform: [0.01, 1]}",
              "search.algorithm=optuna", "search.num_samples=7"]
    assert sweep_config(None, *ranges).expected_trials == 7


def test_optuna_starts_at_the_paper_default_and_samples_within_the_space():
    cfg = load_config(SweepConfig, REPO / "tune/ista-optuna.yaml")
    search = searcher(cfg)
    assert search.set_search_properties(cfg.metric, cfg.mode, param_space(cfg))
    first, second = search.suggest("t0"), search.suggest("t1")
    assert first == cfg.search.points_to_evaluate[0]
    for key, dim in cfg.space.items():
        assert second[key] in dim.values if dim.kind == "choice" else dim.values[0] <= second[key] <= dim.values[1]


def test_a_trial_counts_its_driver_workers_and_read_tasks():
    cfg = sweep_config(None, "trial.train.num_workers=2", "trial.train.cpus_per_worker=0.5",
                       "trial.train.global_batch_size=16", "trial.data.read_tasks=2", "trial.data.read_cpus=0.25",
                       "trial_cpus=0.25")
    assert trial_resources(cfg) == {"CPU": 0.25 + 2 * 0.5 + 2 * 2 * 0.25, "GPU": 0.0}
    check_capacity(cfg, {"CPU": 2.25})
    with pytest.raises(ConfigError) as caught:
        check_capacity(load_config(SweepConfig, to_dict(cfg), ["max_concurrent_trials=2"]), {"CPU": 4})
    assert caught.value.field == "max_concurrent_trials" and "at most 1 fit" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        check_capacity(cfg, {"CPU": 2})
    assert caught.value.field == "trial.train.num_workers"


def test_gpu_trials_need_gpus_and_an_autoscaling_cluster_states_its_maximum():
    cfg = sweep_config(None, "trial.train.use_gpu=true", "max_concurrent_trials=4")
    with pytest.raises(ConfigError, match="0 GPUs|has 0"):
        check_capacity(cfg, {"CPU": 64})
    check_capacity(load_config(SweepConfig, to_dict(cfg), ["cluster_gpus=8"]), {"CPU": 64})


def test_resuming_with_another_config_is_refused():
    saved = json.loads(json.dumps(to_dict(sweep_config())))
    check_same_config(saved, to_dict(sweep_config(None, "cluster_cpus=64")), "s")  # cluster size may change
    with pytest.raises(ConfigError) as caught:
        check_same_config(saved, to_dict(sweep_config(None, "space.model.ista_step_size={grid: [0.2]}")), "s")
    assert caught.value.field == "resume" and "space.model.ista_step_size.grid" in caught.value.message


def test_a_sweep_name_is_used_once_and_resume_needs_an_existing_sweep(tmp_path):
    cfg = sweep_config(None, "name=taken", f"trial.train.storage_path={tmp_path}")
    write_state(str(tmp_path / "taken"), SweepState("taken-1", None, to_dict(cfg)))
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(cfg)
    with pytest.raises(ConfigError, match="no sweep 'other'"):
        run_sweep(sweep_config(None, "name=other", f"trial.train.storage_path={tmp_path}"), resume=True)
    with pytest.raises(ConfigError, match="needs the name"):
        run_sweep(sweep_config(), resume=True)


@pytest.mark.integration
def test_the_command_line_rejects_a_bad_space_with_the_field():
    proc = subprocess.run([sys.executable, str(REPO / "tune/sweep.py"), "--config", str(REPO / "tune/ista-grid.yaml"),
                           "space.model.ista_step_size={grid: [0.1, -0.1]}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "space.model.ista_step_size" in proc.stderr and "η must be > 0" in proc.stderr


# ------------------------------------------------------------------------------------------------------
def test_pareto_front_keeps_the_non_dominated_points():
    points = [(10, 5.0), (20, 4.0), (15, 4.5), (25, 4.2), (30, 3.9), (12, 5.5)]
    assert pareto_front(points, x_higher_better=False, y_higher_better=False) == [0, 2, 1, 4]
    assert pareto_front(points, x_higher_better=True, y_higher_better=False) == [4]


def records():
    rows = []
    for i, (lam, eta) in enumerate((lam, eta) for lam in (0.05, 0.1, 0.2) for eta in (0.05, 0.1)):
        outcome = "failed" if i == 5 else "stopped" if i == 4 else "completed"
        metrics = {} if outcome == "failed" else {
            "step": 100 if outcome == "completed" else 20, "tokens_seen": 100 * 512, "val/loss": 5 + lam + abs(eta - 0.1),
            "neurons/active_per_token": 50 / (lam * 10), "neurons/dead_fraction": lam / 10, "proxy_tar/mean": 30 + lam}
        rows.append(TrialRecord(f"t{i}", {"model.ista_sparsity": lam, "model.ista_step_size": eta}, outcome, metrics,
                                "boom" if outcome == "failed" else None))
    return rows


def test_summary_table_ranks_completed_trials_first_and_renders_markdown():
    table = summary_table(records(), ["model.ista_sparsity", "model.ista_step_size"], "val/loss", "min")
    assert table["outcome"].to_list() == ["completed"] * 4 + ["stopped", "failed"]
    assert table["val/loss"][:4].is_sorted()
    text = markdown(table)
    assert text.splitlines()[0].startswith("| trial | outcome | λ | η |") and len(text.splitlines()) == 8
    assert "| t5 | failed | 0.2 | 0.1 | – |" in text


def test_a_sweep_whose_trials_all_failed_reports_the_table_alone(tmp_path):
    failed = [TrialRecord("t0", {"model.ista_sparsity": 0.1, "model.ista_step_size": 0.1}, "failed", {}, "boom")]
    table = summary_table(failed, ["model.ista_sparsity", "model.ista_step_size"], "val/loss", "min")
    files = write_report(table, tmp_path, "val/loss", "min", [], ["model.ista_sparsity"], "test")
    assert [f.name for f in files] == ["summary.csv", "summary.md"]


@pytest.mark.parametrize("metric", ["neurons/zero_fraction", "neurons/relative_recon_error"])
def test_every_metric_a_sweep_may_rank_by_is_a_column(metric):
    table = summary_table(records(), ["model.ista_sparsity", "model.ista_step_size"], metric, "min")
    assert metric in table.columns and table["outcome"][0] == "completed"


@pytest.mark.parametrize("grid", [True, False])
def test_report_files_are_written(tmp_path, grid):
    table = summary_table(records(), ["model.ista_sparsity", "model.ista_step_size"], "val/loss", "min")
    keys = ["model.ista_sparsity", "model.ista_step_size"]
    files = write_report(table, tmp_path, "val/loss", "min", keys if grid else [], keys, "test")
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "summary.csv", "summary.md", "plots/loss_vs_lambda_eta.png", "plots/pareto.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert pl.read_csv(tmp_path / "summary.csv")["trial"].len() == 6


def test_help_prints_the_defaults_a_bare_run_uses(capsys):
    """`tune/sweep.py --help` lists what a bare `python tune/sweep.py` runs: the small embedded sweep
    (tune/quickstart.yaml, tiny trials on the built-in corpus), its trials' fields as the recipe sets them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_job", REPO / "tune" / "sweep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit) as exit_:
        job.main(["--help"])
    shown = capsys.readouterr().out
    # argparse wraps long paths, at hyphens too: compare without the whitespace it inserts
    assert exit_.value.code == 0 and f"(default:{REPO / 'tune' / 'quickstart.yaml'})" in "".join(shown.split())
    bare = load_config(SweepConfig, REPO / "tune" / "quickstart.yaml")
    assert bare.expected_trials == 4 and bare.trial.train.max_steps <= 20 and bare.trial.data.train == "stdlib://train"
    for line in (f"trial.train.max_steps = {bare.trial.train.max_steps}", f"trial.data.context = {bare.trial.data.context}",
                 f"trial.model.block_size = {bare.trial.model.block_size}", "scheduler.kind = 'fifo'",
                 "space.model.ista_sparsity = grid [0.05, 0.2]"):
        assert f"  {line}\n" in shown, line
    assert "600000" not in shown and "context = 1024" not in shown
