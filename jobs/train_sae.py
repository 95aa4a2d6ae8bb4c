"""Train a sparse autoencoder (paper §5: 16x ReLU, L1 8e-5, Adam 4e-4, resampling) on one layer's neurons of a
CRATE or GPT checkpoint; report reconstruction, L0, dead features and the loss recovered when it is spliced in.

    python jobs/train_sae.py --checkpoint gpt-2l.pt --layer 0
    python jobs/train_sae.py --checkpoint crate-tiny.pt --layer 1 data.context=64 sae.steps=2000 sae.buffer_size=65536
    python jobs/train_sae.py --checkpoint crate-tiny.pt --layer 1 --site 'blocks.{l}.hook_resid_post'   # any hook point
    python jobs/interpret.py ... --features sae:sae-gpt-2l-layer0/sae.pt        # score its features

Rerunning the same command resumes from the last checkpoint in the output directory.
"""

import sys

from crate.cli import Flag, parse_config, run_job, setup_logging
from crate.sae.job import TrainSAEConfig, describe_sae, run_sae_training

FLAGS = [
    Flag("--checkpoint", "checkpoint", "model checkpoint (CRATE or GPT)", "text", "PATH"),
    Flag("--layer", "layer", "layer whose neurons the SAE encodes"),
    Flag("--site", "site", "hook point it encodes instead, {l} = the layer (blocks.{l}.hook_resid_post)", "text"),
    Flag("--corpus", "data.train", "corpus URI of the activation stream", "text", "URI"),
    Flag("--steps", "sae.steps", "SAE training steps"),
    Flag("--output-dir", "output_dir", "where sae.pt and the resumable state go", "text", "DIR"),
]


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(TrainSAEConfig, __doc__, argv, flags=FLAGS)
    print(describe_sae(*run_sae_training(config)))


if __name__ == "__main__":
    sys.exit(run_job(main))
