"""crate.data's Ray Data engine: the same blocks, states and counters as the in-process engine, resume under
Ray, a pipeline built inside a Ray actor (as in a Ray Train worker), and pretokenizing with Ray tasks."""

import json
from collections import Counter

import pytest
import zstandard

from crate.data import DataConfig, pretokenize, read_blocks, train_batches
from test_data import B, clean_docs, config, flat, jsonl, take, write_clean_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def ray_instance(ray_cluster):
    import ray

    return ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The clean fixture corpus plus a file of bad records and a truncated multi-frame .zst."""
    root = tmp_path_factory.mktemp("ray") / "corpus"
    write_clean_corpus(root)
    (root / "f.jsonl").write_bytes(b'not json\n{"text": 3}\n{"text": ""}\n' + jsonl(clean_docs(11, 5)))
    docs = clean_docs(12, 60)
    frames = [zstandard.ZstdCompressor().compress(jsonl(docs[i:i + 10])) for i in range(0, 60, 10)]
    (root / "g.jsonl.zst").write_bytes(b"".join(frames)[: -len(frames[-1]) // 2])  # cut inside the last frame
    val = root.parent / "val.jsonl"
    val.write_bytes(jsonl(clean_docs(13, 10)))
    return root, val


def test_ray_engine_yields_the_local_engines_blocks_states_and_counters(corpus):
    root, val = corpus
    issues = Counter()
    for rank in range(2):
        streams = {engine: train_batches(config(root, val, engine=engine, read_tasks=2), B, rank, 2)
                   for engine in ("local", "ray")}
        runs = {engine: take(stream, 600) for engine, stream in streams.items()}
        assert runs["ray"][-1].state["epoch"] >= 1, "the comparison must cross an epoch boundary"
        assert [b.tokens.tolist() for b in runs["ray"]] == [b.tokens.tolist() for b in runs["local"]]
        assert [b.state for b in runs["ray"]] == [b.state for b in runs["local"]]
        assert [b.set_tokens for b in runs["ray"]] == [b.set_tokens for b in runs["local"]]
        ray_stats, local_stats = streams["ray"].stats(), streams["local"].stats()
        streams["ray"].close()
        assert ray_stats == {**local_stats, "blocks": ray_stats["blocks"]}  # Ray reads ahead; counts are per record
        issues.update({k: v for k, v in ray_stats.items() if k.startswith("skipped/")})
    assert issues["skipped/corrupt_file"] >= 1 and issues["skipped/malformed_json"] >= 1


def test_ray_engine_resumes_block_exact(corpus):
    root, val = corpus
    local = take(train_batches(config(root, val), B, 1, 2), 120)
    for k in (17, 95):
        state = json.loads(json.dumps(local[k].state))
        resumed = take(train_batches(config(root, val, engine="ray"), B, 1, 2, state=state), 20)
        assert flat(resumed) == flat(local[k + 1:k + 21])


def test_a_pipeline_built_inside_an_actor_like_a_train_worker(ray_instance, corpus):
    root, val = corpus

    @ray_instance.remote(num_cpus=0.5)
    class Worker:
        def first_batches(self, cfg: DataConfig, n: int) -> list:
            stream = train_batches(cfg, 2, 0, 1)  # only importable names here: the actor runs in another process
            return [next(stream).tokens.tolist() for _ in range(n)]

    cfg = config(root, val, engine="ray", read_cpus=0.5)
    remote = ray_instance.get(Worker.remote().first_batches.remote(cfg, 30), timeout=300)
    assert remote == [b.tokens.tolist() for b in take(train_batches(config(root, val), B, 0, 1), 30)]


def test_pretokenize_with_ray_tasks_writes_what_the_local_writer_writes(corpus, tmp_path):
    root, _ = corpus
    with_ray = pretokenize(str(root), tmp_path / "ray", DataConfig(), shard_bytes=1500, progress=False)
    local = pretokenize(str(root), tmp_path / "local", DataConfig(), shard_bytes=1500, use_ray=False, progress=False)
    assert len(with_ray["shards"]) > 2 and with_ray["shards"] == local["shards"]
    assert [b.tolist() for b in read_blocks(str(tmp_path / "ray"), 17, 10**6)] == \
           [b.tolist() for b in read_blocks(str(root), 17, 10**6)]
