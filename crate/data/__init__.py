"""Corpora streamed into packed GPT-2 token blocks for training, validation and interpretability.

    from crate.data import DataConfig, train_batches, val_batches, resume_states, check_sources, read_blocks
    check_sources(cfg)                                  # driver, before any worker starts
    stream = train_batches(cfg, micro_batch_size=8, rank=r, world_size=w, state=saved_state_or_None)
    for batch in stream:                                # Batch(tokens (B, context+1) int64, state, set_tokens)
        inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
        ...; checkpoint["data"] = batch.state           # JSON; resume is block-exact
    stream.stats()                                      # documents, tokens, skipped/<reason>, ... (metrics)

The core (sources, documents, packing, shards, stream with engine="local") needs numpy and torch only;
`engine: ray` runs the same core inside Ray Data read tasks. See README "Data" and `crate.data.stream`.
"""

from crate.data.config import BUILTIN_TRAIN, BUILTIN_VAL, DataConfig
from crate.data.documents import REPAIRED, SKIPPED
from crate.data.packing import StreamStats
from crate.data.shards import TokenShards, pretokenize
from crate.data.sources import SourceError
from crate.data.stream import (Batch, BlockStream, check_sources, read_blocks, resume_states, train_batches,
                               val_batches)

__all__ = [
    "BUILTIN_TRAIN", "BUILTIN_VAL", "Batch", "BlockStream", "DataConfig", "REPAIRED", "SKIPPED", "SourceError",
    "StreamStats", "TokenShards", "check_sources", "pretokenize", "read_blocks", "resume_states",
    "train_batches", "val_batches",
]
