"""Documents, GPT-2 tokens and bytes per pile_set_name, plus skipped records by reason (exit 0 if readable).

    python jobs/corpus_stats.py ../shared/corpus/val.jsonl.zst
    python jobs/corpus_stats.py 'data/*.jsonl.zst' stdlib://val /data/pile-train text_field=content
"""

import sys

from crate.cli import parse_config, run_job
from crate.data.config import CorpusStatsConfig
from crate.data.stats import corpus_stats


def main(argv=None) -> int:
    config, _ = parse_config(CorpusStatsConfig, __doc__, argv, positional="paths")
    stats = corpus_stats(config.paths, config)
    print(stats.report())
    return 0 if stats.readable else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
