"""Pretrain CRATE-LM or its GPT baseline.

    python jobs/pretrain.py                                  # the quickstart recipe on a local Ray instance
    python jobs/pretrain.py --config crate-2l-pile train.num_workers=4
    ray job submit --working-dir . -- python jobs/pretrain.py --config smoke
"""

import sys

from crate.cli import parse_config, run_job, setup_logging
from crate.train import PretrainConfig, launch


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(PretrainConfig, __doc__, argv, default_source="quickstart")
    print(launch(config).summary())


if __name__ == "__main__":
    sys.exit(run_job(main))
