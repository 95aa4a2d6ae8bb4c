"""Neuron-level interpretability at scale: activation records, explanation, simulation and scoring.

Stages (each importable and runnable without Ray):
    records   collect.collect / RecordCollector      torch-only collector core, associative shard merges
              records.write_records / read_feature_records / export_openai
    explain   backends.build_backend(BackendConfig)  tokenset | http | hf, one interface
    score     protocols.metric_groups / scoring.score_task   splits of both protocols, pooled Pearson
    results   store.ResultStore, report.layer_summary / model_summary / plot_layers
Orchestration: job.run_interpretability(InterpConfig) (Ray actors, MLflow); sweeps: proxy_score(model, blocks).
Tables other tools read: crate.interp.schema. The model read (our checkpoints or a local Hugging Face causal LM):
crate.interp.subject; feature sources (neurons, hook:SITE, sae:PATH): crate.interp.features, sites in crate.interp.sites.
"""

from crate.interp.config import BackendConfig, CollectionConfig, InterpConfig, WorkersConfig
from crate.interp.features import FeatureSource, ModelNeurons, SiteFeatures, feature_source, register_feature_source
from crate.interp.job import run_interpretability
from crate.interp.proxy import proxy_score

__all__ = [
    "BackendConfig", "CollectionConfig", "FeatureSource", "InterpConfig", "ModelNeurons", "SiteFeatures", "WorkersConfig",
    "feature_source", "proxy_score", "register_feature_source",
    "run_interpretability",
]
