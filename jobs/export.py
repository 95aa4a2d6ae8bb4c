"""Convert a model between the native checkpoint and a Hugging Face directory (safetensors).

    python jobs/export.py --checkpoint runs/crate-2l/checkpoint_000010 --to hf --output hf-crate-2l
    python jobs/export.py --checkpoint gpt-2l.pt --to hf --output hf-gpt-2l          # a stock GPT-2
    python jobs/export.py --checkpoint hf-crate-2l --to native --output crate-2l.pt   # and back
"""

import sys

from crate.cli import Flag, parse_config, setup_logging
from crate.interop.export import ExportConfig, run_export

FLAGS = [
    Flag("--checkpoint", "checkpoint", "native checkpoint (file or training checkpoint dir); for --to native a HF dir",
         "text", "PATH"),
    Flag("--to", "to", "hf (a Hugging Face directory) or native (a model file)", "text", "FORMAT"),
    Flag("--output", "output", "the directory (--to hf) or model file (--to native) to write", "text", "PATH"),
]


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(ExportConfig, __doc__, argv, flags=FLAGS)
    print(run_export(config))


if __name__ == "__main__":
    sys.exit(main())
