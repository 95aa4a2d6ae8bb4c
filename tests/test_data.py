"""crate.data without Ray: sources, bad input, exact packing, determinism, block-exact resume, sharding across
ranks, re-partition, pretokenized shards, the hub layout through a local filesystem, the jobs."""

import gzip
import json
import random
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from fsspec.implementations.local import LocalFileSystem

from crate.config import load_config
from crate.data import (DataConfig, SourceError, TokenShards, check_sources, pretokenize, read_blocks,
                        resume_states, train_batches, val_batches)
from crate.data.documents import ReadOptions, Start, documents
from crate.data.reshard import reshard
from crate.data.sources import resolve
from crate.data.stream import epoch_units
from crate.errors import ConfigError
from crate.tokenizer import EOT_TOKEN, gpt2_tokenizer

WORDS = ("the model reads sparse codes of tokens , and every layer compresses ; neurons fire when a "
         "pattern appears in text : def return import class 42 1999 é ü 東京 \n").split(" ")
CONTEXT = 16  # blocks of 17 tokens
B = 2


def text(rng: random.Random, n_words: int) -> str:
    """Random words, never whitespace only (those are skipped as empty documents)."""
    return " ".join([rng.choice(WORDS[:-1])] + [rng.choice(WORDS) for _ in range(n_words - 1)])


def clean_docs(seed: int, n: int, sets=("Alpha", "Beta")) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": text(rng, rng.randint(1, 90)), "meta": {"pile_set_name": rng.choice(sets)}} for _ in range(n)]


def jsonl(docs: list[dict]) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


def write_clean_corpus(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Five files, one per format; returns {file name: [(text, set name), ...]} in file order."""
    root.mkdir(parents=True)
    files = {name: clean_docs(i, n) for i, (name, n) in
             enumerate([("a.jsonl", 7), ("b.jsonl.zst", 9), ("c.jsonl.gz", 6), ("d.parquet", 8)])}
    (root / "a.jsonl").write_bytes(jsonl(files["a.jsonl"]))
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(files["b.jsonl.zst"])))
    (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl(files["c.jsonl.gz"])))
    pq.write_table(pa.Table.from_pylist(files["d.parquet"]), root / "d.parquet", row_group_size=3)
    (root / "e.txt").write_text(text(random.Random(9), 120))
    expected = {name: [(d["text"], d["meta"]["pile_set_name"]) for d in docs] for name, docs in files.items()}
    expected["e.txt"] = [((root / "e.txt").read_text(), "unlabelled")]
    return expected


def token_ids(doc_text: str) -> list[int]:
    return gpt2_tokenizer().encode_ordinary(doc_text) + [EOT_TOKEN]


def file_tokens(docs: list[tuple[str, str]]) -> list[int]:
    return [t for doc_text, _ in docs for t in token_ids(doc_text)]


def flat(batches) -> list[int]:
    return [t for b in batches for t in b.tokens.flatten().tolist()]


def take(stream, n: int) -> list:
    return [batch for _, batch in zip(range(n), stream)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "corpus"
    return root, write_clean_corpus(root)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    (root / "val.jsonl").write_bytes(jsonl(clean_docs(99, 12)))
    return root


def config(train, val, **overrides) -> DataConfig:
    return DataConfig(**{"train": str(train), "val": str(val), "context": CONTEXT, "engine": "local", **overrides})


# ---- packing -------------------------------------------------------------------------------------------------


def test_packing_keeps_every_token_and_points_at_the_next_block():
    from crate.data.packing import Packer

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, rng.integers(1, 40)).astype(np.uint16) for _ in range(50)]
    starts = np.cumsum([0] + [len(d) for d in docs])
    packer, blocks = Packer(17), []
    for i, doc in enumerate(docs):
        blocks += list(packer.add(doc, f"set{i % 3}", i))
    stream = np.concatenate(docs)
    assert len(blocks) == len(stream) // 17 and packer.pending_tokens == len(stream) % 17
    assert np.array_equal(np.concatenate([b.tokens for b in blocks] + [packer.carry]), stream)
    for j, block in enumerate(blocks):
        assert starts[block.where] + block.token == (j + 1) * 17  # the next block starts exactly there
        assert sum(block.set_tokens.values()) == 17
        sets = Counter()
        for i in range(len(docs)):
            overlap = min(starts[i + 1], (j + 1) * 17) - max(starts[i], j * 17)
            if overlap > 0:
                sets[f"set{i % 3}"] += overlap
        assert block.set_tokens == dict(sets)


def test_read_blocks_is_the_corpus_concatenated_and_cut(clean):
    root, expected = clean
    stream = [t for name in sorted(expected) for t in file_tokens(expected[name])]
    blocks = list(read_blocks(str(root), 17, 10**6))
    assert len(blocks) == len(stream) // 17
    assert all(b.dtype == np.int64 and b.shape == (17,) for b in blocks)
    assert np.concatenate(blocks).tolist() == stream[: len(blocks) * 17]
    assert [b.tolist() for b in read_blocks(str(root), 17, 3)] == [b.tolist() for b in blocks[:3]]


# ---- bad input -----------------------------------------------------------------------------------------------


def test_bad_records_are_skipped_or_repaired_counted_and_the_rest_is_read(tmp_path):
    good = clean_docs(5, 3)
    lines = [json.dumps(good[0]).encode(), b'{"text": "unterminated', b'{"text": 5}', b'{"meta": {}}', b"[1, 2]",
             b'{"text": ""}', b'{"text": "  \\n "}', b'{"text": "bad \xff\xfe bytes"}', b'{"text": "lone \\ud800 half"}',
             b"", json.dumps(good[1]).encode()]
    (tmp_path / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    cut_docs = clean_docs(6, 3000)  # several 128 KiB zstd blocks, so a prefix decodes
    full = zstandard.ZstdCompressor().compress(jsonl(cut_docs))
    (tmp_path / "cut.jsonl.zst").write_bytes(full[: len(full) // 2])
    (tmp_path / "garbage.jsonl.zst").write_bytes(b"this is not zstd" * 100)
    (tmp_path / "last.jsonl").write_bytes(jsonl(good[2:]))
    stream = val_batches(config(tmp_path, tmp_path), B, 0, 1, max_blocks=10**6)
    batches = list(stream)
    stats = stream.stats()
    assert stats["skipped/malformed_json"] == 1
    assert stats["skipped/missing_text"] == 3
    assert stats["skipped/empty"] == 2
    assert stats["skipped/corrupt_file"] == 2  # the truncated and the undecodable file
    assert stats["repaired/invalid_utf8"] == 1 and stats["repaired/lone_surrogate"] == 1
    assert stats["skipped"] == 8 and stats["tokens"] == stats["blocks"] * 17 + stats["dropped_tail_tokens"]
    tokens = flat(batches)
    repaired = token_ids("bad \ufffd\ufffd bytes") + token_ids("lone \ufffd half")
    assert tokens[: len(token_ids(good[0]["text"]) + repaired)] == token_ids(good[0]["text"]) + repaired
    # the truncated file yields a strict prefix of its documents, then the next files are read
    cut = [d for d in documents(resolve(str(tmp_path / "cut.jsonl.zst"), DataConfig()).units[0], Start(),
                                ReadOptions())]
    assert cut[-1].issue == "corrupt_file" and 0 < len(cut) - 1 < len(cut_docs)
    assert [d.tokens.tolist() for d in cut[:-1]] == [token_ids(d["text"]) for d in cut_docs[: len(cut) - 1]]
    assert stats["documents"] == 5 + len(cut) - 1


def test_a_cut_zstd_file_counts_the_bytes_and_records_it_lost(tmp_path):
    """Half a zstd file keeps the records before the cut and counts what was lost past them: the bytes exactly, to
    the end the frame header declares, and the records they held as estimated from the file's mean record size;
    where the header declares no size (a streamed frame, gzip), only the incomplete record at the cut, a lower
    bound the warning calls one."""
    docs = clean_docs(6, 3000)
    data = jsonl(docs)
    full = zstandard.ZstdCompressor().compress(data)  # the frame header records the content size
    (tmp_path / "cut.jsonl.zst").write_bytes(full[: len(full) // 2])
    streamed = zstandard.ZstdCompressor().compressobj()
    unsized = streamed.compress(data) + streamed.flush()
    (tmp_path / "unsized.jsonl.zst").write_bytes(unsized[: len(unsized) // 2])
    stats = {}
    for name in ("cut.jsonl.zst", "unsized.jsonl.zst"):
        stream = val_batches(config(tmp_path / "x", tmp_path / name), B, 0, 1, max_blocks=10**6)
        list(stream)
        stats[name] = stream.stats()
    kept = [d for d in documents(resolve(str(tmp_path / "cut.jsonl.zst"), DataConfig()).units[0], Start(), ReadOptions())]
    kept_bytes = len(jsonl(docs[: len(kept) - 1]))
    assert stats["cut.jsonl.zst"]["skipped/corrupt_file"] == 1
    assert stats["cut.jsonl.zst"]["lost_bytes/corrupt_file"] == len(data) - kept_bytes > len(data) // 3
    lost_records = len(docs) - (len(kept) - 1)
    estimated = stats["cut.jsonl.zst"]["lost_records_estimated/corrupt_file"]
    assert abs(estimated - lost_records) <= 0.05 * lost_records, (estimated, lost_records)  # 1,699 for 1,679
    unsized_lost = stats["unsized.jsonl.zst"]["lost_bytes/corrupt_file"]
    assert 0 < unsized_lost < 2000 and stats["unsized.jsonl.zst"]["lost_bytes/unmeasured_files"] == 1


def test_a_100_mb_document_is_skipped_without_being_held_in_memory(tmp_path):
    docs = clean_docs(7, 2)
    with open(tmp_path / "huge.jsonl", "wb") as f:
        f.write(jsonl(docs[:1]) + b'{"text": "')
        chunk = b"word " * (2**20 // 5)
        for _ in range(100):
            f.write(chunk)
        f.write(b'"}\n' + jsonl(docs[1:]))
    cfg = config(tmp_path, tmp_path, max_document_bytes=4 * 2**20)
    tracemalloc.start()
    stream = val_batches(cfg, B, 0, 1, max_blocks=10**6)
    tokens = flat(stream)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stream.stats()["skipped/too_long"] == 1 and stream.stats()["documents"] == 2
    assert tokens == (token_ids(docs[0]["text"]) + token_ids(docs[1]["text"]))[: len(tokens)]
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.0f} MiB while skipping a 100 MiB record"


# ---- determinism, resume, ranks -------------------------------------------------------------------------------


def test_same_seed_same_blocks_other_seed_other_order(clean, val_dir):
    root, _ = clean
    runs = [take(train_batches(config(root, val_dir, seed=seed), B, 1, 2), 40) for seed in (0, 0, 1)]
    assert [b.tokens.tolist() for b in runs[0]] == [b.tokens.tolist() for b in runs[1]]
    assert [b.state for b in runs[0]] == [b.state for b in runs[1]]
    assert flat(runs[0]) != flat(runs[2])
    json.dumps([b.state for b in runs[0]])  # states are JSON


def test_resume_is_block_exact_from_every_batch(clean, val_dir):
    """Every file format, mid-document positions, compressed-file skips and epoch boundaries."""
    root, _ = clean
    cfg = config(root, val_dir)
    run = take(train_batches(cfg, B, 0, 1), 150)
    assert run[-1].state["epoch"] >= 1, "the run must cross an epoch boundary"
    for k in range(len(run) - 3):
        resumed = take(train_batches(cfg, B, 0, 1, state=json.loads(json.dumps(run[k].state))), 3)
        assert [b.tokens.tolist() for b in resumed] == [b.tokens.tolist() for b in run[k + 1:k + 4]], k
        assert [b.state for b in resumed] == [b.state for b in run[k + 1:k + 4]]


def schedule_tokens(root: Path, expected, epochs, rank: int, world: int, seed: int = 0) -> list[int]:
    names = sorted(expected)
    assert [u.name for u in resolve(str(root), DataConfig()).units] == names
    return [t for e in epochs for u in epoch_units(len(names), seed, e, rank, world)
            for t in file_tokens(expected[names[u]])]


def test_two_ranks_read_disjoint_files_that_cover_every_epoch(clean, val_dir):
    root, expected = clean
    n = len(expected)
    for epoch in range(3):
        parts = [epoch_units(n, 0, epoch, r, 2) for r in range(2)]
        assert sorted(parts[0] + parts[1]) == list(range(n))
    for rank in range(2):
        batches = take(train_batches(config(root, val_dir), B, rank, 2), 60)
        assert batches[-1].state["epoch"] >= 1
        tokens = flat(batches)
        expected_tokens = schedule_tokens(root, expected, range(batches[-1].state["epoch"] + 1), rank, 2)
        assert tokens == expected_tokens[: len(tokens)]


@pytest.mark.parametrize("new_world", [3, 1])
def test_resume_with_another_world_size_loses_and_repeats_nothing(clean, val_dir, new_world):
    root, expected = clean
    cfg = config(root, val_dir)
    old = [take(train_batches(cfg, B, r, 2), 37) for r in range(2)]
    states = resume_states([run[-1].state for run in old], new_world)
    assert resume_states([run[-1].state for run in old], 2) == [run[-1].state for run in old]
    last_epoch = states[0]["epoch"]
    assert all(s["epoch"] == last_epoch and s["world"] == new_world for s in states)
    consumed = Counter(t for run in old for t in flat(run))
    for rank, state in enumerate(states):
        pending = [t for seg in state["pending"] for t in segment_tokens(root, expected, seg)]
        stream = train_batches(cfg, B, rank, new_world, state=state)
        tokens = []
        while len(tokens) < len(pending) + 17:
            tokens += flat(take(stream, 1))
        assert tokens[: len(pending)] == pending  # the new rank reads its pending segments first, exactly
        after = schedule_tokens(root, expected, [last_epoch], rank, new_world)
        assert tokens[len(pending):] == after[: len(tokens) - len(pending)]  # then the next epoch, new world
        consumed.update(pending)
    every_epoch = Counter(t for name in expected for t in file_tokens(expected[name]))
    assert consumed == Counter({t: n * last_epoch for t, n in every_epoch.items()})


def segment_tokens(root: Path, expected, segment: dict) -> list[int]:
    name = sorted(expected)[segment["unit"]]
    return file_tokens(expected[name][segment["doc"]:])[segment["token"]:]  # doc = line, row or 0: all 1 doc each


def test_token_budget_ends_every_rank_after_the_same_number_of_batches(clean, val_dir):
    root, _ = clean
    cfg = config(root, val_dir, token_budget=2 * B * CONTEXT * 5 + 7)
    assert [len(list(train_batches(cfg, B, r, 2))) for r in range(2)] == [5, 5]
    with pytest.raises(ConfigError, match="token_budget"):
        train_batches(config(root, val_dir, token_budget=10), B, 0, 2)


def test_val_batches_are_the_first_blocks_dealt_to_ranks(clean, val_dir):
    root, _ = clean
    cfg = config(val_dir, root)  # the clean corpus as validation
    blocks = [b.tolist() for b in read_blocks(str(root), 17, 9)]
    per_rank = [[row for batch in val_batches(cfg, B, r, 2, max_blocks=9) for row in batch.tokens.tolist()]
                for r in range(2)]
    assert per_rank == [blocks[0:8:2], blocks[1:8:2]]  # 9 // 2 * 2 blocks, round-robin
    with pytest.raises(ConfigError, match="val"):
        list(val_batches(cfg, B, 0, 10, max_blocks=3))


# ---- pretokenized shards --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(clean, tmp_path_factory):
    root, _ = clean
    out = tmp_path_factory.mktemp("shards") / "tokens"
    index = pretokenize(str(root), out, DataConfig(), shard_bytes=1500, use_ray=False, progress=False)
    assert len(index["shards"]) > 2, "the test needs blocks that span shards"
    return out


def test_pretokenized_shards_hold_the_raw_stream_and_its_mixture(clean, shards):
    root, _ = clean
    raw = [b.tolist() for b in read_blocks(str(root), 17, 10**6)]
    assert [b.tolist() for b in read_blocks(str(shards), 17, 10**6)] == raw
    cfg_raw, cfg_tok = config(shards, root), config(root, shards)
    val_raw, val_tok = list(val_batches(cfg_raw, B, 0, 1, 50)), list(val_batches(cfg_tok, B, 0, 1, 50))
    assert [b.set_tokens for b in val_raw] == [b.set_tokens for b in val_tok]
    assert flat(val_raw) == flat(val_tok)


def test_pretokenized_ranks_cover_each_epoch_once_resume_and_repartition_exactly(shards, val_dir, monkeypatch):
    monkeypatch.setattr("crate.data.stream.WINDOW", 4)  # several shuffled windows in a small corpus
    cfg = config(shards, val_dir)
    n_blocks = TokenShards(shards).n_tokens // 17
    epoch = [tuple(row) for r in range(2) for b in take(train_batches(cfg, 1, r, 2), (n_blocks - r + 1) // 2)
             for row in b.tokens.tolist()]
    every_block = [tuple(b.tolist()) for b in read_blocks(str(shards), 17, n_blocks)]
    assert sorted(epoch) == sorted(every_block) and epoch != every_block  # each block once, shuffled

    run = take(train_batches(cfg, B, 1, 2), 20)
    resumed = take(train_batches(cfg, B, 1, 2, state=run[9].state), 10)
    assert flat(resumed) == flat(run[10:])

    # 2 ranks x 6 batches, then 3 ranks: together they read the single-rank sequence, in stride
    single = [row for b in take(train_batches(cfg, 1, 0, 1), 60) for row in b.tokens.tolist()]
    old = [take(train_batches(cfg, B, r, 2), 6) for r in range(2)]
    new_states = resume_states([run_[-1].state for run_ in old], 3)
    new = [[row for b in take(train_batches(cfg, B, r, 3, state=s), 4) for row in b.tokens.tolist()]
           for r, s in enumerate(new_states)]
    assert all(rows == single[r:24:2] for r, rows in enumerate(
        [[row for b in run_ for row in b.tokens.tolist()] for run_ in old]))
    assert all(rows == single[24 + r:24 + 3 * 8:3] for r, rows in enumerate(new))


def test_pretokenize_resumes_and_keeps_finished_shards(clean, tmp_path):
    root, _ = clean
    out = tmp_path / "tokens"
    pretokenize(str(root), out, DataConfig(), shard_bytes=1500, use_ray=False, progress=False)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.bin")}
    (out / "shard-00001.json").unlink()
    (out / "index.json").unlink()
    pretokenize(str(root), out, DataConfig(), shard_bytes=1500, use_ray=False, progress=False)
    changed = [name for name, t in kept.items() if (out / name).stat().st_mtime_ns != t]
    assert changed == ["shard-00001.bin"]
    assert [b.tolist() for b in read_blocks(str(out), 17, 10**6)] == [b.tolist() for b in read_blocks(str(root), 17, 10**6)]


def test_reshard_to_parquet_keeps_the_stream_and_counts_what_it_drops(clean, tmp_path):
    root, expected = clean
    messy = tmp_path / "messy"
    messy.mkdir()
    for path in root.iterdir():
        (messy / path.name).write_bytes(path.read_bytes())
    (messy / "z.jsonl").write_bytes(b'not json\n{"text": ""}\n' + jsonl(clean_docs(40, 30)))
    counts = reshard(str(messy), tmp_path / "parquet", DataConfig(), file_bytes=2000, use_ray=False, progress=False)
    parts = sorted((tmp_path / "parquet").glob("*.parquet"))
    assert len(parts) > len(expected) + 1 and counts["skipped/malformed_json"] == 1 and counts["skipped/empty"] == 1
    assert counts["documents"] == sum(len(docs) for docs in expected.values()) + 30
    assert [b.tolist() for b in read_blocks(str(tmp_path / "parquet"), 17, 10**6)] == \
           [b.tolist() for b in read_blocks(str(messy), 17, 10**6)]
    (tmp_path / "parquet" / "00001.json").unlink()  # input 1 unfinished: a rerun converts it again, only it
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    assert reshard(str(messy), tmp_path / "parquet", DataConfig(), 2000, use_ray=False, progress=False) == counts
    changed = {p.name for p in (tmp_path / "parquet").glob("*.parquet") if p.stat().st_mtime_ns != before[p.name]}
    assert changed and all(name.startswith("00001-") for name in changed)


# ---- sources: the hub layout, retries, pre-flight checks, the built-in corpus -----------------------------


@pytest.fixture(scope="module")
def pile_root(tmp_path_factory):
    """The hub repository's layout (train/NN.jsonl.zst, val.jsonl.zst) on a local filesystem."""
    root = tmp_path_factory.mktemp("pile")
    (root / "train").mkdir()
    for i in range(3):
        (root / "train" / f"{i:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            jsonl(clean_docs(20 + i, 30, sets=("Pile-CC", "Github", "ArXiv")))))
    (root / "val.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(clean_docs(30, 20))))
    return root


def test_pile_uris_stream_the_hub_layout_through_fsspec(pile_root):
    cfg = DataConfig(train="pile://train", val="pile://val", pile_url=f"file://{pile_root}", context=CONTEXT,
                     engine="local", include_sets=["Github", "ArXiv"])
    check_sources(cfg)
    assert [u.name for u in resolve("pile://train", cfg).units] == ["00.jsonl.zst", "01.jsonl.zst", "02.jsonl.zst"]
    batches = take(train_batches(cfg, B, 0, 1), 30)
    assert set().union(*(b.set_tokens for b in batches)) <= {"Github", "ArXiv"}
    direct = take(train_batches(DataConfig(train=str(pile_root / "train"), val=str(pile_root / "val.jsonl.zst"),
                                           context=CONTEXT, engine="local", include_sets=["Github", "ArXiv"]),
                                B, 0, 1), 30)
    assert flat(batches) == flat(direct)


class FlakyFileSystem(LocalFileSystem):
    """A local filesystem whose reads fail like a network: every `fail_every`-th read raises."""

    protocol = ("flaky",)
    fail_every = 3
    reads = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path[len("flaky://"):] if path.startswith("flaky://") else path)

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        read = file.read

        def flaky_read(*args):
            FlakyFileSystem.reads += 1
            if FlakyFileSystem.reads % FlakyFileSystem.fail_every == 0:
                raise ConnectionError("connection reset by peer")
            return read(*args)

        file.read = flaky_read
        return file


def test_remote_errors_are_retried_at_the_same_byte_then_fail_naming_the_shard(pile_root, monkeypatch):
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    monkeypatch.setattr("crate.data.documents.CHUNK_BYTES", 512)  # many reads per file
    cfg = DataConfig(train="pile://train", val="pile://val", pile_url=f"flaky://{pile_root}", context=CONTEXT,
                     engine="local", retry_backoff_s=0.0)
    reference = flat(take(train_batches(DataConfig(**{**cfg.__dict__, "pile_url": str(pile_root)}), B, 0, 1), 40))
    assert flat(take(train_batches(cfg, B, 0, 1), 40)) == reference
    FlakyFileSystem.fail_every = 1  # the connection is down for good
    try:
        with pytest.raises(SourceError, match=r"\d\d\.jsonl\.zst.*ConnectionError.*6 attempts"):
            take(train_batches(DataConfig(**{**cfg.__dict__, "retries": 5}), B, 0, 1), 1)
    finally:
        FlakyFileSystem.fail_every = 3


def test_bad_sources_fail_before_any_work_naming_the_field(tmp_path, clean, val_dir, shards):
    root, _ = clean
    (tmp_path / "empty").mkdir()
    (tmp_path / "zeros").mkdir()
    (tmp_path / "zeros" / "a.jsonl").write_bytes(b"")
    cases = [(config(tmp_path / "missing", val_dir), "train", "no such file"),
             (config(root, tmp_path / "empty"), "val", "no corpus files"),
             (config(tmp_path / "zeros", val_dir), "train", "empty"),
             (config("nosuchprotocol://x/y", val_dir), "train", "not a usable"),
             (config(root, root), "val", "same corpus"),
             (config(shards, val_dir, include_sets=["Alpha"]), "train", "pretokenized")]
    for cfg, field, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            check_sources(cfg)
        assert error.value.field == f"data.{field}"  # the full dotted field of the section that holds it
    for raw, field in [({"train": "stdlib://test"}, "train"), ({"val": "pile://dev"}, "val"),
                       ({"engine": "spark"}, "engine"), ({"context": 0}, "context"),
                       ({"include_sets": ["A"], "exclude_sets": ["A"]}, "exclude_sets")]:
        with pytest.raises(ConfigError) as error:
            load_config(DataConfig, raw)
        assert error.value.field == field


def test_preflight_refuses_a_corpus_without_usable_text_naming_the_problem(tmp_path, val_dir):
    (tmp_path / "cols").mkdir()
    pq.write_table(pa.Table.from_pylist([{"body": "a document", "meta": {"pile_set_name": "X"}}] * 4),
                   tmp_path / "cols" / "a.parquet")
    (tmp_path / "blank").mkdir()
    for i in range(5):
        (tmp_path / "blank" / f"{i}.txt").write_text(" \n\t \n" * (i + 1))
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": "   "}\n{"text": "\\n"}\n')
    with pytest.raises(ConfigError) as error:
        check_sources(config(tmp_path / "cols", val_dir))
    assert error.value.field == "data.train" and "no column 'text'" in error.value.message
    assert "body" in error.value.message and "text_field" in error.value.message
    with pytest.raises(ConfigError) as error:
        check_sources(config(tmp_path / "blank", val_dir))
    assert error.value.field == "data.train" and "no usable document" in error.value.message
    assert "empty 7" in error.value.message
    (tmp_path / "cols_val").mkdir()
    pq.write_table(pa.Table.from_pylist([{"body": "held out"}]), tmp_path / "cols_val" / "v.parquet")
    check_sources(config(tmp_path / "cols", tmp_path / "cols_val", text_field="body"))  # the right column passes
    check_sources(config(tmp_path / "cols", tmp_path / "cols_val", text_field="body",
                         include_sets=["Y", "unlabelled"]))  # documents that filters drop are no problem


def test_a_file_that_vanishes_mid_run_is_skipped_and_counted_not_retried(tmp_path, val_dir):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jsonl").write_bytes(jsonl(clean_docs(40 + i, 40)))
    stream = train_batches(config(root, val_dir), B, 0, 1)
    next(stream)
    order = [u.name for u in resolve(str(root), DataConfig()).units]
    vanished = order[epoch_units(4, 0, 0, 0, 1)[-1]]  # the last file of the first epoch: not open yet
    (root / vanished).unlink()
    take(stream, 600)  # past the first epoch
    stats = stream.stats()
    assert stats["skipped/missing_file"] >= 1 and stats["documents"] > 100


def test_builtin_corpus_is_the_stdlib_split_disjointly_and_labelled_github():
    cfg = DataConfig(engine="local")
    check_sources(cfg)
    train, val = (resolve(uri, cfg).units for uri in (cfg.train, cfg.val))
    assert {u.name for u in train}.isdisjoint({u.name for u in val}) and len(val) < len(train) / 10
    assert any(u.name == "json/decoder.py" for u in train + val)
    batch = next(train_batches(cfg, 1, 0, 1))
    assert set(batch.set_tokens) == {"Github"} and batch.tokens.shape == (1, 1025)


@pytest.mark.integration
def test_the_core_runs_without_ray_deepspeed_or_mlflow(clean, val_dir):
    root, _ = clean
    script = (f"import sys; sys.modules.update(ray=None, deepspeed=None, mlflow=None)\n"
              f"from crate.data import DataConfig, train_batches, read_blocks\n"
              f"cfg = DataConfig(train={str(root)!r}, val={str(val_dir)!r}, context=16, engine='local')\n"
              f"print(next(train_batches(cfg, 2, 0, 1)).tokens.shape, len(list(read_blocks({str(root)!r}, 17, 5))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.Size([2,", "17])", "5"]


# ---- jobs --------------------------------------------------------------------------------------------------


def run_job(name: str, *args: str) -> subprocess.CompletedProcess:
    job = Path(__file__).parents[1] / "jobs" / name
    return subprocess.run([sys.executable, str(job), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_corpus_stats_job_reports_sets_and_skipped_records(clean, tmp_path):
    root, expected = clean
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": 1}\nnot json\n' + jsonl(clean_docs(3, 2)))
    out = run_job("corpus_stats.py", str(root), str(tmp_path / "*.jsonl"), str(tmp_path / "missing"))
    assert out.returncode == 0, out.stderr
    for name in ("Alpha", "Beta", "unlabelled"):
        assert name in out.stdout
    n_docs = sum(len(docs) for docs in expected.values()) + 2
    assert f"{len(expected) + 1} files, {n_docs} documents" in out.stdout
    assert "malformed_json 1" in out.stdout and "missing_text 1" in out.stdout and "no such file" in out.stdout
    assert run_job("corpus_stats.py", str(tmp_path / "missing")).returncode == 1


@pytest.mark.integration
def test_pretokenize_job_writes_shards_training_reads(clean, val_dir, tmp_path):
    root, _ = clean
    out = run_job("pretokenize.py", str(root), str(tmp_path / "tok"), "--local", "exclude_sets=[Beta]")
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "tok" / "index.json").read_text())
    assert index["exclude_sets"] == ["Beta"] and index["stats"]["filtered"] > 0
    batch = next(train_batches(config(tmp_path / "tok", val_dir), B, 0, 1))
    assert set(batch.set_tokens) <= {"Alpha", "unlabelled"}
