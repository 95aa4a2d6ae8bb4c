"""Training and validation streams of packed blocks, with exact, resumable positions.

Raw text (JSON lines, Parquet, text files, the built-in corpus)
    Every epoch deals a seeded permutation of the corpus's files round-robin to the ranks (epoch e, rank r
    reads `epoch_units(n, seed, e, r, world)`); each rank packs its own files' documents into blocks of
    context+1 tokens, carrying remainders across documents, files and epochs, so no token is dropped. Ranks
    never read each other's files, so tokenization work is split, not repeated. A rank's position is
    (epoch, index of the file in its schedule, record index, byte/row offset, token in the record): the
    start of its next block. Resume is block-exact: plain JSON lines and text files seek to the byte
    offset, Parquet skips whole row groups and then rows, compressed files (.zst/.gz, single frames without
    an index) are decompressed from their start and the bytes before the offset discarded without parsing
    (~0.5 GB/s per core); then the first record is re-tokenized and its first `token` ids dropped.

Pretokenized shards (jobs/pretokenize.py)
    The corpus is one token stream cut into N blocks; epoch e visits them window by window (windows of
    WINDOW consecutive blocks, in a seeded order), and global position g = e*N + i is read by rank
    g mod world. A position is just the number of blocks taken; resume and re-partition are exact and free.

Re-partition (`resume_states`, a different number of ranks, from a step boundary)
    Pretokenized: every rank has taken the same number of blocks, so the consumed stream is a prefix
    [0, P) and the new ranks continue at P + r, P + r + world', ... Raw text: everything the old ranks had
    not read yet (the rest of their current file from the saved position, their remaining files of that
    epoch, and their files of any later epoch another rank had already entered) is collected, ordered by
    (epoch, place in the epoch's permutation) and dealt round-robin to the new ranks as "pending" segments
    that they read first; then all new ranks start the next epoch with the new world size. Nothing is lost
    or read twice.

Both engines run the same per-file core (`crate.data.documents.documents`) and the same packer; the Ray
engine runs the files' reading and tokenization in parallel Ray Data read tasks (crate.data.ray_engine),
so `engine: ray` and `engine: local` yield identical blocks in identical order.
"""

from __future__ import annotations

import logging
from typing import Iterator, NamedTuple

import numpy as np
import torch

from crate.data.config import DataConfig
from crate.data.documents import Document, ReadOptions, Start, documents
from crate.data.packing import Block, Packer, StreamStats
from crate.data.shards import TokenShards
from crate.data.sources import Corpus, SourceError, fingerprint, resolve
from crate.errors import ConfigError

log = logging.getLogger(__name__)
WINDOW = 256  # pretokenized epochs shuffle windows of this many consecutive blocks (~256k tokens at 1024)


class Batch(NamedTuple):
    tokens: torch.Tensor  # (B, context+1) int64; inputs = tokens[:, :-1], targets = tokens[:, 1:]
    state: dict  # JSON-serialisable position of this rank's stream after this batch
    set_tokens: dict[str, int]  # tokens of each pile_set_name in this batch


class Item(NamedTuple):
    """One file to read, from `start`, dropping the first `token` ids of the first record."""

    unit: int  # index into Corpus.units
    start: Start
    token: int
    epoch: int
    step: int | None  # place in the rank's schedule of `epoch`; None for a pending segment
    pending: int | None  # index in the state's pending segments


class BlockStream:
    """An iterator of `Batch` with live counters: `stats()` (documents, tokens, skipped by reason, ...)."""

    def __init__(self, batches: Iterator[Batch], stats: StreamStats):
        self._batches, self._stats = batches, stats

    def __iter__(self) -> "BlockStream":
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def stats(self) -> dict[str, int]:
        """Cumulative counters since this stream was opened; keys as in `StreamStats.as_dict`."""
        return self._stats.as_dict()

    def close(self) -> None:
        """Stop reading (ends a Ray Data pipeline); also happens when the stream is garbage-collected."""
        self._batches.close()


def train_batches(cfg: DataConfig, micro_batch_size: int, rank: int, world_size: int,
                  state: dict | None = None) -> BlockStream:
    """This rank's endless stream of training batches (ended only by `token_budget`), from `state` on."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    corpus = open_corpus(cfg, "train")
    limit = None
    if cfg.token_budget is not None:
        limit = cfg.token_budget // cfg.context // world_size // micro_batch_size * micro_batch_size
        if limit == 0:
            raise ConfigError("token_budget", f"{cfg.token_budget} tokens is less than one batch on every rank "
                                              f"({world_size} x {micro_batch_size} x {cfg.context})")
    stats = StreamStats()
    if corpus.pretokenized:
        shards = TokenShards(corpus.shards)
        state = checked_state(state, "tokens", cfg, shards.fingerprint(), rank, world_size)
        batches = token_batches(shards, cfg, micro_batch_size, state, stats, limit)
    else:
        if len(corpus.units) < world_size:
            raise ConfigError("train", f"{cfg.train} has {len(corpus.units)} files, fewer than the {world_size} "
                                       "ranks that each read their own files; pretokenize it (jobs/pretokenize.py)")
        state = checked_state(state, "text", cfg, fingerprint(corpus), rank, world_size)
        batches = text_batches(corpus, cfg, micro_batch_size, state, stats, limit)
    return BlockStream(batches, stats)


def val_batches(cfg: DataConfig, micro_batch_size: int, rank: int, world_size: int, max_blocks: int) -> BlockStream:
    """The first `max_blocks` blocks of `cfg.val` in the corpus's natural order, dealt round-robin to the
    ranks; identical on every run. Every rank gets the same number of blocks (the remainder of
    max_blocks / world_size is left out); the last batch may be smaller than `micro_batch_size`."""
    corpus = open_corpus(cfg, "val")
    stats = StreamStats()
    mine, total = [], 0
    for block in first_blocks(corpus, cfg.block_length, max_blocks, ReadOptions.of(cfg), stats):
        if total % world_size == rank:
            mine.append(block)
        total += 1
    if total < world_size:
        raise ConfigError("val", f"{cfg.val} holds {total} blocks of {cfg.block_length} tokens, fewer than the "
                                 f"{world_size} ranks")
    mine = mine[: total // world_size]

    def batches() -> Iterator[Batch]:
        for i in range(0, len(mine), micro_batch_size):
            chunk = mine[i:i + micro_batch_size]
            yield make_batch(chunk, {"kind": "val", "blocks": i + len(chunk)})

    return BlockStream(batches(), stats)


def read_blocks(source: str, block_length: int, max_blocks: int, text_field: str = "text") -> Iterator[np.ndarray]:
    """The first `max_blocks` contiguous blocks (int64 arrays of `block_length` tokens) of `source` in its
    natural order, in-process; memory-mapped slices when `source` is pretokenized."""
    cfg = DataConfig(text_field=text_field)
    corpus = resolve(source, cfg)
    for block in first_blocks(corpus, block_length, max_blocks, ReadOptions.of(cfg), StreamStats()):
        yield block.tokens.astype(np.int64)


def check_sources(cfg: DataConfig, where: str = "data") -> None:
    """Pre-flight before any worker starts: both corpora exist, list, are non-empty and open; ConfigError
    naming `<where>.train` or `<where>.val` otherwise (`where`: the config section holding `cfg`)."""
    try:
        if cfg.train == cfg.val:
            raise ConfigError("val", f"is the same corpus as train ({cfg.train}); give a held-out split")
        for name in ("train", "val"):
            check_corpus(cfg, name)
    except ConfigError as error:
        raise error.under(where) from None


def check_corpus(cfg: DataConfig, name: str) -> None:
    corpus = open_corpus(cfg, name)
    if corpus.pretokenized:
        if TokenShards(corpus.shards).n_tokens < cfg.block_length:
            raise ConfigError(name, f"{corpus.uri} holds fewer tokens than one block ({cfg.block_length})")
        return
    probe = next((u for u in corpus.units if u.size > 0), None)
    if probe is None:
        raise ConfigError(name, f"{corpus.uri}: all {len(corpus.units)} files are empty")
    try:
        next(documents(probe, Start(), ReadOptions.of(cfg)), None)
    except SourceError as error:
        raise ConfigError(name, f"{corpus.uri}: unreadable: {error}") from None


def open_corpus(cfg: DataConfig, name: str) -> Corpus:
    try:
        corpus = resolve(getattr(cfg, name), cfg)
    except SourceError as error:
        raise ConfigError(name, str(error)) from None
    if corpus.pretokenized and (cfg.include_sets or cfg.exclude_sets):
        raise ConfigError(name, f"{corpus.uri} is pretokenized, so include_sets/exclude_sets cannot apply; "
                                "pretokenize the raw corpus with those filters instead")
    return corpus


def make_batch(blocks: list[Block], state: dict) -> Batch:
    set_tokens: dict[str, int] = {}
    for block in blocks:
        for name, n in block.set_tokens.items():
            set_tokens[name] = set_tokens.get(name, 0) + n
    tokens = torch.from_numpy(np.stack([b.tokens for b in blocks]).astype(np.int64))
    return Batch(tokens, state, set_tokens)


# ---- raw text ------------------------------------------------------------------------------------------------


def epoch_units(n_units: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """The files `rank` reads in `epoch`: a seeded permutation of all files, dealt round-robin."""
    return epoch_order(n_units, seed, epoch)[rank::world].tolist()


def epoch_order(n_units: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_units)


def initial_state(kind: str, cfg: DataConfig, corpus_id: dict, rank: int, world: int) -> dict:
    state = {"kind": kind, "world": world, "rank": rank, "seed": cfg.seed, "corpus": corpus_id, "blocks": 0}
    if kind == "tokens":
        return {**state, "base": 0, "taken": 0}
    return {**state, "epoch": 0, "step": 0, "doc": 0, "offset": 0, "token": 0, "pending": []}


def checked_state(state: dict | None, kind: str, cfg: DataConfig, corpus_id: dict, rank: int, world: int) -> dict:
    if state is None:
        return initial_state(kind, cfg, corpus_id, rank, world)
    if state.get("kind") != kind:
        raise ConfigError("train", f"the saved stream position is for a {state.get('kind')!r} corpus, but "
                                   f"{cfg.train} is {'pretokenized' if kind == 'tokens' else 'raw text'}")
    if state["corpus"] != corpus_id:
        raise ConfigError("train", f"the saved stream position belongs to another corpus ({state['corpus']}, "
                                   f"now {corpus_id}): files were added, removed or renamed")
    if state["seed"] != cfg.seed:
        raise ConfigError("seed", f"the saved stream position was made with seed {state['seed']}")
    if (state["world"], state["rank"]) != (world, rank):
        raise ValueError(f"state of rank {state['rank']}/{state['world']} given to rank {rank}/{world}; "
                         "map saved states with resume_states(saved, world_size) first")
    return state


def schedule(state: dict, n_units: int, seed: int) -> Iterator[list[Item]]:
    """A rank's files from `state` on, one list per phase: the pending segments, then each epoch."""
    rank, world = state["rank"], state["world"]
    if state["pending"]:
        yield [Item(s["unit"], Start(s["doc"], s["offset"]), s["token"], s["epoch"], None, i)
               for i, s in enumerate(state["pending"])]
    epoch, step = state["epoch"], state["step"]
    start, token = Start(state["doc"], state["offset"]), state["token"]
    while True:
        units = epoch_units(n_units, seed, epoch, rank, world)
        yield [Item(units[k], start if k == step else Start(), token if k == step else 0, epoch, k, None)
               for k in range(step, len(units))]
        epoch, step, start, token = epoch + 1, 0, Start(), 0


def position(base: dict, item: Item, doc: Document, token: int, blocks: int) -> dict:
    """The stream state whose next block starts at `token` of record `doc` of `item`."""
    here = {"doc": doc.doc, "offset": doc.offset, "token": token}
    if item.pending is None:
        return {**base, "blocks": blocks, "epoch": item.epoch, "step": item.step, **here, "pending": []}
    segment = {"epoch": item.epoch, "unit": item.unit, **here}
    return {**base, "blocks": blocks, "pending": [segment] + base["pending"][item.pending + 1:]}


def text_batches(corpus: Corpus, cfg: DataConfig, batch_size: int, base: dict, stats: StreamStats,
                 limit: int | None) -> Iterator[Batch]:
    packer, options = Packer(cfg.block_length), ReadOptions.of(cfg)
    pending: list[Block] = []
    blocks = base["blocks"]
    if limit is not None and blocks + batch_size > limit:
        return
    for phase in schedule(base, len(corpus.units), cfg.seed):
        tokens_before = stats.tokens
        for item, doc in read_items(phase, corpus, options, cfg):
            stats.count(doc.tokens, doc.issue)
            if doc.tokens is None:
                continue
            skip = item.token if doc.doc == item.start.doc else 0
            for block in packer.add(doc.tokens[skip:], doc.set_name, (item, doc, skip)):
                pending.append(block)
                if len(pending) == batch_size:
                    blocks += batch_size
                    stats.blocks += batch_size
                    last_item, last_doc, last_skip = block.where
                    yield make_batch(pending, position(base, last_item, last_doc, last_skip + block.token, blocks))
                    pending = []
                    if limit is not None and blocks + batch_size > limit:
                        return
        whole_epoch = phase and phase[0].pending is None and phase[0].step == 0 and phase[0].start == Start()
        if whole_epoch and stats.tokens == tokens_before:
            raise SourceError(f"{corpus.uri}: a whole epoch of rank {base['rank']}'s {len(phase)} files held no "
                              f"usable document (skipped: {dict(stats.skipped)}, filtered: {stats.filtered})")


def read_items(items: list[Item], corpus: Corpus, options: ReadOptions,
               cfg: DataConfig) -> Iterator[tuple[Item, Document]]:
    """The documents of `items`, in order: in-process, or from parallel Ray Data read tasks."""
    if cfg.engine == "ray":
        from crate.data.ray_engine import read_items_with_ray

        yield from read_items_with_ray(items, corpus, options, cfg)
        return
    for item in items:
        for doc in documents(corpus.units[item.unit], item.start, options):
            yield item, doc


def first_blocks(corpus: Corpus, length: int, max_blocks: int, options: ReadOptions,
                 stats: StreamStats) -> Iterator[Block]:
    """The first `max_blocks` blocks of the corpus in its natural order (files sorted, no shuffle)."""
    if max_blocks < 1:
        return
    if corpus.pretokenized:
        shards = TokenShards(corpus.shards)
        for i in range(min(max_blocks, shards.n_tokens // length)):
            stats.blocks += 1
            yield Block(shards.tokens(i * length, length), shards.set_tokens(i * length, length), None, 0)
        return
    packer = Packer(length)
    for u, unit in enumerate(corpus.units):
        for doc in documents(unit, Start(), options):
            stats.count(doc.tokens, doc.issue)
            if doc.tokens is None:
                continue
            for block in packer.add(doc.tokens, doc.set_name, u):
                stats.blocks += 1
                yield block
                if stats.blocks == max_blocks:
                    return
    stats.dropped_tail_tokens = packer.pending_tokens


# ---- pretokenized ------------------------------------------------------------------------------------------


class WindowOrder:
    """Which physical block is at position i of epoch e: windows of WINDOW blocks in a seeded order."""

    def __init__(self, n_blocks: int, seed: int):
        self.n_blocks, self.seed = n_blocks, seed
        self.sizes = np.full(-(-n_blocks // WINDOW), WINDOW)
        self.sizes[-1] = n_blocks - WINDOW * (len(self.sizes) - 1)
        self.epoch, self.permutation, self.ends = -1, None, None

    def block(self, position: int) -> int:
        epoch, i = divmod(position, self.n_blocks)
        if epoch != self.epoch:
            self.epoch = epoch
            self.permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
            self.ends = np.cumsum(self.sizes[self.permutation])
        j = int(np.searchsorted(self.ends, i, side="right"))
        return int(self.permutation[j]) * WINDOW + i - int(self.ends[j] - self.sizes[self.permutation[j]])


def token_batches(shards: TokenShards, cfg: DataConfig, batch_size: int, state: dict, stats: StreamStats,
                  limit: int | None) -> Iterator[Batch]:
    length = cfg.block_length
    n_blocks = shards.n_tokens // length
    if n_blocks < state["world"]:
        raise ConfigError("train", f"{cfg.train} holds {n_blocks} blocks, fewer than the {state['world']} ranks")
    order = WindowOrder(n_blocks, cfg.seed)
    taken, blocks = state["taken"], state["blocks"]
    while limit is None or blocks + batch_size <= limit:
        batch = []
        for j in range(batch_size):
            start = order.block(state["base"] + state["rank"] + state["world"] * (taken + j)) * length
            batch.append(Block(shards.tokens(start, length), shards.set_tokens(start, length), None, 0))
        taken, blocks = taken + batch_size, blocks + batch_size
        stats.blocks += batch_size
        stats.tokens += batch_size * length
        yield make_batch(batch, {**state, "taken": taken, "blocks": blocks})


# ---- re-partition ----------------------------------------------------------------------------------------


def resume_states(saved: list[dict], world_size: int) -> list[dict]:
    """States for `world_size` ranks from every rank's saved state (identity when the size is unchanged).

    Raw text: the unread remainder of the old ranks is dealt round-robin to the new ranks as pending
    segments, then all start the next epoch (see the module docstring). Pretokenized: the consumed prefix
    continues with the new stride. Either way nothing is lost or read twice. States must come from one
    step boundary (every rank has taken the same number of blocks).
    """
    if not saved or world_size < 1:
        raise ValueError("resume_states needs every rank's saved state and world_size >= 1")
    old_world = len(saved)
    if sorted(s["rank"] for s in saved) != list(range(old_world)) or {s["world"] for s in saved} != {old_world}:
        raise ValueError(f"expected the states of ranks 0..{old_world - 1} of one run, got ranks "
                         f"{[s['rank'] for s in saved]} of worlds {sorted({s['world'] for s in saved})}")
    saved = sorted(saved, key=lambda s: s["rank"])
    if world_size == old_world:
        return [dict(s) for s in saved]
    if len({s["blocks"] for s in saved}) != 1:
        raise ValueError("the states are not from one step boundary (ranks took different numbers of blocks)")
    blocks = sum(s["blocks"] for s in saved) // world_size
    common = {k: saved[0][k] for k in ("kind", "seed", "corpus")}
    if saved[0]["kind"] == "tokens":
        base = saved[0]["base"] + old_world * saved[0]["taken"]
        return [{**common, "world": world_size, "rank": r, "blocks": blocks, "base": base, "taken": 0}
                for r in range(world_size)]
    segments = unread_segments(saved)
    epoch = max(s["epoch"] for s in saved) + 1
    return [{**common, "world": world_size, "rank": r, "blocks": blocks, "epoch": epoch, "step": 0, "doc": 0,
             "offset": 0, "token": 0, "pending": segments[r::world_size]} for r in range(world_size)]


def unread_segments(saved: list[dict]) -> list[dict]:
    """Everything the old ranks had not read up to the end of the latest epoch any of them entered."""
    n_units, seed, world = saved[0]["corpus"]["files"], saved[0]["seed"], len(saved)
    last_epoch = max(s["epoch"] for s in saved)
    segments = []
    for state in saved:
        segments += state["pending"]
        for epoch in range(state["epoch"], last_epoch + 1):
            units = epoch_units(n_units, seed, epoch, state["rank"], world)
            first = state["step"] if epoch == state["epoch"] else 0
            for k in range(first, len(units)):
                resumed = (epoch, k) == (state["epoch"], state["step"])
                segments.append({"epoch": epoch, "unit": units[k], "doc": state["doc"] if resumed else 0,
                                 "offset": state["offset"] if resumed else 0, "token": state["token"] if resumed else 0})
    place = {}  # (epoch, unit) -> place in that epoch's permutation
    for epoch in {s["epoch"] for s in segments}:
        place.update({(epoch, int(u)): i for i, u in enumerate(epoch_order(n_units, seed, epoch))})
    return sorted(segments, key=lambda s: (s["epoch"], place[(s["epoch"], s["unit"])]))
