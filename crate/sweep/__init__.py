"""Ray Tune sweeps over pretraining fields — above all CRATE's ISTA sparsity λ and step size η, which the paper
fixes at 0.1 and never ablates.

    from crate.config import load_config
    from crate.sweep import SweepConfig, run_sweep
    result = run_sweep(load_config(SweepConfig, "tune/ista-grid.yaml"))
    print(result.summary())

Every trial is a normal pretraining run (`crate.train.launch`) inside a Tune function trainable, nested in
MLflow under the sweep's parent run; ASHA stops poor trials early on validation loss; completed trials are
scored with the interpretability proxy; the report (summary table, loss vs λ/η, loss-vs-sparsity Pareto front)
lands next to the experiment and on the parent run. `run_sweep(cfg, resume=True)` continues an interrupted
sweep without re-running finished trials.
"""

from crate.sweep.config import Dimension, ProxyConfig, SchedulerConfig, SearchConfig, SweepConfig
from crate.sweep.run import SweepResult, run_sweep

__all__ = ["Dimension", "ProxyConfig", "SchedulerConfig", "SearchConfig", "SweepConfig", "SweepResult", "run_sweep"]
