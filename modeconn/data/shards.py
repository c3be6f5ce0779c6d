"""Binary token shards: a 64-byte header, then uint16 token ids.

Header (little-endian): magic b"MCTOKENS", format version (u32), bytes per token (u32, = 2),
token count (u64), 40 reserved zero bytes. A shard is written under a temporary name and renamed
when complete, so a reader never sees a partial one. Readers check magic, version and size, and
memory-map the tokens.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from pathlib import Path

import numpy as np

from modeconn.errors import DataError

MAGIC = b"MCTOKENS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ40x")
TOKEN_DTYPE = np.dtype("<u2")
assert _HEADER.size == HEADER_BYTES


class ShardWriter:
    """Append token arrays; `close()` fills in the header and renames the file into place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * HEADER_BYTES)
        self._sha = hashlib.sha256()
        self.n_tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
            raise DataError(f"{self.path}: token ids must fit in uint16, got range "
                            f"[{tokens.min()}, {tokens.max()}]")
        data = tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self.n_tokens += tokens.size

    def close(self) -> str:
        """Finish the shard; returns the sha256 of its token bytes."""
        self._file.seek(0)
        self._file.write(_HEADER.pack(MAGIC, VERSION, TOKEN_DTYPE.itemsize, self.n_tokens))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


def write_shard(path: Path, tokens: np.ndarray) -> str:
    with ShardWriter(path) as w:
        w.write(tokens)
        return w.close()


def read_header(path: Path) -> int:
    """Check a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token shard {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise DataError(f"{path} is not a modeconn token shard (bad magic {head[:8]!r}; expected {MAGIC!r})")
    _, version, itemsize, n_tokens = _HEADER.unpack(head)
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this modeconn reads version {VERSION}")
    if itemsize != TOKEN_DTYPE.itemsize:
        raise DataError(f"{path}: {itemsize} bytes per token, expected {TOKEN_DTYPE.itemsize}")
    expected = HEADER_BYTES + n_tokens * itemsize
    if size != expected:
        raise DataError(f"{path} is truncated or padded: header says {n_tokens} tokens "
                        f"({expected} bytes), file has {size} bytes")
    return n_tokens


def open_shard(path: Path) -> np.memmap:
    """The shard's tokens, memory-mapped read-only (uint16)."""
    n_tokens = read_header(path)
    if n_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def shard_sha256(path: Path) -> str:
    tokens = open_shard(path)
    h = hashlib.sha256()
    step = 1 << 24
    for i in range(0, len(tokens), step):
        h.update(np.ascontiguousarray(tokens[i:i + step]).tobytes())
    return h.hexdigest()
