"""Clamp a neuron at every position and show what it does to the next token and to a generation (paper §4.4).

    python jobs/steer.py --checkpoint crate-1l.pt --layer 0 --neuron 2 --value 10 --prompt "1 2 3 4 5"
    python jobs/steer.py --checkpoint crate-1l.pt --layer 0 --neuron 2 --sweep 0,2,5,10,20      # how it grows
    python jobs/steer.py --checkpoint crate-1l.pt --top-explained 5 --results interp/results.parquet --value 10
    python jobs/steer.py --checkpoint gpt-1l.pt --layers all --neuron 2 --value 10     # the released GPT code's clamp
    python jobs/steer.py --checkpoint crate-1l.pt --site attn --layer 0 --neuron 5 --value 10   # its CRATE `attn` variant
"""

import sys

from crate.cli import Flag, parse_config, run_job, setup_logging
from crate.results.steering import SteerConfig, format_effect, run_steering

FLAGS = [
    Flag("--checkpoint", "checkpoint", "model checkpoint (CRATE or GPT)", "text", "PATH"),
    Flag("--layer", "layer", "layer of the neurons"),
    Flag("--layers", "layers", "'all': clamp the neurons in every layer (the released GPT code), 'one': in --layer",
         "text", "one|all"),
    Flag("--site", "site", "'neurons', or 'attn' (CRATE): channels 0..d-1 of the tied q=k=v projection", "text",
         "neurons|attn"),
    Flag("--neuron", "neurons", "neuron index (repeat, or comma-separate, to clamp several together)", "numbers", "I"),
    Flag("--value", "value", "clamp value"),
    Flag("--sweep", "sweep", "comma-separated clamp values, one effect each", "numbers", "V1,V2,..."),
    Flag("--prompt", "prompt", "prompt text", "text"),
    Flag("--top-explained", "top_explained", "steer the K best-scored neurons of --results", metavar="K"),
    Flag("--results", "results", "interpretability results table (results.parquet)", "text", "PATH"),
    Flag("--metric", "metric", "metric that ranks neurons for --top-explained", "text"),
]


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(SteerConfig, __doc__, argv, flags=FLAGS)
    for effect in run_steering(config):
        print(format_effect(effect), end="\n\n", flush=True)


if __name__ == "__main__":
    sys.exit(run_job(main))
