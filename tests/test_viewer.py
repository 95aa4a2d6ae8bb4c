"""The static neuron viewer: data files from interpretability outputs, and the page itself in headless Chromium."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from crate.interp.schema import (COMPLETE_MARKER, FEATURES_SCHEMA, RECORDS_SCHEMA, RESULTS_SCHEMA,
                                 write_parquet)
from crate.results.viewer import ViewerConfig, build_viewer
from crate.tokenizer import gpt2_tokenizer

_spec = importlib.util.spec_from_file_location("view_job", Path(__file__).parents[1] / "jobs" / "view.py")
view_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(view_job)

N_FEATURES = {0: 150, 1: 20}  # layer 0 spans two list pages and two excerpt chunks
BANANA_FEATURE = 137
CHECKPOINT = "/models/crate-tiny.pt"


def table(schema, rows):
    return pa.Table.from_pydict({name: [r.get(name) for r in rows] for name in schema.names}, schema=schema)


@pytest.fixture(scope="module")
def interp_dir(tmp_path_factory):
    """An interpretability output directory as jobs/interpret.py leaves it: records, feature stats, results."""
    root = tmp_path_factory.mktemp("interp")
    tokenizer = gpt2_tokenizer()
    banana = tokenizer.encode(" banana")[0]
    filler = tokenizer.encode(" the cat sat on a mat and then")
    provenance = {"model": "crate-tiny-abc", "features": "neurons", "checkpoint": CHECKPOINT, "arch": "crate",
                  "n_layer": 2}
    collection = root / "records" / "c0"
    stats, results = [], []
    for layer, n in N_FEATURES.items():
        rows = []
        for neuron in range(n):
            for kind, ranks in (("top", 3), ("random", 2)):
                for rank in range(ranks):
                    tokens = list(filler)
                    activations = [0.0] * len(tokens)
                    if kind == "top":
                        tokens[3] = banana if neuron == BANANA_FEATURE else tokens[3]
                        activations[3] = 2.0 - rank / 2
                    rows.append({"layer": layer, "neuron": neuron, "kind": kind, "rank": rank, "bin": -1,
                                 "activation": max(activations), "block": rank, "start": 0, "focus": 3,
                                 "tokens": tokens, "activations": activations})
            stats.append({"layer": layer, "neuron": neuron, "count": 1000, "mean": 0.1, "variance": 0.2,
                          "density": 0.01 * (neuron % 7), "max": 2.0, "quantile_boundaries": [0.0]})
            for metric in ("tar", "random"):
                score = math.nan if neuron % 10 == 9 else (0.9 if neuron == BANANA_FEATURE else neuron / 1000)
                results.append({"model": "crate-tiny-abc", "features": "neurons", "layer": layer, "neuron": neuron,
                                "protocol": "crate-paper", "metric": metric, "backend": "token-set",
                                "prompt_version": "v1", "seed": 0, "score": score,
                                "status": "undefined" if math.isnan(score) else "scored",
                                "explanation": "bananas and other fruit" if neuron == BANANA_FEATURE else f"unit {neuron}",
                                "feature_kind": "neurons", "arch": "crate", "n_layer": 2, "checkpoint": CHECKPOINT,
                                "records_id": "c0"})
        write_parquet(table(RECORDS_SCHEMA, rows), collection / f"layer_{layer:02d}.parquet", RECORDS_SCHEMA, provenance)
    write_parquet(table(FEATURES_SCHEMA, stats), collection / "features.parquet", FEATURES_SCHEMA, provenance)
    (collection / COMPLETE_MARKER).write_text("{}")
    write_parquet(table(RESULTS_SCHEMA, results), root / "results.parquet", RESULTS_SCHEMA)
    steering = [{"layer": 0, "neurons": [BANANA_FEATURE], "value": 10.0, "prompt": "1 2 3 4 5", "checkpoint": CHECKPOINT,
                 "increased": [{"token": " banana", "token_id": banana, "before": 0.01, "after": 0.6, "delta": 0.59}],
                 "decreased": [{"token": " 6", "token_id": 718, "before": 0.3, "after": 0.1, "delta": -0.2}],
                 "sweep_tokens": [], "kl_divergence": 1.5, "generation": " 6 7 8", "steered_generation": " banana"}]
    (root / "steering.json").write_text(json.dumps(steering))
    return root


def payload(path: Path):
    text = path.read_text(encoding="utf-8")
    key, _, body = text.removeprefix("CRATE_VIEWER.register(").partition(",")
    return json.loads(key), json.loads(body.rstrip().removesuffix(");"))


def test_the_data_files_hold_layers_chunks_and_steering(interp_dir, tmp_path):
    config = ViewerConfig(inputs=[str(interp_dir)], steering=[str(interp_dir / "steering.json")],
                          output_dir=str(tmp_path / "viewer"), top_excerpts=2, chunk_size=64,
                          tracking={"enabled": False})
    index = build_viewer(config)
    assert index.name == "index.html" and (index.parent / "viewer.js").is_file()
    key, data = payload(index.parent / "data" / "index.js")
    model = data["models"][0]
    assert key == "index" and model["label"] == "CRATE 2L crate-tiny-abc" and model["metrics"] == ["tar", "random"]
    assert [(l["layer"], l["n_features"]) for l in model["layers"]] == [(0, 150), (1, 20)]
    key, layer = payload(index.parent / "data" / "m0" / "layer-00.js")
    banana = layer["features"][BANANA_FEATURE]
    assert key == "m0/layer-00" and banana["id"] == BANANA_FEATURE
    assert banana["scores"] == {"tar": 0.9, "random": 0.9} and banana["explanations"]["tar"] == "bananas and other fruit"
    assert banana["steering"][0]["increased"][0]["token"] == " banana"
    assert layer["features"][9]["scores"]["tar"] is None and layer["features"][9]["status"]["tar"] == "undefined"
    chunks = sorted(p.name for p in (index.parent / "data" / "m0" / "layer-00").iterdir())
    assert chunks == ["chunk-0000.js", "chunk-0001.js", "chunk-0002.js"]
    key, chunk = payload(index.parent / "data" / "m0" / "layer-00" / "chunk-0002.js")
    excerpts = chunk["features"][str(BANANA_FEATURE)]
    assert len(excerpts["top"]) == 2 and len(excerpts["random"]) == 2  # top_excerpts=2 of the 3 stored
    tokens, activations = excerpts["top"][0]
    assert chunk["strings"][tokens[3]] == " banana" and activations[3] == 2.0


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the viewer test needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


@pytest.mark.e2e
def test_a_researcher_finds_a_neuron_and_sees_its_explanation_and_shaded_tokens(interp_dir, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    view_job.main([str(interp_dir), "--steering", str(interp_dir / "steering.json"), "--output-dir",
                   str(tmp_path / "viewer"), f"tracking.uri={uri}", "tracking.system_metrics=false"])
    wait = WebDriverWait(browser, 20)
    browser.get((tmp_path / "viewer" / "index.html").as_uri())  # a local file: no server
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#features tbody tr")) == 100)
    assert browser.find_element(By.ID, "page-info").text == "150 features · page 1 / 2"
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    # sorted by score: the best-explained neuron is first; the filter finds it by its explanation as well
    assert browser.find_element(By.CSS_SELECTOR, "#features tbody tr").get_attribute("data-feature") == str(BANANA_FEATURE)
    browser.find_element(By.ID, "filter").send_keys("banana")
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#features tbody tr")) == 1)
    browser.find_element(By.CSS_SELECTOR, f'#features tbody tr[data-feature="{BANANA_FEATURE}"]').click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#detail .tok"))
    detail = browser.find_element(By.ID, "detail")
    assert "bananas and other fruit" in detail.find_element(By.CSS_SELECTOR, ".explanation-text").text
    shaded = [t for t in detail.find_elements(By.CSS_SELECTOR, ".tok") if t.get_attribute("style")]
    assert shaded and shaded[0].text == " banana" and "255, 136, 0" in shaded[0].get_attribute("style")
    assert "most increased" in detail.text and '" banana" 1.0% → 60%' in detail.text
    assert browser.current_url.endswith(f"#model=0&layer=0&feature={BANANA_FEATURE}")
    # a deep link to another layer's feature
    browser.get((tmp_path / "viewer" / "index.html").as_uri() + "#model=0&layer=1&feature=3")
    wait.until(lambda b: "unit 3" in b.find_element(By.ID, "detail").text)
    assert browser.find_element(By.ID, "layer").get_attribute("value") == "1"

    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("crate-lm").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "viewer")} >= {
        "viewer/index.html", "viewer/viewer.js", "viewer/data"}


def test_two_models_that_share_a_label_are_two_entries(tmp_path):
    """Same run name and step, other weights (issue 13.9): the viewer never merges their features."""
    from crate.results.viewer.build import find_entries

    for name, sha in (("one", "a" * 64), ("other", "b" * 64)):
        rows = [{"model": "run@5", "model_sha256": sha, "features": "neurons", "layer": 0, "neuron": 0,
                 "protocol": "crate-paper", "metric": "tar", "backend": "token-set", "prompt_version": "v1",
                 "seed": 0, "score": 0.5, "status": "scored", "feature_kind": "neurons", "arch": "crate",
                 "n_layer": 1, "checkpoint": f"/{name}.pt"}]
        write_parquet(table(RESULTS_SCHEMA, rows), tmp_path / name / "results.parquet", RESULTS_SCHEMA)
    entries = find_entries([tmp_path / "one", tmp_path / "other"])
    assert sorted(e.model for e in entries) == [f"run@5-{'a' * 12}", f"run@5-{'b' * 12}"]


def test_a_stream_window_cut_at_the_streams_end_shows_only_its_tokens(tmp_path):
    """crate-paper's stream windows store the positions past the token stream's ends as token -1 (crate.interp.
    records); the viewer shows the window without them instead of failing to decode -1."""
    import pyarrow.parquet as pq

    from crate.results.viewer.build import read_excerpt_records

    path = tmp_path / "layer_00.parquet"
    pq.write_table(pa.table({"neuron": [0], "kind": ["top"], "rank": [0], "tokens": [[-1, -1, 464, 3290]],
                             "activations": [[float("nan"), float("nan"), 0.5, 2.0]]}), path)
    [(tokens, activations)] = read_excerpt_records(path, ViewerConfig(inputs=[str(tmp_path)]))[0]["top"]
    assert tokens == [464, 3290] and activations == [0.5, 2.0]
