"""The paper's Table 2 from interpretability results: mean and variance across layers per model and metric
(last layer excluded for 6- and 12-layer models, and all layers), CRATE's relative improvement over GPT, and
the per-layer plot; markdown + CSV + PNG, logged to MLflow.

    python jobs/compare.py interp-crate-12l/ interp-gpt-12l/ interp-gpt-12l-sae-*/results.parquet
    python jobs/compare.py RESULTS... --metric tar --metric random output_dir=table2
"""

import sys

from crate.cli import Flag, parse_config, run_job, setup_logging
from crate.results.compare import CompareConfig, run_compare

FLAGS = [
    Flag("--metric", "metrics", "only these metrics (repeat or comma-separate)", "texts"),
    Flag("--protocol", "protocol", "only this protocol", "text"),
    Flag("--output-dir", "output_dir", "where table2.md/.csv and layers.png go", "text", "DIR"),
]


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(CompareConfig, __doc__, argv, flags=FLAGS, positional="results")
    _, written = run_compare(config)
    print(written[0].read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(run_job(main))
