"""Tokenize a corpus once into uint16 token shards + index (memory-mapped by training and read_blocks).

    python jobs/pretokenize.py CORPUS OUT                       # any corpus URI: path, dir, glob, pile://val, stdlib://train
    python jobs/pretokenize.py pile://train /data/pile-train include_sets=[Github] shard_bytes=268435456
    python jobs/pretokenize.py CORPUS OUT --local               # no Ray: one process

Resumable: rerun the same command after an interruption and finished shards are kept. `key=value` overrides
set the fields below (text_field, include_sets, exclude_sets, pile_url, max_document_bytes, ...).
"""

import sys

from crate.cli import parse_config, run_job, setup_logging
from crate.data import pretokenize
from crate.data.config import PRETOKENIZE_FLAGS, PretokenizeConfig


def main(argv=None) -> int:
    setup_logging()
    config, _ = parse_config(PretokenizeConfig, __doc__, argv, flags=PRETOKENIZE_FLAGS, positional=("corpus", "out"))
    index = pretokenize(config.corpus, config.out, config, config.shard_bytes, use_ray=not config.local)
    print(f"{config.out}: {index['n_tokens']:,} tokens in {len(index['shards'])} shards; {index['stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
