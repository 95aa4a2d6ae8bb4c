"""The interpretability job's configuration (`python jobs/interpret.py --help` lists every field)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Literal

from crate.config import Flag, Range
from crate.errors import ConfigError
from crate.interp.features import check_feature_spec
from crate.interp.protocols import PROTOCOL_RULES, RANDOM_ONLY, metric_groups
from crate.interp.prompts import PROMPT_FORMATS, reading_top_k
from crate.interp.schema import METRICS, PROTOCOLS
from crate.tracking import TrackingConfig

PAPER_QUANTILE_EDGES = [0.0, 0.5, 0.9, 0.99, 0.999, 1.0]  # the paper's (and OpenAI's viewer's) percentile bins
ANTHROPIC_QUANTILE_EDGES = [i / 12 for i in range(12)]  # 11 bins of width 1/12; the top 1/12 only via top records


@dataclass
class CollectionConfig:
    """Which activation records are kept per feature (paper §5: `interpret/activations_crate_overcomplete.py`)."""

    # the first `blocks` blocks of the corpus (paper: 8000 × 1024 tokens of Pile validation)
    blocks: Annotated[int, Range(1)] = 8000
    # tokens per block = one forward context; default: the model's (paper: 1024)
    block_length: Annotated[int | None, Range(1)] = None
    window: Annotated[int, Range(1)] = 64  # tokens per record
    # the top/random/quantile units are tokens and a record is the `window` tokens around one, [t - w/2, t + w/2):
    # stream: cut from the flattened token stream, so it may run into the neighbouring block and is truncated at
    #   the stream's start and end (the paper's `activations_crate_overcomplete.py`); centered: shifted to stay
    #   inside its block. fragments: the block is cut into aligned, non-overlapping windows and a fragment's
    #   activation is its max (OpenAI's excerpts). auto: the protocol's (crate.interp.protocols.PROTOCOL_RULES).
    windows: Literal["auto", "stream", "centered", "fragments"] = "auto"
    top: Annotated[int, Range(1)] = 50  # highest-activation units per feature
    random: Annotated[int, Range(1)] = 50  # uniformly sampled units per feature (seeded)
    quantile_edges: list[float] = field(default_factory=lambda: list(PAPER_QUANTILE_EDGES))  # bin b: [e_b, e_b+1)
    per_quantile: Annotated[int, Range(0)] = 20  # sampled units per quantile bin
    # uniform pool the quantile bins are estimated and drawn from (beyond the random ones)
    quantile_pool: Annotated[int, Range(0)] = 256
    batch_blocks: Annotated[int, Range(1)] = 16  # blocks per forward pass

    def __post_init__(self) -> None:
        edges = self.quantile_edges
        if edges and (len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0 or edges[-1] > 1):
            raise ConfigError("quantile_edges", f"need >= 2 strictly increasing values in [0, 1], got {edges}")
        if self.n_bins and self.per_quantile > self.quantile_pool:
            raise ConfigError("quantile_pool", f"must be >= per_quantile ({self.per_quantile})")
        if self.block_length is None:  # checked again once the model's context fills it in (`for_context`)
            return
        if self.window > self.block_length:
            raise ConfigError("window", f"a {self.window}-token window does not fit a {self.block_length}-token block")
        if self.windows == "fragments" and self.block_length % self.window:
            raise ConfigError("window", f"fragments need block_length ({self.block_length}) divisible by window")

    @property
    def n_bins(self) -> int:
        return max(len(self.quantile_edges) - 1, 0) if self.per_quantile else 0

    def resolved(self, protocol: str) -> "CollectionConfig":
        """These settings with `windows: auto` replaced by the protocol's convention."""
        if self.windows != "auto":
            return self
        return replace(self, windows=PROTOCOL_RULES[protocol].windows)

    def for_context(self, context: int) -> "CollectionConfig":
        """These settings with an unset block_length filled in by a model's context (`block_size`)."""
        return self if self.block_length is not None else replace(self, block_length=context)

    def collection_id(self, **context: object) -> str:
        """A short hash naming these settings plus `context` (checkpoint, corpus, features, seed)."""
        payload = json.dumps({**asdict(self), "batch_blocks": None, **context}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def anthropic_collection() -> CollectionConfig:
    """The paper's "Anthropic" records: 800 blocks, 8-token windows, 11 quantile bins of width 1/12."""
    return CollectionConfig(blocks=800, window=8, quantile_edges=list(ANTHROPIC_QUANTILE_EDGES), quantile_pool=512)


@dataclass
class BackendConfig:
    """Who explains and simulates. `kind` picks the backend; the other fields apply where they say."""

    kind: Literal["tokenset", "http", "hf"] = "tokenset"  # tokenset: offline baseline; http: OpenAI-compatible server; hf: in-process
    explainer_model: str | None = None  # http: model name at the endpoint; hf: local model directory
    simulator_model: str | None = None  # default: the explainer model (paper: Mistral-7B explains, Llama-2-7B simulates)
    # OpenAI-compatible HTTP
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (never logged or stored)
    # echo: legacy /completions with echo + logprobs; prompt_logprobs: vLLM's; sampled: chat-only, no logprobs
    simulation: Literal["echo", "prompt_logprobs", "sampled"] = "echo"
    explain_endpoint: Literal["chat", "completions"] = "chat"  # which API asks for explanations
    # how the simulator's expected value is read at each position: "full" (the softmax restricted to "0".."10";
    # hf only) or "top-K" (the K most likely next tokens, a position whose top K holds no value token reads 0; http
    # asks the server for K logprobs). auto: the protocol's — the paper's fork read the top 5 (crate-paper: top-5),
    # OpenAI's API code asks for 15 (openai: top-15).
    reading: str = "auto"
    # prompt text: fork (the paper's fork of neuron_explainer, verbatim), openai (neuron_explainer 0.0.1), crate-v1
    # (this project's earlier format); auto: the protocol's
    prompt_format: str = "auto"
    request_timeout_s: Annotated[float, Range(0, exclusive_low=True)] = 60.0  # per attempt
    request_deadline_s: float = 180.0  # per request, all its attempts and waits together
    max_attempts: Annotated[int, Range(1)] = 6  # per request: timeouts, connection errors, 429 and 5xx are retried
    backoff_s: Annotated[float, Range(0)] = 1.0  # first retry waits up to this (full jitter), doubling per attempt
    backoff_max_s: float = 30.0  # the longest wait between attempts
    # circuit breaker (per backend client): after `breaker_failures` failed attempts in a row (timeouts, connection
    # errors, 5xx) every call fails at once for `breaker_cooldown_s`, then one trial call decides
    breaker_failures: Annotated[int, Range(1)] = 3  # failed attempts in a row that open the breaker
    breaker_cooldown_s: Annotated[float, Range(0)] = 30.0  # how long an open breaker fails calls at once
    # in-process Hugging Face causal LM (local files only; never downloads)
    explainer_gguf: str | None = None  # a GGUF file inside explainer_model's directory (transformers' gguf_file=)
    simulator_gguf: str | None = None  # the same for simulator_model
    load_in_4bit: bool = False  # bitsandbytes NF4 (CUDA); the paper ran both models in 4-bit
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda if available
    # generation of explanations (OpenAI and the paper: one sample, temperature 1, top_p 1, 60 tokens)
    temperature: Annotated[float, Range(0)] = 1.0  # sampling temperature of explanations
    top_p: Annotated[float, Range(0, 1, exclusive_low=True)] = 1.0  # nucleus sampling of explanations
    max_explanation_tokens: Annotated[int, Range(1)] = 60  # longest explanation generated
    # offline token-set baseline
    tokenset_size: Annotated[int, Range(1)] = 5  # tokens in a token-set explanation

    def __post_init__(self) -> None:
        if self.kind in ("http", "hf") and not self.explainer_model:
            raise ConfigError("explainer_model", f"the {self.kind} backend needs a model")
        if self.reading != "auto":
            reading_top_k(self.reading)  # raises ConfigError naming the field
        if self.prompt_format not in ("auto", *PROMPT_FORMATS):
            raise ConfigError("prompt_format", f"must be auto or one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format}")
        if self.kind == "http" and self.reading == "full":
            raise ConfigError("reading", "full needs every token's probability, which an HTTP server does not return; "
                                         "use top-K (a server returns at most 20) or the hf backend")
        if self.backoff_max_s < self.backoff_s:
            raise ConfigError("backoff_max_s", f"must be >= backoff_s ({self.backoff_s})")
        if self.request_deadline_s < self.request_timeout_s:
            raise ConfigError("request_deadline_s", f"must be >= request_timeout_s ({self.request_timeout_s})")

    @property
    def simulator(self) -> str | None:
        return self.simulator_model or self.explainer_model

    def resolved(self, protocol: str = "crate-paper") -> "BackendConfig":
        """These settings with `auto` reading and prompt_format replaced by the protocol's (InterpConfig does this
        for its protocol; a backend built from unresolved settings gets the default protocol's)."""
        rules = PROTOCOL_RULES[protocol]
        return replace(self, reading=rules.reading if self.reading == "auto" else self.reading,
                       prompt_format=rules.prompt_format if self.prompt_format == "auto" else self.prompt_format)


@dataclass
class WorkersConfig:
    """Ray actors. Collection shards the block stream over `collect_actors` (0: in the driver process); scoring runs
    a pool of `actors` backend actors with `concurrency` neurons in flight each."""

    collect_actors: Annotated[int, Range(0)] = 0  # Ray actors that record activations; 0: the driver process
    # per collection actor; on a cluster: 1 (the driver runs on the GPU-less head)
    collect_gpus: Annotated[float, Range(0)] = 0.0
    # 0: score in the driver process (no Ray), `concurrency` features in flight on threads
    actors: Annotated[int, Range(0)] = 2
    # features in flight per actor; default: 4 (http, tokenset), 1 (hf: one per model)
    concurrency: Annotated[int | None, Range(1)] = None
    # per scoring actor; hf on a cluster: 1 (a 7B model on CPU is hours per feature)
    gpus_per_actor: Annotated[float, Range(0)] = 0.0
    cpus_per_actor: Annotated[float, Range(0)] = 1.0  # per scoring actor
    # actors that ask for GPUs must start within this (an autoscaler adds GPU nodes)
    gpu_wait_s: Annotated[float, Range(0, exclusive_low=True)] = 600.0
    max_actor_restarts: int = 2  # a crashed actor is restarted and its in-flight neurons retried
    # rows between compactions of the results database (and its mirror)
    compact_every: Annotated[int, Range(1)] = 500


METRICS_BY_PROTOCOL = {"crate-paper": ("tar", "random", "anthropic"), "openai": ("tar", "top", "random")}


@dataclass
class InterpConfig:
    # required: a model checkpoint file (ours, or the paper's released layout) or a local Hugging Face causal LM
    # directory (config.json + weights; GPT-2's tokenizer), e.g. OpenAI's GPT-2 downloaded beforehand
    checkpoint: str = ""
    corpus: str = "stdlib://val"  # evaluation stream, any crate.data corpus URI (paper: pile://val)
    # feature source (crate.interp.features): neurons; hook:SITE, any hook point or module with {l} for the layer
    # (hook:blocks.{l}.ista.hook_dtx, hook:transformer.h.{l}.mlp.act); sae:PATH, an SAE from jobs/train_sae.py
    features: str = "neurons"
    layers: list[int] | None = None  # default: every layer
    protocol: Literal["crate-paper", "openai"] = "crate-paper"  # the paper's explain/simulate/score, or OpenAI's
    # crate-paper's random metric: separate (its own explanation and a simulation of random[0,2,4,6,8] alone, the
    # paper's Random-only run) or rescore (the random excerpts of the TaR simulation); auto: the protocol's
    random_only: Literal["auto", "separate", "rescore"] = "auto"
    metrics: list[str] = field(default_factory=lambda: ["tar"])  # crate-paper: tar random anthropic; openai: tar top random
    # score a seeded sample of this many features per layer (with a CI on the layer mean)
    sample: Annotated[int | None, Range(1)] = None
    seed: int = 0  # random records, neuron sample, explanation sampling
    # the job fails (exit 1) when more of its result rows failed; a rerun retries them
    max_failed_share: Annotated[float, Range(0, 1)] = 0.05
    output_dir: str | None = None  # default: ./interp/<run>@<step>-<model_sha256[:12]>, one folder per model
    device: str = "auto"  # collection in the driver process: auto = cuda if available
    records: CollectionConfig = field(default_factory=CollectionConfig)  # for tar / random / top
    anthropic_records: CollectionConfig = field(default_factory=anthropic_collection)  # for anthropic
    backend: BackendConfig = field(default_factory=BackendConfig)  # who explains and simulates
    workers: WorkersConfig = field(default_factory=WorkersConfig)  # the Ray actors that record and score
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the MLflow run

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint", "required: the model checkpoint to interpret (--checkpoint PATH)")
        check_feature_spec(self.features)
        if self.protocol not in PROTOCOLS:
            raise ConfigError("protocol", f"must be one of {PROTOCOLS}")
        allowed = METRICS_BY_PROTOCOL[self.protocol]
        unknown = [m for m in self.metrics if m not in allowed]
        if not self.metrics or unknown:
            raise ConfigError("metrics", f"{unknown or 'none'}: the {self.protocol} protocol scores {', '.join(allowed)} "
                                         f"(all metrics: {', '.join(METRICS)})")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError("layers", f"must be non-negative layer indices, got {self.layers}")
        if self.workers.concurrency is None:  # one HF model answers one call at a time; HTTP servers batch
            self.workers.concurrency = 1 if self.backend.kind == "hf" else 4
        rules = PROTOCOL_RULES[self.protocol]
        if self.random_only not in ("auto", *RANDOM_ONLY):
            raise ConfigError("random_only", f"must be auto, separate or rescore, got {self.random_only}")
        self.random_only = rules.random_only if self.random_only == "auto" else self.random_only
        self.backend = self.backend.resolved(self.protocol)
        self.records = self.records.resolved(self.protocol)
        self.anthropic_records = self.anthropic_records.resolved(self.protocol)
        for group, _ in metric_groups(self.protocol, self.metrics, self.random_only):
            group.check_collection(getattr(self, group.collection), group.collection)


# Shorthand flags of `jobs/interpret.py`, each the same as a `key=value` override.
FLAGS = [
    Flag("--checkpoint", "checkpoint", "model checkpoint file, or a local Hugging Face causal LM directory", "text", "PATH"),
    Flag("--corpus", "corpus", "evaluation corpus URI (pile://val, a path, a pretokenized directory, ...)", "text", "URI"),
    Flag("--metric", "metrics", "tar, random, anthropic (crate-paper); tar, top, random (openai)", "texts"),
    Flag("--protocol", "protocol", "crate-paper (the paper's released code: top-5 reading, stream windows, the "
                                   "fork's prompts, a separate random-only pass) | openai (top-15, fragments, "
                                   "neuron_explainer's prompts)", "text"),
    Flag("--reading", "backend.reading", "simulator reading: full | top-K (the paper's fork: top-5; OpenAI: top-15)",
         "text"),
    Flag("--backend", "backend.kind", "tokenset | http | hf", "text"),
    Flag("--features", "features", "neurons | hook:SITE ({l} = the layer) | sae:PATH", "text"),
    Flag("--sample", "sample", "score a seeded sample of N features per layer", metavar="N"),
    Flag("--layers", "layers", "layer indices (default: all)", "numbers"),
    Flag("--output", "output_dir", "output directory (default interp/<run>@<step>-<sha12>, one per model)", "text", "DIR"),
]
