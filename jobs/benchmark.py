"""Training-step throughput, CRATE and GPT side by side, one JSON line per configuration (no Ray needed).

    python jobs/benchmark.py                                            # tiny presets, quickstart engine settings
    python jobs/benchmark.py presets=[crate-12l,gpt-12l] recipe=crate-12l-1gpu micro_batch_size=16
"""

import json
import sys

from crate.cli import parse_config, run_job, setup_logging
from crate.bench.train import StepBenchmarkConfig, benchmark_steps


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(StepBenchmarkConfig, __doc__, argv)
    for line in benchmark_steps(config):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(run_job(main))
