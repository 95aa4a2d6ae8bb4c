"""Table 2 from hand-made results: the paper's own per-layer numbers must give the paper's means and variances."""

import importlib.util
import json
import math
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from crate.errors import ConfigError
from crate.interp.schema import RESULTS_SCHEMA, write_parquet
from crate.results.compare import compare, read_results, write_comparison

_spec = importlib.util.spec_from_file_location("compare_job", Path(__file__).parents[1] / "jobs" / "compare.py")
compare_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_job)

# The paper's per-layer TaR / Random-only scores (×100; its §4.3) and Table 2 (mean, variance; last layer
# excluded for 6 and 12 layers).
TAR = {("crate", 12): [13.6, 8.2, 6.7, 5.4, 5.0, 7.2, 5.1, 5.1, 3.6, 5.5, 9.4, 5.3],
       ("gpt", 12): [15.3, 8.0, 6.4, 4.2, 3.2, 4.0, 4.7, 3.9, 3.9, 7.2, 8.9, 8.0],
       ("crate", 3): [9.6, 9.3, 8.4], ("gpt", 3): [7.3, 0.8, 2.6]}
TABLE2_TAR = {("crate", 12): (6.8, 7.09), ("gpt", 12): (6.34, 11.35), ("crate", 3): (9.1, 0.26), ("gpt", 3): (3.57, 7.51)}


def rows(model, arch, n_layer, metric, per_layer, feature_kind="neurons"):
    """Per layer: two scored neurons at mean ± 1 (×100 units), one undefined (NaN), one failed (NaN)."""
    out = []
    for layer, value in enumerate(per_layer):
        for neuron, (score, status) in enumerate([(value - 1, "scored"), (value + 1, "scored"),
                                                  (math.nan, "undefined"), (math.nan, "failed")]):
            out.append({"model": model, "features": "neurons" if feature_kind == "neurons" else f"sae:{layer}.pt",
                        "layer": layer, "neuron": neuron, "protocol": "crate-paper", "metric": metric,
                        "backend": "token-set", "prompt_version": "v1", "seed": 0, "score": score / 100,
                        "status": status, "feature_kind": feature_kind, "arch": arch, "n_layer": n_layer})
    return out


def write_results(path, all_rows):
    columns = {name: [r.get(name) for r in all_rows] for name in RESULTS_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=RESULTS_SCHEMA)
    return write_parquet(table, path, RESULTS_SCHEMA)


@pytest.fixture
def results(tmp_path):
    crate = [r for (arch, n), v in TAR.items() if arch == "crate" for r in rows(f"crate-{n}l", arch, n, "tar", v)]
    gpt = [r for (arch, n), v in TAR.items() if arch == "gpt" for r in rows(f"gpt-{n}l", arch, n, "tar", v)]
    gpt += rows("gpt-3l", "gpt", 3, "tar", [9.4, 4.9, 3.5], feature_kind="sae")  # the paper's GPT-SAE-3L
    crate += rows("crate-3l", "crate", 3, "random", [9.0, 9.4, 6.9])
    gpt += rows("gpt-3l", "gpt", 3, "random", [3.1, -0.3, 1.3])
    (tmp_path / "crate").mkdir()
    return [str(write_results(tmp_path / "crate" / "results.parquet", crate)),
            str(write_results(tmp_path / "gpt.parquet", gpt))]


def summary_of(comparison, model, metric="tar", rule="paper", kind="neurons"):
    frame = comparison.summary.filter((pl.col("model") == model) & (pl.col("metric") == metric)
                                      & (pl.col("rule") == rule) & (pl.col("feature_kind") == kind))
    assert len(frame) == 1
    return frame.row(0, named=True)


def test_the_paper_table_2_is_reproduced_from_its_per_layer_scores(results):
    comparison = compare(read_results(results))
    for (arch, n), (mean, variance) in TABLE2_TAR.items():
        row = summary_of(comparison, f"{arch}-{n}l")
        assert 100 * row["mean"] == pytest.approx(mean, abs=0.006)
        assert 1e4 * row["variance"] == pytest.approx(variance, abs=0.006)
        assert row["nan"] == 2 * len(row["layers"].split(","))
    # the 12-layer models drop their last layer under the paper's rule, keep it under "all"; 3 layers keep all
    assert summary_of(comparison, "crate-12l")["layers"] == ",".join(map(str, range(11)))
    everything = summary_of(comparison, "crate-12l", rule="all")
    assert 100 * everything["mean"] == pytest.approx(sum(TAR[("crate", 12)]) / 12)
    assert summary_of(comparison, "crate-3l")["layers"] == summary_of(comparison, "crate-3l", rule="all")["layers"]
    sae = summary_of(comparison, "gpt-3l", kind="sae")
    assert 100 * sae["mean"] == pytest.approx((9.4 + 4.9 + 3.5) / 3)


def test_relative_improvement_matches_the_papers_103_percent(results):
    gains = compare(read_results(results)).improvements.filter(pl.col("rule") == "paper")

    def gain(n, metric):
        return gains.filter((pl.col("n_layer") == n) & (pl.col("metric") == metric))["improvement"].item()

    assert gain(12, "tar") == pytest.approx(6.8 / 6.34 - 1, abs=1e-3)  # +7.3%
    assert gain(3, "tar") == pytest.approx(9.1 / 3.5667 - 1, abs=1e-3)  # +155%
    # 3L averaged over its metrics: (9.1 + 8.43) / 2 vs (3.57 + 1.37) / 2
    assert gain(3, "average") == pytest.approx((9.1 + 8.4333) / (3.5667 + 1.3667) - 1, abs=1e-3)
    assert set(gains["gpt"]) == {"gpt-3l", "gpt-12l"}  # SAE series are not paired as GPT


def test_the_job_writes_markdown_csv_and_plot_and_logs_them(results, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    compare_job.main([str(tmp_path / "crate"), results[1], "--output-dir", str(tmp_path / "out"), f"tracking.uri={uri}",
                      "tracking.system_metrics=false"])
    markdown = (tmp_path / "out" / "table2.md").read_text()
    assert markdown == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| crate-12l | 12 | neurons | — | 6.80 (7.09) | — |" in markdown
    assert "| gpt-3l+SAE | 3 | sae | — | 5.93 (" in markdown
    assert "| crate-3l | gpt-3l | 3 | +155.1% | +517.1% | +255.4% |" in markdown
    csv = pl.read_csv(tmp_path / "out" / "table2.csv")
    assert set(csv["rule"]) == {"paper", "all"} and len(csv) == 2 * 7
    assert (tmp_path / "out" / "layers.png").stat().st_size > 10_000
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("crate-lm").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "comparison")} == {
        f"comparison/{name}" for name in ("table2.md", "table2.csv", "layers.csv", "improvements.csv", "layers.png")}
    assert run.data.metrics["crate-12l.neurons.tar.mean"] == pytest.approx(6.8)


def test_validation_losses_come_from_the_checkpoints_training_state(tmp_path):
    """The pretraining job saves trainer_state.json beside model.pt; its last evaluation is the model's loss in
    the table and on the loss-vs-interpretability plot. A checkpoint without one gets no loss, not an error."""
    for name, loss in (("crate-3l", 4.25), ("gpt-3l", 4.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(
            json.dumps({"step": 128, "history": {"train": [[128, 9.9]], "val": [[64, 5.0], [128, loss]]}}))
    all_rows = [{**r, "checkpoint": str(tmp_path / r["model"] / "model.pt")}
                for arch in ("crate", "gpt") for r in rows(f"{arch}-3l", arch, 3, "tar", TAR[(arch, 3)])]
    all_rows += [{**r, "checkpoint": str(tmp_path / "released.pt")} for r in rows("crate-12l", "crate", 12, "tar", TAR[("crate", 12)])]
    comparison = compare(read_results([write_results(tmp_path / "r.parquet", all_rows)]))
    assert [summary_of(comparison, m)["val_loss"] for m in ("crate-3l", "gpt-3l", "crate-12l")] == [4.25, 4.0, None]
    paths = write_comparison(comparison, tmp_path / "out")
    assert "| crate-3l | 3 | neurons | 4.250 | 9.10 (0.26) |" in paths[0].read_text()
    assert paths[-1].name == "loss_vs_interpretability.png" and paths[-1].stat().st_size > 10_000


def test_missing_results_are_named_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="results: no results table at"):
        read_results([tmp_path / "nowhere"])
    with pytest.raises(SystemExit):
        compare_job.main(["output_dir=x"])
    assert "give at least one results table" in capsys.readouterr().err


def test_a_model_without_a_recorded_depth_takes_its_deepest_layer_as_last(tmp_path):
    scores = [10.5, 7.4, 5.8, 8.0, 8.1, 5.7]  # the paper's CRATE-6L TaR; Table 2: 7.96 (2.29)
    path = write_results(tmp_path / "r.parquet", [{**r, "n_layer": None} for r in rows("crate-6l", "crate", 6, "tar", scores)])
    row = summary_of(compare(read_results([path])), "crate-6l")
    assert row["layers"] == "0,1,2,3,4" and 100 * row["mean"] == pytest.approx(7.96, abs=0.006)
    assert 1e4 * row["variance"] == pytest.approx(2.29, abs=0.006)


@pytest.mark.parametrize("n_layer", [3, 6, 8, 12, 24])
def test_interpretability_summaries_and_table_2_aggregate_by_one_rule(tmp_path, n_layer):
    """The job's own summary and Table 2 agree at every depth, the paper's (3, 6, 12) and others (8, 24)."""
    from crate.interp.report import layer_summary, model_summary

    per_layer = [float(3 * l % 7 + l) for l in range(n_layer)]
    all_rows = rows(f"crate-{n_layer}l", "crate", n_layer, "tar", per_layer)
    comparison = compare(read_results([str(write_results(tmp_path / "r.parquet", all_rows))]))
    paper, every = (summary_of(comparison, f"crate-{n_layer}l", rule=rule) for rule in ("paper", "all"))
    table = pa.Table.from_pylist([{k: r[k] for k in ("model", "features", "protocol", "metric", "backend",
                                                   "prompt_version", "seed", "layer", "score", "status")}
                                  for r in all_rows])
    layers = layer_summary(table)
    ours, = model_summary(layers, n_layer)
    assert ours["mean_excl_last"] / 100 == pytest.approx(paper["mean"])  # the job reports ×100
    assert ours["mean"] / 100 == pytest.approx(every["mean"])
    assert ours["variance_excl_last"] / 100**2 == pytest.approx(paper["variance"])
    assert (paper["layers"].count(",") + 1 == n_layer - 1) == (n_layer >= 6)
    stds = comparison.layers.filter(pl.col("model") == f"crate-{n_layer}l")["std"].to_list()
    assert [r["std"] / 100 for r in layers] == pytest.approx(stds)


def test_two_models_that_share_a_label_are_never_merged(tmp_path):
    """Same run name and step, other weights (issue 13.9): each keeps its own series, named by its hash."""
    one = [{**r, "model_sha256": "a" * 64} for r in rows("run@5", "crate", 3, "tar", [9.0, 9.0, 9.0])]
    other = [{**r, "model_sha256": "b" * 64} for r in rows("run@5", "crate", 3, "tar", [1.0, 1.0, 1.0])]
    comparison = compare(read_results([write_results(tmp_path / "one.parquet", one),
                                       write_results(tmp_path / "other.parquet", other)]))
    assert summary_of(comparison, f"run@5-{'a' * 12}")["mean"] == pytest.approx(0.09)
    assert summary_of(comparison, f"run@5-{'b' * 12}")["mean"] == pytest.approx(0.01)
