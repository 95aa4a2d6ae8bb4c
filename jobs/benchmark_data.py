"""Data pipeline throughput and memory on this machine's CPUs: one JSON line per measurement, then a table.

    python jobs/benchmark_data.py                               # the shared Pile stand-in when present
    python jobs/benchmark_data.py corpus=/data/pile-sample files=4 read_tasks=[1,2,4,8]
"""

import json
import sys

from crate.cli import parse_config, run_job, setup_logging
from crate.bench.data import DataBenchmarkConfig, benchmark_data, summary


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(DataBenchmarkConfig, __doc__, argv)
    results = []
    for result in benchmark_data(config):
        print(json.dumps(result), flush=True)
        results.append(result)
    print(summary(results))


if __name__ == "__main__":
    sys.exit(run_job(main))
