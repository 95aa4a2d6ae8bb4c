"""Re-shard a raw corpus (e.g. the Pile's ~15 GB .jsonl.zst files) into ~256 MB Parquet parts, once.

    python jobs/reshard.py pile://train /data/pile-train-parquet           # then data.train=/data/pile-train-parquet
    python jobs/reshard.py CORPUS OUT --file-bytes 67108864 include_sets=[Github] --local

Resumable (finished input files are skipped); `key=value` sets the fields below (text_field, pile_url, ...).
"""

import sys

from crate.cli import parse_config, run_job, setup_logging
from crate.data.config import RESHARD_FLAGS, ReshardConfig
from crate.data.reshard import reshard


def main(argv=None) -> int:
    setup_logging()
    config, _ = parse_config(ReshardConfig, __doc__, argv, flags=RESHARD_FLAGS, positional=("corpus", "out"))
    print(f"{config.out}: {reshard(config.corpus, config.out, config, config.file_bytes, use_ray=not config.local)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
