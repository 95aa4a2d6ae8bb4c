"""The interpretability job under faults, fault first (issue 13 §9-12, 18 §10, 19 §4/7/8): a model known by its
content, failed rows retried and counted, a dead or hanging backend, a garbage line in the write-ahead log, remote
checkpoints, defaults that follow the model, GPUs that are asked for and absent. Single-process (scoring in the
driver, `workers.actors=0`), tiny models, a real HTTP server on loopback."""

import importlib.util
import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from crate.config import load_config
from crate.errors import ConfigError
from crate.interp import InterpConfig, run_interpretability
from crate.model import build_model, save_model
from test_interp_http import FakeOpenAI

_spec = importlib.util.spec_from_file_location("interpret_job", Path(__file__).parents[1] / "jobs" / "interpret.py")
interpret_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interpret_job)
from test_interp_job import subject  # noqa: F401 - the same tiny checkpoint and corpus (a module fixture)


def overrides(subject, out=None, **extra) -> list[str]:
    base = {"checkpoint": subject / "tiny.pt", "corpus": subject / "corpus.jsonl",
            "records.blocks": 12, "records.window": 16, "records.top": 10,
            "records.random": 10, "records.quantile_pool": 20, "records.per_quantile": 2, "records.batch_blocks": 4,
            "sample": 4, "metrics": "[tar,random]", "workers.actors": 0, "tracking.enabled": "false", **extra}
    if out is not None:
        base["output_dir"] = out
    return [f"{k}={v}" for k, v in base.items()]


def job_config(subject, out=None, **extra) -> InterpConfig:
    return load_config(InterpConfig, None, overrides(subject, out, **extra))


# -- 13.12 remote checkpoints: every job that takes a checkpoint accepts what load_model accepts ------------------

def test_every_checkpoint_job_accepts_a_storage_uri(subject, tmp_path):
    from crate.interp.job import Subject
    from crate.sae.job import TrainSAEConfig, run_sae_training
    from crate.results.steering import SteerConfig, run_steering
    from crate.tracking import TrackingConfig

    uri = f"file://{subject / 'tiny.pt'}"
    loaded = Subject.load(uri)
    assert loaded.checkpoint == uri and loaded.model.n_layer == 2
    with pytest.raises(ConfigError) as error:
        Subject.load(f"file://{tmp_path / 'missing.pt'}")
    assert error.value.field == "checkpoint" and "missing.pt" in str(error.value)

    effects = run_steering(SteerConfig(checkpoint=uri, layer=0, neurons=[1], value=5.0, new_tokens=2,
                                       output_dir=str(tmp_path / "steer"), device="cpu",
                                       tracking=TrackingConfig(enabled=False)))
    assert effects and effects[0].checkpoint == uri  # the viewer matches effects to results by this name

    with pytest.raises(ConfigError) as error:  # past the checkpoint: the model loaded, then its layers were checked
        run_sae_training(TrainSAEConfig(checkpoint=uri, layer=7, output_dir=str(tmp_path / "sae"), device="cpu",
                                        tracking=TrackingConfig(enabled=False)))
    assert error.value.field == "layer"


# -- 18.10 defaults that depend on the model follow the checkpoint; the summary reads as a table -----------------

def test_collection_follows_the_checkpoints_context_and_the_summary_is_a_table(subject, tmp_path, capsys):
    from crate.interp.schema import read_provenance
    interpret_job.main([f"--output={tmp_path}", *overrides(subject, sample=2, metrics="[tar,random,anthropic]",
                                             **{"anthropic_records.blocks": 12, "anthropic_records.per_quantile": 4,
                                                "anthropic_records.quantile_pool": 40})])
    printed = capsys.readouterr().out
    lengths = {read_provenance(d / "layer_00.parquet")["collection"]["block_length"]
               for d in (tmp_path / "records").iterdir()}
    assert lengths == {64}  # crate-tiny's context; the defaults say 1024 only for a model that has it
    assert not printed.lstrip().startswith(("[", "{")), printed[:200]  # not a JSON dump
    header, *rows = [line for line in printed.splitlines() if line.startswith("|")][:1] + \
        [line for line in printed.splitlines() if line.startswith("| crate-paper")]
    assert "metric" in header and "mean" in header and "failed" in header, printed
    assert sorted(row.split("|")[2].strip() for row in rows) == ["anthropic", "random", "tar"], printed
    summary = json.loads((tmp_path / "summary.json").read_text())  # the JSON stays in the output folder
    assert {m["metric"] for m in summary["models"]} == {"tar", "random", "anthropic"}
    explicit = job_config(subject, **{"records.block_length": 32})
    assert explicit.records.block_length == 32  # what the user sets is kept


# -- 13.9 a model is known by its content as well as its name ----------------------------------------------------

def test_two_models_with_one_name_never_share_records_or_results(subject, tmp_path, monkeypatch):
    from crate.interp.job import Subject

    for seed, run in ((0, "a"), (1, "b")):  # two platform checkpoints: same run name, same step, other weights
        torch.manual_seed(seed)
        save_model(build_model("crate-tiny"), tmp_path / run / "model.pt", run_name="tiny-run", step=5)
    a, b = Subject.load(str(tmp_path / "a" / "model.pt")), Subject.load(str(tmp_path / "b" / "model.pt"))
    assert a.model_id == b.model_id == "tiny-run@5" and a.sha256 != b.sha256 and len(a.sha256) == 64
    assert Subject.load(f"file://{tmp_path / 'a' / 'model.pt'}").sha256 == a.sha256  # content, not location

    monkeypatch.chdir(tmp_path)  # the default output folder is per model, absolute, under ./interp
    monkeypatch.delenv("CRATE_STORAGE_PATH", raising=False)  # (set, a local one holds interp/ instead)
    first = run_interpretability(job_config(subject, checkpoint=tmp_path / "a" / "model.pt"))
    second = run_interpretability(job_config(subject, checkpoint=tmp_path / "b" / "model.pt"))
    assert first["output_dir"] == str(tmp_path / "interp" / f"tiny-run@5-{a.sha256[:12]}")
    assert second["output_dir"] == str(tmp_path / "interp" / f"tiny-run@5-{b.sha256[:12]}")
    for summary, model in ((first, a), (second, b)):
        rows = pq.read_table(Path(summary["output_dir"]) / "results.parquet").to_pylist()
        assert {r["model_sha256"] for r in rows} == {model.sha256} and summary["model_sha256"] == model.sha256

    with pytest.raises(ConfigError) as error:  # b's job pointed at a's folder: refused, naming both
        run_interpretability(job_config(subject, first["output_dir"], checkpoint=tmp_path / "b" / "model.pt"))
    assert error.value.field == "output_dir" and a.sha256[:12] in str(error.value) and b.sha256[:12] in str(error.value)


# -- 13.11 a garbage line in the middle of the write-ahead log ----------------------------------------------------

def test_a_garbage_line_in_the_middle_of_the_log_is_quarantined_and_the_job_resumes(subject, tmp_path, caplog):
    from crate.interp.store import LOG_FILE, QUARANTINE_FILE

    first = run_interpretability(job_config(subject, tmp_path))
    table = pq.read_table(tmp_path / "results.parquet")
    extra = [{**row, "neuron": 900 + i, "score": None, "created_at": 0} for i, row in enumerate(table.to_pylist()[:2])]
    (tmp_path / LOG_FILE).write_bytes(json.dumps(extra[0]).encode() + b"\n" + b'{"model": "tiny-run@5", "lay\xff\n'
                                      + json.dumps(extra[1]).encode() + b"\n")
    with caplog.at_level(logging.WARNING, logger="crate.interp.store"):
        again = run_interpretability(job_config(subject, tmp_path))  # resumes instead of a bare JSONDecodeError
    assert f"{tmp_path / LOG_FILE}:2" in caplog.text
    (kept,) = [json.loads(line) for line in (tmp_path / QUARANTINE_FILE).read_text().splitlines()]
    assert kept["file"] == LOG_FILE and kept["line"] == 2 and kept["text"].startswith('{"model": "tiny-run@5", "lay')
    assert again["quarantined"] == 1 and first["models"] == again["models"]
    after = pq.read_table(tmp_path / "results.parquet")
    assert after.num_rows == table.num_rows + 2  # the readable rows around the garbage were kept


# -- 13.10 failed rows: retried by a rerun, counted, fatal above a share; a breaker; bounded timeouts --------------

def http_overrides(server, **extra) -> dict:
    return {"backend.kind": "http", "backend.explainer_model": "fake", "backend.base_url": server.url,
            "backend.backoff_s": 0.01, "backend.backoff_max_s": 0.02, "workers.concurrency": 1,
            "backend.prompt_format": "crate-v1", "random_only": "rescore", **extra}  # the fake server's format


def test_a_backend_that_dies_fails_the_job_and_a_rerun_retries_only_the_failed_rows(subject, tmp_path, capsys):
    server = FakeOpenAI()
    try:
        server.faults.extend(["ok"] * 8 + ["500"] * 1000)  # 4 features (explain + simulate each) then it dies
        assert interpret_job.main(overrides(subject, tmp_path, **http_overrides(server))) == 1  # the exit status
        err = capsys.readouterr().err
        assert "8 of 16 result rows failed" in err and "max_failed_share" in err, err
        assert len(server.requests) <= 8 + 3 + 1  # the breaker opened after 3 failures in a row (not 4 × 6 more)
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["failed_rows"] == 8 and summary["rows"] == 16
        first = {(r["layer"], r["neuron"], r["metric"]): r for r in pq.read_table(tmp_path / "results.parquet").to_pylist()}
        assert sum(r["status"] == "failed" for r in first.values()) == 8
        assert any("circuit open" in r["reason"] for r in first.values() if r["status"] == "failed")

        server.faults.clear()
        sent = len(server.requests)
        assert interpret_job.main(overrides(subject, tmp_path, **http_overrides(server))) == 0
        assert len(server.requests) - sent == 4 * 2  # only the 4 failed features were asked again
        after = {(r["layer"], r["neuron"], r["metric"]): r for r in pq.read_table(tmp_path / "results.parquet").to_pylist()}
        assert len(after) == 16 and all(r["status"] != "failed" for r in after.values())
        for key, row in first.items():
            if row["status"] != "failed":
                assert after[key] == row  # finished rows untouched
    finally:
        server.close()


def test_the_breaker_fails_fast_while_open_and_lets_one_call_through_after_its_cooldown():
    from crate.interp.backends import BackendError, CallCounter
    from crate.interp.backends.http import HTTPClient
    from crate.interp.config import BackendConfig

    server = FakeOpenAI()
    try:
        config = BackendConfig(kind="http", explainer_model="fake", base_url=server.url, backoff_s=0.0,
                               backoff_max_s=0.0, breaker_failures=3, breaker_cooldown_s=0.5)
        client, payload = HTTPClient(config, 0, CallCounter()), {"model": "fake", "messages": []}
        server.faults.extend(["500"] * 3)
        with pytest.raises(BackendError, match="circuit open"):
            client.post("chat/completions", payload)
        assert len(server.requests) == 3
        started = time.monotonic()
        with pytest.raises(BackendError, match="circuit open"):
            client.post("chat/completions", payload)
        assert len(server.requests) == 3 and time.monotonic() - started < 0.1  # not sent at all
        time.sleep(0.6)
        server.faults.extend(["400"])
        with pytest.raises(BackendError, match="HTTP 400"):  # the trial call reaches the server, which answers
            client.post("chat/completions", payload)
        assert len(server.requests) == 4
    finally:
        server.close()


def test_a_hanging_server_costs_one_bounded_deadline_not_six_timeouts():
    from crate.interp.backends import BackendError, CallCounter
    from crate.interp.backends.http import HTTPClient
    from crate.interp.config import BackendConfig

    defaults = BackendConfig()
    assert defaults.request_timeout_s == 60 and defaults.request_deadline_s == 180  # was 6 attempts × 120 s
    server = FakeOpenAI(latency_s=1.5)
    try:
        config = BackendConfig(kind="http", explainer_model="fake", base_url=server.url, request_timeout_s=0.3,
                               request_deadline_s=0.8, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=100)
        client = HTTPClient(config, 0, CallCounter())
        started = time.monotonic()
        with pytest.raises(BackendError, match="deadline"):
            client.post("chat/completions", {"model": "fake", "messages": []})
        assert time.monotonic() - started < 1.2
    finally:
        server.close()


# -- 19.7 records are fp32 on every device, and the collection id says so ----------------------------------------

def test_records_name_their_precision(subject, tmp_path):
    from crate.interp.schema import read_provenance

    run_interpretability(job_config(subject, tmp_path, metrics="[tar]"))
    (records,) = (tmp_path / "records").iterdir()
    provenance = read_provenance(records / "layer_00.parquet")
    assert provenance["precision"] == "float32"  # on this CPU; "float32+tf32" on CUDA, never the same id
    assert pq.read_schema(records / "layer_00.parquet").field("activations").type.value_type == "float"


# -- 19.4 collection and HF backends on GPUs: asked for and absent is an error naming the field -----------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_job_configured_for_gpus_that_sees_none_fails_at_start_naming_the_field(subject, tmp_path):
    from crate.interp.config import BackendConfig
    from crate.interp.distributed import CollectionWorker, ScoringWorker
    from crate.interp.job import Subject

    sha = Subject.load(str(subject / "tiny.pt")).sha256
    cases = {"workers.collect_gpus": lambda: CollectionWorker(str(subject / "tiny.pt"), "neurons", sha, 1.0).ready(),
             "workers.gpus_per_actor": lambda: ScoringWorker(BackendConfig(), 0, 1.0).identity(),
             "device": lambda: run_interpretability(job_config(subject, tmp_path / "a", device="cuda")),
             "workers.gpus_per_actor ": lambda: run_interpretability(  # scoring in the driver, which has no GPU
                 job_config(subject, tmp_path / "b", **{"workers.gpus_per_actor": 1}))}
    for field, start in cases.items():
        with pytest.raises(ConfigError) as error:
            start()
        assert error.value.field == field.strip(), error.value
    assert not (tmp_path / "a" / "records").exists() and not (tmp_path / "b" / "records").exists()


@pytest.mark.e2e
def test_the_cluster_interpret_job_collects_on_gpus():
    import shlex

    from test_platform import named, render

    for kustomization in ("base", "overlays/gpu-prod"):
        docs = render(kustomization)
        args = dict(a.split("=", 1) for a in shlex.split(named(docs, "RayJob", "crate-interpret")["spec"]["entrypoint"])
                    if "=" in a and not a.startswith("-"))
        assert int(args["workers.collect_actors"]) >= 1 and float(args["workers.collect_gpus"]) >= 1, kustomization
