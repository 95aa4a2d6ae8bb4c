"""Corpus URIs resolved to what the stream reads: an ordered list of files ("units"), or a pretokenized directory.

Every file goes through fsspec, local ones included, so the hub (`hf://`), object stores and local disks share
one code path; listing and opening are retried (crate.retry's policy) and fail with the file's name.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from crate.data.config import ReadingConfig
from crate.errors import ConfigError
from crate.retry import GaveUp, RetryPolicy, TryAgain

T = TypeVar("T")

# suffix -> (record format, compression)
FORMATS = {
    ".jsonl": ("jsonl", None),
    ".jsonl.zst": ("jsonl", "zstd"),
    ".jsonl.zstd": ("jsonl", "zstd"),
    ".jsonl.gz": ("jsonl", "gzip"),
    ".parquet": ("parquet", None),
    ".txt": ("text", None),
}
MAX_BACKOFF_S = 60.0  # the longest wait between two attempts at a remote file
INDEX_FILE = "index.json"  # marks a pretokenized directory (crate.data.shards)
BUILTIN_LABEL = "Github"  # the built-in corpus is source code, like the Pile's Github set
VAL_HASH_BELOW = 13  # first sha1 byte of the path < 13: the ~5% validation split of the built-in corpus


class SourceError(RuntimeError):
    """A corpus cannot be listed or read (after retries); the message names the URI or file."""


class MissingFile(SourceError):
    """The file is gone (FileNotFoundError): retrying cannot bring it back, so it never is."""


@dataclass(frozen=True)
class Retry:
    """Bounded retries around remote I/O under the platform's retry policy (crate.retry: exponential backoff
    with full jitter, so many readers that failed together do not retry together); a missing file is never
    retried."""

    retries: int = 5  # after the first attempt
    backoff_s: float = 1.0  # the first wait's ceiling; it doubles per attempt, up to MAX_BACKOFF_S

    def __call__(self, fn: Callable[[], T], what: str) -> T:
        def attempt(_remaining_s: float | None) -> T:
            try:
                return fn()
            except FileNotFoundError as error:
                raise MissingFile(f"{what}: not found ({error})") from error
            except SourceError:
                raise
            except Exception as error:  # network stacks raise anything from OSError to httpx errors
                raise TryAgain(f"{type(error).__name__}: {error}") from error

        policy = RetryPolicy(self.retries + 1, self.backoff_s, max(MAX_BACKOFF_S, self.backoff_s))
        try:
            return policy.call(attempt, what)
        except GaveUp as error:
            raise SourceError(f"{what}: {error.problem} (gave up after {error.attempts} attempts)") from error


@dataclass(frozen=True)
class Unit:
    """One file of a corpus: the unit of scheduling, assignment to ranks and resume."""

    url: str  # what fsspec opens
    name: str  # shown in logs and errors: the path relative to the corpus root
    fmt: str  # "jsonl" | "parquet" | "text" (the whole file is one document)
    compression: str | None  # "zstd" | "gzip" | None
    size: int  # bytes on storage
    label: str | None = None  # set name of records that carry no pile_set_name


@dataclass(frozen=True)
class Corpus:
    uri: str
    units: tuple[Unit, ...] = ()
    shards: str | None = None  # a pretokenized directory (local path) instead of units

    @property
    def pretokenized(self) -> bool:
        return self.shards is not None


def resolve(uri: str, cfg: ReadingConfig) -> Corpus:
    """The files behind a corpus URI, sorted (the corpus's natural order); raises SourceError."""
    retry = Retry(cfg.retries, cfg.retry_backoff_s)
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "stdlib":
        return Corpus(uri, builtin_units(rest))
    if sep and scheme == "pile":
        root = cfg.pile_url.rstrip("/")
        return resolve_files(f"{root}/train/*.jsonl.zst" if rest == "train" else f"{root}/{rest}.jsonl.zst", retry)
    return resolve_files(uri, retry)


def resolve_input(uri: str, cfg: ReadingConfig, field: str = "corpus", raw: bool = False) -> Corpus:
    """`resolve` for a job's input: one that cannot be listed (or, with `raw`, that is pretokenized) is a
    ConfigError on `field`, raised before any work."""
    try:
        corpus = resolve(uri, cfg)
    except SourceError as error:
        raise ConfigError(field, str(error)) from None
    if raw and corpus.pretokenized:
        raise ConfigError(field, f"{uri} is pretokenized; this job reads raw text")
    return corpus


def builtin_units(split: str) -> tuple[Unit, ...]:
    """The standard library's `.py` files (no site-packages), split train/val by a hash of the relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    units = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if {"site-packages", "dist-packages", "__pycache__"} & set(rel.split("/")) or not path.is_file():
            continue
        is_val = hashlib.sha1(rel.encode()).digest()[0] < VAL_HASH_BELOW
        if is_val == (split == "val"):
            units.append(Unit(str(path), rel, "text", None, path.stat().st_size, BUILTIN_LABEL))
    if not units:
        raise SourceError(f"stdlib://{split}: no .py files under {root} (this Python ships without its "
                          "standard library sources); give a corpus path instead")
    return tuple(units)


def resolve_files(uri: str, retry: Retry) -> Corpus:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as error:
        raise SourceError(f"{uri}: not a usable path or URL ({error})") from None
    if any(c in path for c in "*?["):
        found = retry(lambda: fs.glob(path, detail=True), f"listing {uri}")
        root = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    elif retry(lambda: fs.isdir(path), f"listing {uri}"):
        if retry(lambda: fs.exists(f"{path.rstrip('/')}/{INDEX_FILE}"), f"listing {uri}"):
            if "file" not in fs.protocol and "local" not in fs.protocol:
                raise SourceError(f"{uri}: pretokenized shards are memory-mapped, so they must be on a local or "
                                  "mounted filesystem; copy the directory first")
            return Corpus(uri, shards=path)
        found = retry(lambda: fs.find(path, detail=True), f"listing {uri}")
        root = path.rstrip("/")
    elif retry(lambda: fs.exists(path), f"listing {uri}"):
        found = {path: retry(lambda: fs.info(path), f"reading {uri}")}
        root = path.rsplit("/", 1)[0]
    else:
        raise SourceError(f"{uri}: no such file or directory")
    units = []
    for name, info in sorted(found.items()):
        kind = file_format(name)
        if kind is None or not (info.get("type", "file") == "file" or info.get("islink")):  # links to files count
            continue
        rel = name[len(root):].lstrip("/") if name.startswith(root) else name
        units.append(Unit(fs.unstrip_protocol(name), rel or name, *kind, int(info.get("size") or 0)))
    if not units:
        raise SourceError(f"{uri}: no corpus files (expected {', '.join(FORMATS)}, or a pretokenized directory "
                          f"with {INDEX_FILE})")
    return Corpus(uri, tuple(units))


def file_format(name: str) -> tuple[str, str | None] | None:
    base = name.rsplit("/", 1)[-1]
    if base.startswith((".", "_")):
        return None
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if base.endswith(suffix):
            return FORMATS[suffix]
    return None


def fingerprint(corpus: Corpus) -> dict[str, Any]:
    """What a raw-text stream position is only valid for: the number of files and a hash of their names."""
    names = "\n".join(u.name for u in corpus.units)
    return {"files": len(corpus.units), "names": hashlib.sha1(names.encode()).hexdigest()[:12]}
