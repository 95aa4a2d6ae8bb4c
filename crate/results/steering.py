"""Neuron steering: clamp neurons at every position and watch the next-token distribution move.

The paper's neuron editing (§4.4, its code's `enhanced_feature_id`): on the prompt "1 2 3 4 5", setting one
ISTA neuron of CRATE-1L to a large value makes e.g. "-itely", "-ically" the most-increased next tokens. The
same intervention on a GPT baseline clamps an MLP hidden unit. The released code has two more variants, offered
here too: its GPT clamps the neuron in every layer (`layers: all`), and its CRATE can clamp a channel of the
attention's tied q = k = v projection instead (`site: attn`). `model.steer` does the clamping (hooks on the
model's hook points); this module measures what it does:

    effect = steering_effect(model, tokenizer, "1 2 3 4 5", layer=0, neurons=[2], value=10.0)
    print(format_effect(effect))

and `run_steering(config)` is the job: pick neurons (by hand, or the best-explained ones of an
interpretability results table), sweep the clamp value, write `steering.json` + `steering.csv` and a
sweep plot, and log them to MLflow.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence

import torch
import torch.nn.functional as F

from crate.config import Range
from crate.errors import ConfigError
from crate.plots import pyplot, save
from crate.files import replacing, write_atomic
from crate.tracking import TrackingConfig, resolve_locations
from crate.tracking.job import TrackedJob

log = logging.getLogger(__name__)


@dataclass
class SteerConfig:
    checkpoint: str = ""  # a model checkpoint (`save_model` file or the paper's released layout)
    layer: int | None = None  # required for hand-picked neurons (unless layers: all); restricts --top-explained
    layers: Literal["one", "all"] = "one"  # all: clamp in every layer, as the released GPT code does
    site: Literal["neurons", "attn"] = "neurons"  # attn (CRATE): channels of the tied q=k=v projection U_kᵀz
    neurons: list[int] = field(default_factory=list)  # clamped together
    value: float | None = None  # the clamp value; the paper's magnitudes are not published
    sweep: list[float] = field(default_factory=list)  # several clamp values, one effect each (overrides value)
    prompt: str = "1 2 3 4 5"  # the paper's steering prompt
    top_tokens: Annotated[int, Range(1)] = 10  # most-increased and most-decreased next tokens to report
    new_tokens: Annotated[int, Range(0)] = 20  # greedy continuation length, with and without the clamp
    # steer each of the K best-scored neurons of `results` instead of `neurons`
    top_explained: Annotated[int, Range(0)] = 0
    results: str | None = None  # an interpretability results table (parquet)
    metric: str | None = None  # which metric ranks neurons for top_explained (default: the table's first)
    output_dir: str = "steering"  # where steering.json and its table go
    device: str = "auto"  # auto: cuda when available
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the MLflow run

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint", "a model checkpoint is required (--checkpoint PATH)")
        if self.value is None and not self.sweep:
            raise ConfigError("value", "give a clamp value (--value V) or several (--sweep V1,V2,...)")
        if self.top_explained and not self.results:
            raise ConfigError("results", "--top-explained needs an interpretability results table (--results PATH)")
        if self.top_explained and self.neurons:
            raise ConfigError("neurons", "give either neurons or --top-explained, not both")
        if not self.top_explained and not self.neurons:
            raise ConfigError("neurons", "name the neurons to steer (--neuron I) or use --top-explained K")
        if self.neurons and self.layer is None and self.layers == "one":
            raise ConfigError("layer", "hand-picked neurons need their layer (--layer L, or --layers all)")
        if self.layers == "all" and self.layer is not None and not self.top_explained:
            raise ConfigError("layers", "give either --layer L or --layers all, not both")
        if self.site == "attn" and self.top_explained:
            raise ConfigError("site", "--top-explained picks scored neurons; 'attn' steering needs channels (--neuron I)")

    @property
    def values(self) -> list[float]:
        return list(self.sweep) if self.sweep else [float(self.value)]


@dataclass
class TokenShift:
    """One token's next-token probability without and with the intervention."""

    token: str
    token_id: int
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before


@dataclass
class SteeringEffect:
    layer: int | str  # "all": clamped in every layer
    neurons: list[int]
    value: float
    prompt: str
    increased: list[TokenShift]  # largest probability gains first
    decreased: list[TokenShift]  # largest probability losses first
    sweep_tokens: list[TokenShift]  # the tokens the sweep's strongest clamp raises most, at this clamp value
    kl_divergence: float  # KL(steered ‖ original) of the next-token distribution, in nats
    generation: str  # greedy continuation without the intervention
    steered_generation: str  # ... and with it
    explanation: str | None = None  # the neuron's explanation, when it was picked from a results table
    checkpoint: str | None = None  # the steered model's checkpoint (absolute path): how the viewer matches it
    site: str = "neurons"  # or "attn": `neurons` are channels of CRATE's tied q=k=v projection

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for side in ("increased", "decreased", "sweep_tokens"):
            for shift, row in zip(getattr(self, side), data[side]):
                row["delta"] = shift.delta
        return data


@torch.no_grad()
def next_token_probs(model, idx: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """(1, T) -> the last position's next-token distribution over the tokenizer's `n_vocab` real tokens."""
    hidden = model.hidden_states(idx)[:, -1]
    logits = model.lm_head(model.transformer.ln_f(hidden))[0, :n_vocab]  # drop the vocabulary padding
    return F.softmax(logits.float(), dim=-1)


def steering_effects(model, tokenizer, prompt: str, layer: int | str, neurons: Sequence[int], values: Sequence[float],
                     top_tokens: int = 10, new_tokens: int = 20, site: str = "neurons") -> list[SteeringEffect]:
    """One effect per clamp value; the unsteered distribution and generation are computed once.
    `layer` "all" clamps in every layer; `site` "attn" clamps channels of CRATE's q=k=v projection."""
    model.steer_hooks(layer, list(neurons), 0.0, site)  # a neuron, layer or site the model lacks fails here
    model.eval()
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    if idx.numel() == 0:
        raise ValueError("the prompt is empty")
    base = next_token_probs(model, idx, tokenizer.n_vocab)
    generation = _greedy(model, tokenizer, idx, new_tokens)
    runs = []
    for value in values:
        with model.steer(layer, list(neurons), value, site):
            runs.append((float(value), next_token_probs(model, idx, tokenizer.n_vocab),
                         _greedy(model, tokenizer, idx, new_tokens)))
    strongest = max(runs, key=lambda run: abs(run[0]))[1]
    sweep_ids = torch.topk(strongest - base, top_tokens).indices.tolist()
    return [SteeringEffect(
        layer=layer, neurons=list(neurons), value=value, prompt=prompt,
        increased=_moved(tokenizer, base, steered, top_tokens, up=True),
        decreased=_moved(tokenizer, base, steered, top_tokens, up=False),
        sweep_tokens=_shifts(tokenizer, base, steered, sweep_ids),
        kl_divergence=_kl_divergence(steered, base),
        generation=generation, steered_generation=steered_generation, site=site)
        for value, steered, steered_generation in runs]


def steering_effect(model, tokenizer, prompt: str, layer: int | str, neurons: int | Sequence[int], value: float,
                    top_tokens: int = 10, new_tokens: int = 20, site: str = "neurons") -> SteeringEffect:
    neurons = [neurons] if isinstance(neurons, int) else list(neurons)
    return steering_effects(model, tokenizer, prompt, layer, neurons, [value], top_tokens, new_tokens, site)[0]


def _kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p ‖ q) in nats; rounding can leave it a hair below zero for (nearly) equal distributions."""
    return max(0.0, float(torch.sum(p * (torch.log(p + 1e-30) - torch.log(q + 1e-30)))))


def _moved(tokenizer, base: torch.Tensor, steered: torch.Tensor, k: int, up: bool) -> list[TokenShift]:
    """The k tokens whose probability rose (fell) most; only tokens that moved in that direction."""
    change = steered - base if up else base - steered
    values, ids = torch.topk(change, k)
    return _shifts(tokenizer, base, steered, ids[values > 0].tolist())


def _shifts(tokenizer, base: torch.Tensor, steered: torch.Tensor, token_ids: list[int]) -> list[TokenShift]:
    return [TokenShift(tokenizer.decode([t]), t, float(base[t]), float(steered[t])) for t in token_ids]


def _greedy(model, tokenizer, idx: torch.Tensor, new_tokens: int) -> str:
    if new_tokens == 0:
        return ""
    out = model.generate(idx, new_tokens, temperature=0)[0, idx.shape[1]:].tolist()
    # an undertrained model may pick an id of the vocabulary padding (>= n_vocab), which has no text; runs of
    # real tokens are decoded together so characters spanning several byte tokens stay whole
    runs = itertools.groupby(out, key=lambda t: t < tokenizer.n_vocab)
    return "".join(tokenizer.decode(ids) if real else "".join(f"<{t}>" for t in ids)
                   for real, ids in ((real, list(group)) for real, group in runs))


def format_effect(effect: SteeringEffect) -> str:
    """The paper's steering figure as text: token shifts side by side, then both generations."""
    where = "every layer" if effect.layer == "all" else f"layer {effect.layer}"
    unit = "attention channel" if effect.site == "attn" else "neuron"
    who = f"{where} {unit}{'s' if len(effect.neurons) > 1 else ''} {','.join(map(str, effect.neurons))}"
    lines = [f"{who} := {effect.value:g}   on {effect.prompt!r}   KL(steered‖original) = {effect.kl_divergence:.3f} nats"]
    if effect.explanation:
        lines.append(f"  explanation: {effect.explanation}")
    lines.append(f"  {'most increased':<38}{'most decreased'}")
    for up, down in itertools.zip_longest(effect.increased, effect.decreased):
        lines.append(f"  {_format_shift(up):<38}{_format_shift(down)}")
    if not effect.increased and not effect.decreased:
        lines.append("  (no token's probability changed)")
    lines.append(f"  original: {effect.prompt}▏{effect.generation!r}")
    lines.append(f"  steered:  {effect.prompt}▏{effect.steered_generation!r}")
    return "\n".join(lines)


def _format_shift(shift: TokenShift | None) -> str:
    if shift is None:
        return ""
    return f"{shift.token!r:<16} {shift.before:6.1%} → {shift.after:6.1%}"


# --------------------------------------------------------------------------------------------------
def run_steering(config: SteerConfig) -> list[SteeringEffect]:
    """The steering job: every chosen neuron at every clamp value; written, logged to MLflow, returned (the
    job script prints them with `format_effect`)."""
    config = resolve_locations(config)
    from crate.model import load_checkpoint, resolve_device
    from crate.tokenizer import gpt2_tokenizer

    targets = _chosen_neurons(config)  # reads the results table before the model loads
    checkpoint = _checkpoint_name(config.checkpoint)
    model, metadata = load_checkpoint(config.checkpoint)
    model = model.to(resolve_device(config.device))
    for layer, neurons, _ in targets:  # a site, layer or neuron the model lacks fails before any work
        model.steer_hooks(layer, neurons, 0.0, config.site)
    tokenizer = gpt2_tokenizer()
    effects: list[SteeringEffect] = []
    with TrackedJob(config.tracking, "steer", f"steer-{Path(config.checkpoint).stem}", config=config,
                    params={f"model.{k}": v for k, v in dataclasses.asdict(model.config).items()},
                    tags=_tags(model, metadata)) as job:
        for layer, neurons, explanation in targets:
            batch = steering_effects(model, tokenizer, config.prompt, layer, neurons, config.values,
                                     config.top_tokens, config.new_tokens, config.site)
            for effect in batch:
                effect.explanation, effect.checkpoint = explanation, checkpoint
            effects.extend(batch)
        written = write_effects(effects, config.output_dir)
        if len(config.values) > 1:
            written.extend(plot_sweeps(effects, config.output_dir))
        for path in written:
            job.tracker.log_artifact(path, "steering")
        job.tracker.log_metrics({"steering/max_kl": max(e.kl_divergence for e in effects)}, step=0)
    log.info("steering results in %s", config.output_dir)
    return effects


def _chosen_neurons(config: SteerConfig) -> list[tuple[int, list[int], str | None]]:
    every = config.layers == "all"
    if not config.top_explained:
        return [("all" if every else config.layer, list(config.neurons), None)]
    from crate.results.tables import top_explained

    best = top_explained(config.results, config.top_explained, metric=config.metric, layer=config.layer)
    scored_on = {row.checkpoint for row in best} - {None}
    if scored_on and _checkpoint_name(config.checkpoint) not in scored_on:
        log.warning("the results in %s were computed on %s, not on %s: the neuron indices may mean other neurons",
                    config.results, ", ".join(sorted(scored_on)), config.checkpoint)
    return [("all" if every else row.layer, [row.neuron], row.explanation) for row in best]


def _checkpoint_name(checkpoint: str) -> str:
    """How results and effects name a checkpoint: a storage URI as given, a local file by its absolute path."""
    from crate.model.checkpoint import is_storage_uri

    return checkpoint if is_storage_uri(checkpoint) else str(Path(checkpoint).resolve())


def _tags(model, metadata: dict) -> dict[str, str]:
    tags = {"crate.arch": model.config.arch}
    if metadata.get("mlflow_run_id"):
        tags["crate.model_run_id"] = str(metadata["mlflow_run_id"])
    return tags


def write_effects(effects: Sequence[SteeringEffect], output_dir: str | os.PathLike) -> list[Path]:
    """`steering.json` (everything, what the neuron viewer reads) and `steering.csv` (one row per token shift)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "steering.json", out / "steering.csv"
    write_atomic(json_path, json.dumps([e.to_dict() for e in effects], indent=1, ensure_ascii=False))
    with replacing(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "site", "neurons", "value", "direction", "rank", "token", "token_id", "p_before",
                         "p_after", "delta", "kl_divergence"])
        for e in effects:
            for direction in ("increased", "decreased"):
                for rank, s in enumerate(getattr(e, direction)):
                    writer.writerow([e.layer, e.site, " ".join(map(str, e.neurons)), e.value, direction, rank, s.token,
                                     s.token_id, f"{s.before:.6g}", f"{s.after:.6g}", f"{s.delta:.6g}",
                                     f"{e.kl_divergence:.6g}"])
    return [json_path, csv_path]


def plot_sweeps(effects: Sequence[SteeringEffect], output_dir: str | os.PathLike, n_tokens: int = 5) -> list[Path]:
    """Per steered neuron set: the probabilities of the tokens the largest clamp raises most, and the KL,
    against the clamp value — how the effect grows."""
    plt = pyplot()

    groups: dict[tuple[int | str, str, tuple[int, ...]], list[SteeringEffect]] = {}
    for effect in effects:
        groups.setdefault((effect.layer, effect.site, tuple(effect.neurons)), []).append(effect)
    paths = []
    for (layer, site, neurons), sweep in groups.items():
        sweep = sorted(sweep, key=lambda e: e.value)
        fig, (ax_p, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
        values = [e.value for e in sweep]
        for rank, token in enumerate(sweep[0].sweep_tokens[:n_tokens]):
            ax_p.plot(values, [e.sweep_tokens[rank].after for e in sweep], marker="o", label=repr(token.token))
        ax_p.set(xlabel="clamp value", ylabel="next-token probability", title="tokens the clamp raises most")
        ax_p.legend(fontsize=8)
        ax_kl.plot(values, [e.kl_divergence for e in sweep], marker="o", color="black")
        ax_kl.set(xlabel="clamp value", ylabel="KL(steered ‖ original) [nats]", title="size of the effect")
        name, unit = "-".join(map(str, neurons)), "attn" if site == "attn" else "neuron"
        fig.suptitle(f"layer {layer}, {unit} {name}, prompt {sweep[0].prompt!r}")
        paths.append(save(fig, Path(output_dir) / f"sweep-layer{layer}-{unit}{name}.png"))
    return paths

