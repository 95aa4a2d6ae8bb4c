"""The interpretability results store at the paper's scale: 110k result rows written the way the job writes them
(one append per finished feature, its two metrics' rows together; a compaction every `compact_every` rows; the
table read and results.parquet written at the end), by the SQLite store and by the store it replaced (the
write-ahead log folded into results.parquet at every compaction), read from git at `--old-commit`.

    python experiments/interp_store_benchmark.py                      # 110,000 rows, compact_every=500
    python experiments/interp_store_benchmark.py --rows 20000 --stores parquet-rewrite

One JSON line per store: seconds appending, compacting and finishing, and the slowest compaction.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crate.interp.schema import RESULTS_SCHEMA  # noqa: E402
from crate.interp.store import ResultStore  # noqa: E402

OLD_COMMIT = "bd44095"  # the last commit with the parquet-rewriting store


def old_store_class(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:crate/interp/store.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_store", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ResultStore


def feature_rows(layer: int, neuron: int) -> list[dict]:
    """The two rows (tar, random) of one scored feature, sized like the job's (explanation, 20 excerpt names,
    20 simulated excerpts of 64 tokens of seeded random values: as incompressible as real simulations)."""
    rng = np.random.default_rng([layer, neuron])
    base = {name: None for name in RESULTS_SCHEMA.names}
    base.update(model="crate-12l@60000", model_sha256="0" * 64, features="neurons", layer=layer, neuron=neuron,
                protocol="crate-paper", backend="http:llama-3-70b", prompt_version="v3", seed=0, status="scored",
                explanation="fires on the token after an opening parenthesis in code", n_defaulted=0, attempts=1,
                duration_s=3.2, feature_kind="neurons", simulator_kind="echo", explainer_model="llama-3-70b",
                checkpoint="/runs/crate-12l/model.pt", preset="crate-12l", arch="crate", n_layer=12,
                corpus="pile://val", records_id="r" * 16, job_run_id="j" * 32, code_version="c" * 40,
                created_at=1_700_000_000_000 + neuron)
    return [{**base, "metric": metric, "score": 0.1 + (neuron % 7) / 10,
             "excerpts": [f"top/{i}" for i in range(20)],
             "simulated": rng.random((20, 64), dtype=np.float32).tolist()} for metric in ("tar", "random")]


def measure(store_class, rows: int, compact_every: int, directory: Path) -> dict:
    store = store_class(directory)
    append_s = compact_s = slowest = 0.0
    compactions = 0
    features_per_layer = rows // 2 // 12 + 1
    for feature in range(rows // 2):
        rows_of_feature = feature_rows(feature // features_per_layer, feature % features_per_layer)
        started = time.perf_counter()
        store.append(rows_of_feature)
        append_s += time.perf_counter() - started
        if store.unfolded >= compact_every:
            started = time.perf_counter()
            store.compact()
            took = time.perf_counter() - started
            compact_s, slowest, compactions = compact_s + took, max(slowest, took), compactions + 1
    started = time.perf_counter()
    store.compact()
    if hasattr(store, "write_results"):
        store.write_results()
    table = store.table()
    finish_s = time.perf_counter() - started
    store.close()
    assert table.num_rows == rows // 2 * 2
    return {"rows": table.num_rows, "compactions": compactions, "append_s": round(append_s, 1),
            "compact_s": round(compact_s, 1), "slowest_compaction_s": round(slowest, 3),
            "finish_s": round(finish_s, 1), "total_s": round(append_s + compact_s + finish_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=110_000)
    parser.add_argument("--compact-every", type=int, default=500)
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--stores", default="sqlite,parquet-rewrite")
    parser.add_argument("--dir", default=None, help="where the stores write (default: a temporary folder)")
    args = parser.parse_args()
    stores = {"sqlite": lambda: ResultStore, "parquet-rewrite": lambda: old_store_class(args.old_commit)}
    for name in args.stores.split(","):
        store_class = stores[name]()
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            print(json.dumps({"store": name, **measure(store_class, args.rows, args.compact_every, Path(directory))}),
                  flush=True)


if __name__ == "__main__":
    main()
