"""The `data:` section of a training config: which corpus, how it is cut into blocks, how it is read.

Corpus URIs (the same forms everywhere: training, `read_blocks`, the pretokenize and stats jobs):

- `stdlib://train`, `stdlib://val`: the built-in offline corpus, the `.py` files of this Python's standard
  library, labelled `Github` (code, not the Pile); the split is a fixed hash of each file's path.
- `pile://train`, `pile://val`, `pile://test`: the uncopyrighted Pile under `pile_url` (by default the Hugging
  Face hub, streamed shard by shard through fsspec).
- a local path, a directory (searched recursively) or a glob of `.jsonl`, `.jsonl.zst`, `.jsonl.gz`, `.parquet`,
  `.txt` files, or any fsspec URL of those (`hf://datasets/...`, `s3://...`, `file://...`);
- a directory written by `jobs/pretokenize.py` (it holds `index.json`): uint16 token shards, memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from crate.config import Flag, Range
from crate.errors import ConfigError

BUILTIN_TRAIN = "stdlib://train"
BUILTIN_VAL = "stdlib://val"
PILE_SPLITS = ("train", "val", "test")
BUILTIN_SPLITS = ("train", "val")
MiB = 2**20


@dataclass
class ReadingConfig:
    """How raw corpus records are read: what every job that reads a corpus shares (training's `data:` section,
    corpus preparation, statistics)."""

    text_field: str = "text"  # record field holding the document (JSON lines, Parquet)
    include_sets: list[str] = field(default_factory=list)  # keep only these pile_set_names (empty: all)
    exclude_sets: list[str] = field(default_factory=list)  # drop these pile_set_names
    # longer records are skipped (counted as too_long), never held in memory
    max_document_bytes: Annotated[int, Range(1024)] = 32 * MiB
    retries: Annotated[int, Range(0)] = 5  # attempts per remote file operation before failing with the file's name
    retry_backoff_s: Annotated[float, Range(0)] = 1.0  # first wait between attempts; doubles every attempt
    pile_url: str = "hf://datasets/monology/pile-uncopyrighted"  # root that pile:// URIs resolve under

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ConfigError("text_field", "must name a record field")
        both = sorted(set(self.include_sets) & set(self.exclude_sets))
        if both:
            raise ConfigError("exclude_sets", f"{both} are also in include_sets")
        if "://" not in self.pile_url and not self.pile_url.startswith("/"):
            raise ConfigError("pile_url", f"must be a URL or an absolute path, got {self.pile_url!r}")


@dataclass
class DataConfig(ReadingConfig):
    train: str = BUILTIN_TRAIN  # corpus URI of the training stream (see the module docstring)
    val: str = BUILTIN_VAL  # corpus URI of the validation stream; must not overlap `train`
    context: Annotated[int, Range(1)] = 1024  # tokens per training example; a block holds context+1 tokens
    # training tokens over all ranks (context per block); None: endless
    token_budget: Annotated[int | None, Range(1)] = None
    # file order of every epoch (raw text), window order of every epoch (pretokenized)
    seed: Annotated[int, Range(0)] = 0
    engine: Literal["ray", "local"] = "ray"  # Ray Data read tasks, or the same core in-process; same blocks
    read_tasks: Annotated[int, Range(1)] = 4  # Ray engine: concurrent read+tokenize tasks per rank
    read_cpus: Annotated[float, Range(0, exclusive_low=True)] = 1.0  # Ray engine: CPUs reserved by each read task
    # Ray engine: consecutive small files are grouped into tasks of this many bytes
    task_bytes: Annotated[int, Range(1)] = 64 * MiB
    prefetch_batches: Annotated[int, Range(1)] = 4  # Ray engine: tokenized batches buffered ahead of the consumer

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("train", "val"):
            check_uri(name, getattr(self, name))

    @property
    def block_length(self) -> int:
        """Tokens per block: inputs are block[:-1], targets block[1:]."""
        return self.context + 1


# ---- the corpus jobs: jobs/pretokenize.py, jobs/reshard.py, jobs/corpus_stats.py ----------------------------


@dataclass
class CorpusJobConfig(ReadingConfig):
    """A job that converts one raw corpus into files under a directory, resumably."""

    corpus: str = ""  # the raw corpus: a path, directory, glob or corpus URI (pile://val, stdlib://train, ...)
    out: str = ""  # the directory it writes; a rerun keeps what an interrupted run finished there
    local: bool = False  # work in this process instead of Ray tasks (one per file group)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("corpus", "out"):
            if not getattr(self, name).strip():
                raise ConfigError(name, f"missing: give {name.upper()} (the first arguments are CORPUS OUT)")


@dataclass
class PretokenizeConfig(CorpusJobConfig):
    shard_bytes: Annotated[int, Range(1)] = 64 * MiB  # input bytes per token shard (consecutive small files share one)


@dataclass
class ReshardConfig(CorpusJobConfig):
    file_bytes: Annotated[int, Range(1)] = 256 * MiB  # text per Parquet part


@dataclass
class CorpusStatsConfig(ReadingConfig):
    paths: list[str] = field(default_factory=list)  # files, directories, globs or corpus URIs, one table each

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.paths:
            raise ConfigError("paths", "missing: give at least one file, directory, glob or corpus URI")


# Shorthands of the corpus jobs (`--local` is `local=true`).
CORPUS_JOB_FLAGS = [Flag("--local", "local", "work in this process instead of Ray tasks", "switch")]
PRETOKENIZE_FLAGS = [*CORPUS_JOB_FLAGS, Flag("--shard-bytes", "shard_bytes", "input bytes per shard", metavar="N")]
RESHARD_FLAGS = [*CORPUS_JOB_FLAGS, Flag("--file-bytes", "file_bytes", "text per Parquet part", metavar="N")]


def check_uri(name: str, uri: str) -> None:
    """Syntax only (no I/O): the built-in and Pile schemes must name a split they have."""
    if not uri or not uri.strip():
        raise ConfigError(name, "must be a corpus URI, path or glob")
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "stdlib" and rest not in BUILTIN_SPLITS:
        raise ConfigError(name, f"{uri!r}: the built-in corpus has splits {', '.join(BUILTIN_SPLITS)}")
    if sep and scheme == "pile" and rest not in PILE_SPLITS:
        raise ConfigError(name, f"{uri!r}: the Pile has splits {', '.join(PILE_SPLITS)}")
