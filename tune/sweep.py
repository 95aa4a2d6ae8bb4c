"""Sweep CRATE's ISTA sparsity λ and step size η (or any other pretraining field) with Ray Tune. Every trial is
a normal pretraining run, tracked in MLflow as a child of the sweep's parent run.

    python tune/sweep.py                                                # a 2 x 2 grid of tiny trials (tune/quickstart.yaml)
    python tune/sweep.py --config tune/ista-grid.yaml
    python tune/sweep.py --config tune/ista.yaml name=ista-1 --resume      # continue an interrupted sweep
    ray job submit --working-dir . -- python tune/sweep.py --config tune/ista.yaml name=ista-1
"""

import sys
from pathlib import Path

from crate.cli import config_parser, parse_config, run_job, setup_logging
from crate.sweep import SweepConfig, run_sweep


def main(argv=None) -> None:
    setup_logging()
    parser = config_parser(SweepConfig, __doc__, default_source=str(Path(__file__).with_name("quickstart.yaml")))
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep called `name` (same config): finished trials are not re-run")
    config, args = parse_config(SweepConfig, __doc__, argv, parser=parser)
    result = run_sweep(config, resume=args.resume)
    print(result.summary())


if __name__ == "__main__":
    sys.exit(run_job(main))
