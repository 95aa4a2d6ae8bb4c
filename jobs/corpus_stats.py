"""Documents, GPT-2 tokens and bytes per pile_set_name, plus skipped records by reason (exit 0 if readable).

    python jobs/corpus_stats.py ../shared/corpus/val.jsonl.zst
    python jobs/corpus_stats.py 'data/*.jsonl.zst' stdlib://val /data/pile-train text_field=content
"""

import argparse
import sys

from crate.cli import run_job
from crate.config import load_config
from crate.data.config import DataConfig
from crate.data.stats import corpus_stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="file, directory, glob or corpus URI; "
                                                                 "key=value sets a DataConfig field")
    args = parser.parse_args(argv)
    overrides = [p for p in args.paths if "=" in p and "://" not in p.split("=", 1)[0]]
    cfg = load_config(DataConfig, None, overrides)
    stats = corpus_stats([p for p in args.paths if p not in overrides], cfg)
    print(stats.report())
    return 0 if stats.readable else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
