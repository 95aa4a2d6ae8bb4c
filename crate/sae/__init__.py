"""Sparse-autoencoder baselines (paper §5): a 16× ReLU SAE with an L1 penalty trained on a GPT layer's MLP
activations or on CRATE's ISTA codes, evaluated inside the model, and usable as a feature source for the
interpretability pipeline (`--features sae:PATH`).

    trainer = SAETrainer(SAETrainConfig(), d_in=3072)
    train_sae(trainer, batches)                       # any iterator of (N, d_in) activation tensors
    evaluation = evaluate_sae(model, layer, trainer.sae, eval_blocks)
    save_sae(trainer.sae, "sae.pt", source)           # load_sae("sae.pt") -> (sae, source)

Torch only: MLflow is imported by the job (`crate.sae.job`), never by the core.
"""

from crate.sae.activations import LayerActivations, shuffled_batches
from crate.sae.evaluate import SAEEvaluation, evaluate_sae, replaced_neurons
from crate.sae.model import SAEConfig, SAESource, SparseAutoencoder, load_sae, save_sae
from crate.sae.train import SAETrainConfig, SAETrainer, train_sae

__all__ = [
    "LayerActivations", "SAEConfig", "SAEEvaluation", "SAESource", "SAETrainConfig", "SAETrainer",
    "SparseAutoencoder", "evaluate_sae", "load_sae", "replaced_neurons", "save_sae", "shuffled_batches",
    "train_sae",
]
