"""Re-shard a raw corpus (e.g. the Pile's ~15 GB .jsonl.zst files) into ~256 MB Parquet parts, once.

    python jobs/reshard.py pile://train /data/pile-train-parquet           # then data.train=/data/pile-train-parquet
    python jobs/reshard.py CORPUS OUT --file-bytes 67108864 include_sets=[Github] --local

Resumable (finished input files are skipped); `key=value` sets DataConfig fields (text_field, pile_url, ...).
"""

import argparse
import sys

from crate.cli import run_job, setup_logging
from crate.config import load_config
from crate.data import DataConfig
from crate.data.reshard import reshard


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("out")
    parser.add_argument("--file-bytes", type=int, default=256 * 2**20, help="text per Parquet part (256 MiB)")
    parser.add_argument("--local", action="store_true", help="convert in this process instead of Ray tasks")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(DataConfig, None, args.overrides)
    print(f"{args.out}: {reshard(args.corpus, args.out, cfg, args.file_bytes, use_ray=not args.local)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
