"""The torch-free core of every stream: the documents of one file, decoded incrementally and tokenized.

`documents(unit, start, options)` is the one function both engines run per file (in-process, or inside a Ray
Data read task), so both yield the same documents in the same order. Memory is bounded by one document:
compressed files are decoded as a stream (never whole), and a record longer than `max_document_bytes` is
skipped without ever being held.

Bad input never stops a stream and never disappears silently: every record that is skipped, repaired or
filtered comes out as a `Document` with `issue` set, and the stream counts it. A damaged compressed file keeps
the records before the damage and says how many decompressed bytes were lost after them (`lost_bytes`: exact
to the end of the damaged frame when its header declares its size, else a lower bound, `lost_measured` False)
and about how many records those bytes held (`lost_records`: the lost bytes over the file's mean record size before
the damage; an estimate, since a record's length is known only once it is read).
A file that disappears while the run is going (deleted, unmounted) cannot come back by retrying: it is skipped
as `missing_file`, named in a warning, and the stream goes on.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from crate.data.config import ReadingConfig
from crate.data.sources import MissingFile, Retry, SourceError, Unit
from crate.tokenizer import EOT_TOKEN, gpt2_tokenizer

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20  # read size; also the largest piece of text handed to the tokenizer at once
UNLABELLED = "unlabelled"  # set name of records without meta.pile_set_name

# Why a record was skipped (no tokens), repaired (tokens kept), or filtered by include/exclude_sets.
SKIPPED = ("malformed_json", "missing_text", "empty", "too_long", "corrupt_file", "missing_file")
REPAIRED = ("invalid_utf8", "lone_surrogate")
FILTERED = "filtered"


class Document(NamedTuple):
    tokens: np.ndarray | None  # uint16 GPT-2 ids ending with <|endoftext|>; None when skipped or filtered
    set_name: str  # meta.pile_set_name (or the file's label)
    doc: int  # index of the record in its file: line, Parquet row, 0 for a whole-file document
    offset: int  # where it starts: byte in the decoded stream (JSON lines, text), row (Parquet)
    issue: str  # "" or one of SKIPPED / REPAIRED / FILTERED
    lost_bytes: int = 0  # corrupt_file: decompressed bytes after the last record kept that no record came from
    lost_measured: bool = True  # ... False: the damaged frame declares no size, so lost_bytes is a lower bound
    lost_records: int = 0  # corrupt_file: records estimated to have been in lost_bytes (mean record size so far)


class Record(NamedTuple):
    """One record of a file before tokenization; `text` is None when it is skipped (then `issue` says why)."""

    text: str | None
    set_name: str
    doc: int
    offset: int
    issue: str
    lost_bytes: int = 0
    lost_measured: bool = True
    lost_records: int = 0


class Start(NamedTuple):
    """Where reading a file begins: record index and its byte/row offset (0, 0 = the beginning)."""

    doc: int = 0
    offset: int = 0


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    include_sets: frozenset[str] = frozenset()
    exclude_sets: frozenset[str] = frozenset()
    max_document_bytes: int = 32 * 2**20
    retry: Retry = Retry()

    @classmethod
    def of(cls, cfg: ReadingConfig) -> "ReadOptions":
        return cls(cfg.text_field, frozenset(cfg.include_sets), frozenset(cfg.exclude_sets),
                   cfg.max_document_bytes, Retry(cfg.retries, cfg.retry_backoff_s))

    def keeps(self, set_name: str) -> bool:
        return (not self.include_sets or set_name in self.include_sets) and set_name not in self.exclude_sets


class CorruptFile(Exception):
    """Compressed data that ends early or does not decode: the rest of the file is skipped. `decoded`: bytes
    decompressed before the damage; `declared_end`: where the damaged frame should have ended in the decompressed
    stream, when its header says (None otherwise)."""

    def __init__(self, message: str, decoded: int, declared_end: int | None):
        super().__init__(message)
        self.decoded, self.declared_end = decoded, declared_end


def documents(unit: Unit, start: Start, options: ReadOptions) -> Iterator[Document]:
    """The documents of `unit` from `start` on, tokenized (GPT-2 BPE, <|endoftext|> appended)."""
    doc, offset = start
    try:
        for record in records(unit, start, options):
            doc, offset = record.doc, record.offset
            if record.text is not None and not options.keeps(record.set_name):
                yield Document(None, record.set_name, doc, offset, FILTERED)
            elif record.text is None:
                yield Document(None, record.set_name, doc, offset, record.issue, record.lost_bytes, record.lost_measured,
                               record.lost_records)
            else:
                tokens, repaired = tokenize(record.text)
                yield Document(tokens, record.set_name, doc, offset, record.issue or repaired)
    except MissingFile as error:
        log.warning("%s: the file is gone (%s); skipped from record %d, not retried", unit.name, error, doc)
        yield Document(None, unit.label or UNLABELLED, doc, offset, "missing_file")


def tokenize(text: str) -> tuple[np.ndarray, str]:
    """GPT-2 ids of `text` + <|endoftext|> as uint16, and "lone_surrogate" if the text had to be repaired.

    The literal string "<|endoftext|>" inside a document is ordinary text, as in GPT-2's training data.
    Texts over CHUNK_BYTES characters are encoded piecewise, cut after a newline, so memory stays bounded.
    """
    encoding = gpt2_tokenizer()
    repaired = ""
    pieces = []
    for piece in text_pieces(text):
        try:
            ids = encoding.encode_to_numpy(piece, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates, e.g. from a "\ud800" JSON escape
            piece = piece.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids, repaired = encoding.encode_to_numpy(piece, disallowed_special=()), "lone_surrogate"
        pieces.append(ids.astype(np.uint16))
    pieces.append(np.array([EOT_TOKEN], dtype=np.uint16))
    return np.concatenate(pieces), repaired


def text_pieces(text: str) -> Iterator[str]:
    start = 0
    while len(text) - start > CHUNK_BYTES:
        cut = text.rfind("\n", start, start + CHUNK_BYTES) + 1 or start + CHUNK_BYTES
        yield text[start:cut]
        start = cut
    yield text[start:]


# ---- records -------------------------------------------------------------------------------------------------


def records(unit: Unit, start: Start, options: ReadOptions) -> Iterator[Record]:
    if unit.fmt == "jsonl":
        return jsonl_records(unit, start, options)
    if unit.fmt == "parquet":
        return parquet_records(unit, start, options)
    return text_records(unit, start, options)


def jsonl_records(unit: Unit, start: Start, options: ReadOptions) -> Iterator[Record]:
    doc, offset = start
    label = unit.label or UNLABELLED
    try:
        for line, length in lines(decoded_chunks(unit, start.offset, options.retry), options.max_document_bytes):
            if line is None:
                yield Record(None, label, doc, offset, "too_long")
            elif line.strip():  # blank lines are not records
                text, set_name, issue = json_record(line, options, label)
                yield Record(text, set_name, doc, offset, issue)
            doc, offset = doc + 1, offset + length
    except CorruptFile as error:
        measured = error.declared_end is not None
        lost = max((error.declared_end if measured else error.decoded) - offset, 0)
        lost_records = round(lost * doc / offset) if doc and offset else int(lost > 0)
        log.warning("%s: %s; the rest of the file is skipped (from record %d): %s%s decompressed bytes lost, "
                    "about %s records%s", unit.name, error, doc, "" if measured else "at least ", f"{lost:,}",
                    f"{lost_records:,}",
                    "" if measured else " (the damaged frame declares no size, so the true loss is unknown)")
        yield Record(None, label, doc, offset, "corrupt_file", lost, measured, lost_records)


def json_record(line: bytes, options: ReadOptions, label: str) -> tuple[str | None, str, str]:
    text, repaired = decode_utf8(line)
    try:
        record = json.loads(text)
    except ValueError:
        return None, label, "malformed_json"
    if not isinstance(record, dict):
        return None, label, "missing_text"
    text, set_name, issue = record_fields(record, options, label)
    return text, set_name, issue or repaired


def text_records(unit: Unit, start: Start, options: ReadOptions) -> Iterator[Record]:
    """A `.txt` (or built-in `.py`) file is one document."""
    label = unit.label or UNLABELLED
    if start.doc > 0:  # resumed past this file's only document
        return
    data = bytearray()
    for chunk in decoded_chunks(unit, 0, options.retry):
        data += chunk
        if len(data) > options.max_document_bytes:
            yield Record(None, label, 0, 0, "too_long")
            return
    text, issue = decode_utf8(bytes(data))
    yield Record(text, label, 0, 0, issue) if text.strip() else Record(None, label, 0, 0, "empty")


def parquet_records(unit: Unit, start: Start, options: ReadOptions) -> Iterator[Record]:
    """Rows of a Parquet file; `offset` is the row index, so a resume skips whole row groups unread."""
    import pyarrow.parquet as pq

    label = unit.label or UNLABELLED
    row = start.offset
    with open_file(unit, options.retry) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            if options.text_field not in names:
                raise ValueError(f"no column {options.text_field!r} (columns: {names})")
            groups, row = [], 0
            for g in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(g).num_rows
                if row + rows <= start.offset and not groups:
                    row += rows  # a whole row group before the resume point: never read
                else:
                    groups.append(g)
            columns = [c for c in (options.text_field, "meta", "pile_set_name") if c in names]
            for batch in parquet.iter_batches(row_groups=groups, columns=columns, batch_size=1024):
                for record in batch.to_pylist():
                    if row >= start.offset:
                        text, set_name, issue = record_fields(record, options, label)
                        yield Record(text, set_name, row, row, issue)
                    row += 1
        except ValueError as error:  # pyarrow's ArrowInvalid: damaged data (I/O errors propagate, naming the file)
            log.warning("%s: unreadable Parquet (%s); the rest of the file is skipped", unit.name, error)
            yield Record(None, label, row, row, "corrupt_file")
        except FileNotFoundError as error:
            raise MissingFile(f"{unit.name}: not found ({error})") from error
        except OSError as error:
            raise SourceError(f"{unit.name}: {error}") from error


def record_fields(record: dict, options: ReadOptions, label: str) -> tuple[str | None, str, str]:
    """(text or None, set name, issue) of one JSON or Parquet record."""
    meta = record.get("meta")
    set_name = meta.get("pile_set_name") if isinstance(meta, dict) else record.get("pile_set_name")
    set_name = set_name if isinstance(set_name, str) and set_name else label
    text = record.get(options.text_field)
    if not isinstance(text, str):
        return None, set_name, "missing_text"
    if len(text) > options.max_document_bytes:
        return None, set_name, "too_long"
    if not text.strip():
        return None, set_name, "empty"
    return text, set_name, ""


def decode_utf8(data: bytes) -> tuple[str, str]:
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), "invalid_utf8"


# ---- bytes: files opened through fsspec, decompressed as a stream, split into lines ---------------------------


def open_file(unit: Unit, retry: Retry):
    import fsspec

    return retry(lambda: fsspec.open(unit.url, "rb").open(), unit.name)


class RetryingReader:
    """Sequential reads of one file; a failed open or read reopens at the same byte and retries with backoff."""

    def __init__(self, unit: Unit, offset: int, retry: Retry):
        self.unit, self.position, self.retry, self.file = unit, offset, retry, None

    def read(self, size: int) -> bytes:
        data = self.retry(lambda: self._read(size), self.unit.name)
        self.position += len(data)
        return data

    def _read(self, size: int) -> bytes:
        if self.file is None:
            import fsspec

            self.file = fsspec.open(self.unit.url, "rb").open()
            if self.position:
                self.file.seek(self.position)
        try:
            return self.file.read(size)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()
            except Exception:  # a broken connection may fail to close; it is being replaced anyway
                pass


def decoded_chunks(unit: Unit, offset: int, retry: Retry) -> Iterator[bytes]:
    """The file's decompressed bytes from `offset` on, in chunks.

    Resume cost: a plain file seeks to `offset`; a compressed one is decompressed from its start and the
    first `offset` bytes are discarded (~0.5 GB/s per core), since a single zstd/gzip frame has no index.
    """
    reader = RetryingReader(unit, offset if unit.compression is None else 0, retry)
    try:
        if unit.compression is None:
            while chunk := reader.read(CHUNK_BYTES):
                yield chunk
            return
        skip = offset
        for chunk in decompressed(reader, unit.compression):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0
    finally:
        reader.close()


def decompressed(reader: RetryingReader, compression: str) -> Iterator[bytes]:
    """Streaming zstd/gzip over concatenated frames; a stream that stops inside a frame is CorruptFile."""
    import zstandard

    def new_frame():
        return zstandard.ZstdDecompressor().decompressobj() if compression == "zstd" else zlib.decompressobj(31)

    decoder, in_frame = new_frame(), False
    decoded, declared_end = 0, None  # decompressed bytes so far; where the current frame ends, if its header says
    while data := reader.read(CHUNK_BYTES):
        while data:
            if not in_frame:
                declared_end = decoded + size if (size := frame_size(data, compression)) is not None else None
            try:
                out = decoder.decompress(data)
            except (zstandard.ZstdError, zlib.error) as error:
                raise CorruptFile(f"undecodable {compression} data at compressed byte ~{reader.position}: {error}",
                                  decoded, declared_end)
            in_frame = True
            if out:
                decoded += len(out)
                yield out
            if decoder.eof:
                data, decoder, in_frame = decoder.unused_data, new_frame(), False
            else:
                data = b""
    if in_frame:
        raise CorruptFile(f"truncated: the {compression} stream ends inside a frame", decoded, declared_end)


def frame_size(data: bytes, compression: str) -> int | None:
    """The decompressed size a zstd frame header at the start of `data` declares (None: not declared, or gzip)."""
    import zstandard

    if compression != "zstd":
        return None
    try:
        size = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError:
        return None
    return None if size == zstandard.CONTENTSIZE_UNKNOWN else size


def lines(chunks: Iterator[bytes], max_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, its length in bytes); a line longer than `max_bytes` comes out as (None, length), never held."""
    buffer = bytearray()
    skipping = 0  # > 0 while discarding an over-long line
    for chunk in chunks:
        if skipping:
            end = chunk.find(b"\n")
            if end < 0:
                skipping += len(chunk)
                continue
            yield None, skipping + end + 1
            chunk, skipping = chunk[end + 1:], 0
        buffer += chunk
        begin = 0
        while (end := buffer.find(b"\n", begin)) >= 0:
            if end + 1 - begin > max_bytes:
                yield None, end + 1 - begin
            else:
                yield bytes(buffer[begin:end + 1]), end + 1 - begin
            begin = end + 1
        del buffer[:begin]
        if len(buffer) > max_bytes:
            skipping, buffer = len(buffer), bytearray()
    if skipping:
        yield None, skipping
    elif buffer:
        yield bytes(buffer), len(buffer)
