"""Files written whole or not at all: a reader (a resumed job, a viewer, another worker) never sees half a file.

    write_atomic(path, json.dumps(state))          # text or bytes; a path or a storage URI (s3://...)
    with replacing(path) as tmp:                   # anything that writes to a path: torch.save, parquet, csv
        torch.save(payload, tmp)

Both write a temporary file beside `path` (same filesystem, so the rename is atomic) and rename it over `path`
only when the writing finished; a failed write leaves `path` as it was and removes the temporary file. A storage
URI is written through pyarrow.fs the same way (on object stores the final upload itself is all-or-nothing).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on a clean exit it replaces `path`, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the pid: two processes never share one
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, content: str | bytes) -> str | Path:
    """`content` (text as UTF-8) into `path` (a local path or a storage URI), atomically; returns the path."""
    data = content.encode() if isinstance(content, str) else content
    if "://" in str(path):
        return _write_atomic_uri(str(path), data)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _write_atomic_uri(uri: str, data: bytes) -> str:
    import posixpath

    import pyarrow.fs

    filesystem, location = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.create_dir(posixpath.dirname(location), recursive=True)
    staging = posixpath.join(posixpath.dirname(location), f".{posixpath.basename(location)}.{os.getpid()}.tmp")
    with filesystem.open_output_stream(staging) as stream:
        stream.write(data)
    filesystem.move(staging, location)
    return uri
