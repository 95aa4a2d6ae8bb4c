"""Which records explain a feature and which score it, and how each step reads the model: the two named protocols
(recorded in every result row).

`PROTOCOL_RULES` is the one table of the protocol fields that move a number; each `auto` config field is
resolved from it (`InterpConfig`). The source each rule follows:

| field | crate-paper (the paper's fork, crate-lm@3d5027b) | openai (Bills et al., neuron_explainer) |
|---|---|---|
| reading | top-5: `api_client.py` `mimic_api_simulation`, `torch.topk(token_logits, 5)` | top-15: `simulator.py` `ExplanationNeuronSimulator.simulate`, `"logprobs": 15` |
| windows | stream: `activations_crate_overcomplete.py` `start = max(0, activation_id - interval)` | fragments: OpenAI's collated 64-token fragments |
| prompt_format | fork: `explainer.py` (HARMONY_V4 for mistral-7b), `simulator.py` (INSTRUCTION_FOLLOWING, ORIGINAL) | openai: neuron_explainer 0.0.1, the same two classes' defaults |
| random_only | separate: activations.py `index_method = "random"` (a run of its own) | rescore: random-only re-aggregates the valid split's random records |

Records per metric:
`crate-paper` — what the paper's scripts did (`neurons/eval.py`, `activations.py`, paper §5):
- tar:       explain on top[0,2,4,6,8]; score on random[0,2,4,6,8] + top[1,3,5,7,9] (10 excerpts, pooled Pearson).
- random:    random_only=separate (the default): a pass of its own — its own explanation of top[0,2,4,6,8]
             (sampled with seed + 1: a separate run of the paper's script draws its own) and a simulation of
             random[0,2,4,6,8] alone. random_only=rescore: the random excerpts of the TaR simulation, re-aggregated
             (HoagyC's replication; one explanation and one simulation give both metrics).
- anthropic: explain on top[0:15] + 2 per quantile bin (quantile[b][0:2]) + random[0:5]; score on top[15:25] +
             quantile[b][2:4] + random[5:10] + 10 out-of-context snippets: top[25:35] cut to the 3 tokens around
             their top token (the paper's tokens[3:6] of an 8-token window). Uses the `anthropic_records` collection.
             A quantile bin with fewer than 4 records is counted in the rows' `record_shortfall`.
`openai` — Bills et al. as in their released code (`get_slices_for_splits`, n_examples_per_split = 5): splits are
interleaved by rank, top records 4 ways (train, calibration, valid, test), random records 3 ways.
- explain on train = top[0:20:4] (ranks 0,4,8,12,16; no random records);
- score on valid = top[2:20:4] (2,6,10,14,18) + random[1:15:3] (1,4,7,10,13): tar = all 10, top = the 5 top,
  random = the 5 random (HoagyC's top-only / random-only re-aggregations of the same simulation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from crate.errors import ConfigError
from crate.interp.records import Excerpt, FeatureRecords

ANTHROPIC_SNIPPETS = 10
SNIPPET_LEFT, SNIPPET_RIGHT = 1, 2  # tokens [focus-1, focus+2): the paper's tokens[3:6] with focus 4


@dataclass(frozen=True)
class ProtocolRules:
    """The protocol fields that move a number (see the table above)."""

    reading: str  # simulator's expected value: "full" softmax over "0".."10", or "top-K" next-token logprobs
    windows: str  # records.windows: "stream", "centered" or "fragments"
    prompt_format: str  # "fork", "openai" or "crate-v1"
    random_only: str  # "separate" pass or "rescore" of the TaR simulation


PROTOCOL_RULES = {
    "crate-paper": ProtocolRules(reading="top-5", windows="stream", prompt_format="fork", random_only="separate"),
    "openai": ProtocolRules(reading="top-15", windows="fragments", prompt_format="openai", random_only="rescore"),
}
RANDOM_ONLY = ("separate", "rescore")


class InsufficientRecords(ValueError):
    """A feature has fewer records than its protocol needs (e.g. a stream too short): scored as failed."""


@dataclass(frozen=True)
class ScoringTask:
    """One explanation and one simulation; `metrics` maps each metric to the indices of `score` it pools."""

    layer: int
    neuron: int
    protocol: str
    explain: tuple[Excerpt, ...]
    score: tuple[Excerpt, ...]
    metrics: dict[str, tuple[int, ...]]
    seed_offset: int = 0  # added to the explanation seed (a separate pass draws its own explanation)
    record_shortfall: int = 0  # records the protocol asks for that the feature's collection could not provide


@dataclass(frozen=True)
class MetricGroup:
    """Metrics computed from one explanation + simulation, the collection they read, and what they need."""

    protocol: str
    metrics: tuple[str, ...]
    collection: str  # InterpConfig field: "records" or "anthropic_records"
    min_top: int
    min_random: int
    min_per_quantile: int = 0

    def task(self, records: FeatureRecords, n_bins: int = 0) -> ScoringTask:
        """The task of one feature; `n_bins` is its collection's number of quantile bins (for the shortfall)."""
        self._check(records)
        task = _BUILDERS[(self.protocol, self.metrics)](records)
        return replace(task, record_shortfall=self.shortfall(records, n_bins)) if self.min_per_quantile else task

    def shortfall(self, records: FeatureRecords, n_bins: int) -> int:
        """Quantile records this group uses that the feature lacks (a bin too rare for the sampling pool)."""
        have = [len(records.quantiles[b]) if b < len(records.quantiles) else 0 for b in range(n_bins)]
        return sum(max(0, self.min_per_quantile - h) for h in have)

    def _check(self, records: FeatureRecords) -> None:
        if len(records.top) < self.min_top or len(records.random) < self.min_random:
            raise InsufficientRecords(f"needs {self.min_top} top and {self.min_random} random records, the feature has "
                                      f"{len(records.top)} and {len(records.random)}")

    def check_collection(self, collection, field: str) -> None:
        """Fail before any work when the collection settings cannot provide these records."""
        if collection.top < self.min_top or collection.random < self.min_random:
            raise ConfigError(field, f"{self.protocol} {'/'.join(self.metrics)} needs top >= {self.min_top} and random "
                                     f">= {self.min_random}, got {collection.top} and {collection.random}")
        if self.min_per_quantile and (collection.n_bins == 0 or collection.per_quantile < self.min_per_quantile):
            raise ConfigError(field, f"{self.protocol} {'/'.join(self.metrics)} needs quantile bins with "
                                     f"per_quantile >= {self.min_per_quantile}")


def _paper_tar(r: FeatureRecords) -> ScoringTask:
    score = tuple(r.random[0:10:2] + r.top[1:10:2])
    return ScoringTask(r.layer, r.neuron, "crate-paper", tuple(r.top[0:10:2]), score,
                       {"tar": tuple(range(10)), "random": tuple(range(5))})


def _paper_tar_only(r: FeatureRecords) -> ScoringTask:
    return replace(_paper_tar(r), metrics={"tar": tuple(range(10))})


def _paper_random_only(r: FeatureRecords) -> ScoringTask:
    return ScoringTask(r.layer, r.neuron, "crate-paper", tuple(r.top[0:10:2]), tuple(r.random[0:10:2]),
                       {"random": tuple(range(5))}, seed_offset=1)


def _paper_anthropic(r: FeatureRecords) -> ScoringTask:
    explain = r.top[0:15] + [e for bin in r.quantiles for e in bin[0:2]] + r.random[0:5]
    snippets = [out_of_context(e, focus) for e, focus in zip(r.top[25:25 + ANTHROPIC_SNIPPETS],
                                                            r.top_focus[25:25 + ANTHROPIC_SNIPPETS])]
    score = r.top[15:25] + [e for bin in r.quantiles for e in bin[2:4]] + r.random[5:10] + snippets
    return ScoringTask(r.layer, r.neuron, "crate-paper", tuple(explain), tuple(score),
                       {"anthropic": tuple(range(len(score)))})


def _openai(r: FeatureRecords) -> ScoringTask:
    score = tuple(r.top[2:20:4] + r.random[1:15:3])
    return ScoringTask(r.layer, r.neuron, "openai", tuple(r.top[0:20:4]), score,
                       {"tar": tuple(range(10)), "top": tuple(range(5)), "random": tuple(range(5, 10))})


def out_of_context(excerpt: Excerpt, focus: int) -> Excerpt:
    """The tokens around a record's top token, shown without the rest of its window."""
    start = max(0, focus - SNIPPET_LEFT)
    stop = min(len(excerpt.tokens), focus + SNIPPET_RIGHT)
    return Excerpt(f"{excerpt.ref}[{start}:{stop}]", excerpt.tokens[start:stop], excerpt.activations[start:stop])


_BUILDERS = {
    ("crate-paper", ("tar", "random")): _paper_tar,
    ("crate-paper", ("tar",)): _paper_tar_only,
    ("crate-paper", ("random",)): _paper_random_only,
    ("crate-paper", ("anthropic",)): _paper_anthropic,
    ("openai", ("tar", "top", "random")): _openai,
}
RESCORED_RANDOM = MetricGroup("crate-paper", ("tar", "random"), "records", min_top=10, min_random=10)
SEPARATE_RANDOM = (MetricGroup("crate-paper", ("tar",), "records", min_top=10, min_random=10),
                   MetricGroup("crate-paper", ("random",), "records", min_top=10, min_random=10))
METRIC_GROUPS = (
    MetricGroup("crate-paper", ("anthropic",), "anthropic_records", min_top=25 + ANTHROPIC_SNIPPETS, min_random=10,
                min_per_quantile=4),
    MetricGroup("openai", ("tar", "top", "random"), "records", min_top=20, min_random=15),
)


def metric_groups(protocol: str, metrics: list[str] | tuple[str, ...],
                  random_only: str | None = None) -> list[tuple[MetricGroup, tuple[str, ...]]]:
    """The groups that compute the requested metrics, each with the requested subset of its metrics;
    `random_only` (default: the protocol's rule) says whether crate-paper's random metric is a pass of its own."""
    random_only = random_only or PROTOCOL_RULES[protocol].random_only
    paper_tar = SEPARATE_RANDOM if random_only == "separate" else (RESCORED_RANDOM,)
    groups = []
    for group in paper_tar + METRIC_GROUPS:
        wanted = tuple(m for m in group.metrics if m in metrics)
        if group.protocol == protocol and wanted:
            groups.append((group, wanted))
    return groups
