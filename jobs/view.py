"""Build the static neuron viewer from interpretability outputs (and steering runs); log it to MLflow.

    python jobs/view.py interp-crate-12l/ interp-gpt-12l/ --steering steering/steering.json --output-dir viewer
    # then open viewer/index.html in a browser (no server needed)
"""

import sys

from crate.cli import Flag, parse_config, run_job, setup_logging
from crate.results.viewer import ViewerConfig, run_viewer

FLAGS = [
    Flag("--steering", "steering", "steering.json from jobs/steer.py (repeat for several)", "texts", "PATH"),
    Flag("--output-dir", "output_dir", "where the viewer folder goes", "text", "DIR"),
]


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(ViewerConfig, __doc__, argv, flags=FLAGS, positional="inputs")
    index = run_viewer(config)
    print(f"neuron viewer: {index.resolve().as_uri()}")


if __name__ == "__main__":
    sys.exit(run_job(main))
