"""Packing: documents concatenated into one token stream, cut into fixed blocks of `length` tokens.

The remainder of every document carries into the next block, across batches and files, so no token is
dropped except the tail of a finite stream (fewer than `length` tokens, reported as `dropped_tail_tokens`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from crate.data.documents import Document


class Block(NamedTuple):
    tokens: np.ndarray  # (length,) uint16
    set_tokens: dict[str, int]  # tokens of each pile_set_name in this block
    where: Any  # the document the next block starts in (the caller's tag for it)
    token: int  # ... and the index of its first token there (may equal the document's length)


class Packer:
    def __init__(self, length: int):
        self.length = length
        self.carry = np.empty(0, dtype=np.uint16)
        self.carry_sets: Counter[str] = Counter()

    def add(self, tokens: np.ndarray, set_name: str, where: Any) -> Iterator[Block]:
        """Blocks completed by this document; token indices in them are relative to `tokens`."""
        if len(tokens) == 0:
            return
        length, carried = self.length, len(self.carry)
        total = carried + len(tokens)
        if total < length:
            self.carry = np.concatenate([self.carry, tokens])
            self.carry_sets[set_name] += len(tokens)
            return
        stream = np.concatenate([self.carry, tokens])
        n_blocks = total // length
        for j in range(n_blocks):
            end = (j + 1) * length - carried  # the block ends before token `end` of this document
            sets = Counter(self.carry_sets) if j == 0 else Counter()
            sets[set_name] += end - max(0, j * length - carried)
            yield Block(stream[j * length:(j + 1) * length], dict(sets), where, end)
        self.carry = stream[n_blocks * length:].copy()
        self.carry_sets = Counter({set_name: len(self.carry)}) if len(self.carry) else Counter()

    @property
    def pending_tokens(self) -> int:
        return len(self.carry)


@dataclass
class StreamStats:
    """Cumulative counters of one stream (since it was opened, not since the corpus start)."""

    documents: int = 0  # documents tokenized (including repaired ones)
    tokens: int = 0  # their tokens, <|endoftext|> included
    blocks: int = 0  # blocks handed out
    filtered: int = 0  # documents dropped by include_sets / exclude_sets
    dropped_tail_tokens: int = 0  # tokens after the last full block of a finite stream
    skipped: Counter = field(default_factory=Counter)  # records without tokens, by reason
    repaired: Counter = field(default_factory=Counter)  # records kept after a repair, by reason
    lost_bytes: int = 0  # decompressed bytes of damaged files past the last record kept (corrupt_file)
    unmeasured_files: int = 0  # damaged files whose frame declares no size: their lost_bytes are a lower bound
    lost_records: int = 0  # records estimated lost in those bytes (each file's mean record size before the damage)

    def count(self, doc: "Document") -> None:
        tokens, issue = doc.tokens, doc.issue
        if tokens is None:
            if issue == "filtered":
                self.filtered += 1
            else:
                self.skipped[issue] += 1
                self.lost_bytes += doc.lost_bytes
                self.unmeasured_files += not doc.lost_measured
                self.lost_records += doc.lost_records
            return
        self.documents += 1
        self.tokens += len(tokens)
        if issue:
            self.repaired[issue] += 1

    def as_dict(self) -> dict[str, int]:
        """Flat counters, e.g. {"documents": 9, "skipped/malformed_json": 1, ...}, ready to log as metrics."""
        out = {"documents": self.documents, "tokens": self.tokens, "blocks": self.blocks,
               "filtered": self.filtered, "dropped_tail_tokens": self.dropped_tail_tokens,
               "skipped": sum(self.skipped.values())}
        out.update({f"skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        out.update({f"repaired/{reason}": n for reason, n in sorted(self.repaired.items())})
        if self.skipped["corrupt_file"]:
            out.update({"lost_bytes/corrupt_file": self.lost_bytes, "lost_bytes/unmeasured_files": self.unmeasured_files,
                        "lost_records_estimated/corrupt_file": self.lost_records})
        return out
