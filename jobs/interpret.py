"""Neuron-level interpretability of a checkpoint: activation records, explanation, simulation, scoring.

    python jobs/interpret.py --checkpoint ckpt.pt --corpus pile://val --metric tar,random --backend tokenset
    python jobs/interpret.py --checkpoint /models/gpt2 --protocol openai --metric tar,top,random   # a local HF model
    python jobs/interpret.py --checkpoint ckpt.pt --features 'hook:blocks.{l}.ista.hook_dtx'     # any hook point
    python jobs/interpret.py --checkpoint ckpt.pt --metric anthropic --backend hf --sample 200 \\
        backend.explainer_model=/models/mistral-7b-instruct backend.simulator_model=/models/llama-2-7b
    ray job submit --working-dir . -- python jobs/interpret.py --checkpoint s3://bucket/run/checkpoint_00001000/model.pt \\
        --backend http backend.explainer_model=meta-llama/Llama-3.1-8B-Instruct backend.base_url=http://vllm:8000/v1 \\
        workers.collect_actors=1 workers.collect_gpus=1      # on a cluster: records on a GPU worker (hf: gpus_per_actor=1)

Rerunning the same command resumes (and retries failed features); the job exits 1 when more than max_failed_share
of its result rows failed. The flags are shorthands for overrides (`--metric tar` = `metrics=[tar]`).
"""

import sys

from crate.cli import parse_config, run_job, setup_logging
from crate.interp import InterpConfig, run_interpretability
from crate.interp.config import FLAGS
from crate.interp.job import TooManyFailures
from crate.interp.report import format_summary


def main(argv=None) -> int:
    setup_logging()
    config, _ = parse_config(InterpConfig, __doc__, argv, flags=FLAGS)
    try:
        summary = run_interpretability(config)
    except TooManyFailures as failures:
        print(format_summary(failures.summary))
        print(f"interpret: {failures}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
