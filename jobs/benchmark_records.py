"""Time the activation-record collector core: forward, stats, top, sample, windows, finalize, write.

    python jobs/benchmark_records.py                                   # CRATE-12L, 8000 × 1024 random tokens
    python jobs/benchmark_records.py corpus=/path/to/pile-standin/val.jsonl.zst   # a real corpus (8000 blocks)
    python jobs/benchmark_records.py preset=crate-1l records.blocks=64 device=cpu  # a CPU-sized run

Prints the result as JSON and writes it to `output`.
"""

import json
import sys
from pathlib import Path

from crate.cli import parse_config, run_job, setup_logging
from crate.bench.interp import RecordsBenchmarkConfig, benchmark_records


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(RecordsBenchmarkConfig, __doc__, argv)
    result = benchmark_records(config)
    Path(config.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(run_job(main))
