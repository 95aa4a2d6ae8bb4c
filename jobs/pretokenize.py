"""Tokenize a corpus once into uint16 token shards + index (memory-mapped by training and read_blocks).

    python jobs/pretokenize.py CORPUS OUT                       # any corpus URI: path, dir, glob, pile://val, stdlib://train
    python jobs/pretokenize.py pile://train /data/pile-train include_sets=[Github] shard_bytes=268435456
    python jobs/pretokenize.py CORPUS OUT --local               # no Ray: one process

Resumable: rerun the same command after an interruption and finished shards are kept. `key=value` overrides
set DataConfig fields (text_field, include_sets, exclude_sets, pile_url, max_document_bytes, ...).
"""

import argparse
import sys

from crate.cli import run_job, setup_logging
from crate.config import load_config
from crate.data import DataConfig, pretokenize


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("out")
    parser.add_argument("--shard-bytes", type=int, default=64 * 2**20, help="input bytes per shard (default 64 MiB)")
    parser.add_argument("--local", action="store_true", help="tokenize in this process instead of Ray tasks")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(DataConfig, None, args.overrides)
    index = pretokenize(args.corpus, args.out, cfg, args.shard_bytes, use_ray=not args.local)
    print(f"{args.out}: {index['n_tokens']:,} tokens in {len(index['shards'])} shards; {index['stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
