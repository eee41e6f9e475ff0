"""Token shards: packed rows on disk, memory-mapped for training.

File layout (version 1), little-endian:
    bytes [0, 16)        magic b"SUROGATE.TOKENS\\n"
    bytes [16, 4096)     header: UTF-8 JSON padded with spaces: version, n_rows, sequence_len, dtype ("int32"),
                         hash (of config + data + tokenizer), vocab_size, stats (what was counted while tokenizing)
    bytes [4096, ...)    int32 [3, n_rows, sequence_len]: input_ids, labels (-100 = not trained), position_ids
A shard is written to a temporary name, fsynced and renamed: a file with this name is always complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import numpy as np

MAGIC = b"SUROGATE.TOKENS\n"
VERSION = 1
HEADER_BYTES = 4096


@attrs.define
class Shard:
    path: Path
    header: dict
    input_ids: np.ndarray  # int32 [n_rows, T] (memory-mapped, read-only)
    labels: np.ndarray
    position_ids: np.ndarray

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def sequence_len(self) -> int:
        return self.input_ids.shape[1]


def write_shard(path: str | Path, input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, *,
                hash: str, vocab_size: int, stats: dict) -> None:
    path = Path(path)
    n_rows, seq = input_ids.shape
    header = {"version": VERSION, "n_rows": int(n_rows), "sequence_len": int(seq), "dtype": "int32",
              "hash": hash, "vocab_size": int(vocab_size), "stats": stats}
    blob = json.dumps(header).encode()
    if len(blob) > HEADER_BYTES - len(MAGIC):
        header["stats"] = {"truncated": True}
        blob = json.dumps(header).encode()
    blob = MAGIC + blob + b" " * (HEADER_BYTES - len(MAGIC) - len(blob))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(blob)
        for a in (input_ids, labels, position_ids):
            f.write(np.ascontiguousarray(a, dtype="<i4").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str | Path) -> dict | None:
    """The header of a shard, or None when the file is missing, foreign, or of another version."""
    try:
        with open(path, "rb") as f:
            blob = f.read(HEADER_BYTES)
    except OSError:
        return None
    if len(blob) < HEADER_BYTES or not blob.startswith(MAGIC):
        return None
    try:
        header = json.loads(blob[len(MAGIC):].decode().strip())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if header.get("version") != VERSION:
        return None
    expected = HEADER_BYTES + 3 * 4 * header["n_rows"] * header["sequence_len"]
    if Path(path).stat().st_size != expected:
        return None
    return header


def open_shard(path: str | Path) -> Shard:
    header = read_header(path)
    if header is None:
        raise ValueError(f"{path} is not a surogate token shard of version {VERSION}")
    n, t = header["n_rows"], header["sequence_len"]
    data = np.memmap(path, dtype="<i4", mode="r", offset=HEADER_BYTES, shape=(3, n, t))
    return Shard(Path(path), header, data[0], data[1], data[2])
