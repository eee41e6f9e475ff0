"""A minimal safetensors writer/reader (the format: u64 little-endian header size, JSON header, raw bytes).

surogate-dist depends only on torch, numpy and mpi4py, and its checkpoints need only flat tensors and string
metadata, so it reads and writes the format itself; the files load with the `safetensors` library
(`safetensors.torch.load_file`). No pickle. Writes go to a temporary name, are fsynced, then renamed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    header: dict[str, object] = {}
    parts = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _CODES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        parts.append(t)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in parts:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_header(f, path: Path, size: int) -> tuple[dict, int]:
    head = f.read(8)
    if len(head) != 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise ValueError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def read_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header, _ = _read_header(f, path, os.fstat(f.fileno()).st_size)
    return dict(header.get("__metadata__") or {})


def load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _read_header(f, path, size)
        data = bytearray(f.read())
    buf = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors entry {name!r}: {info!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(data) or end - begin != numel * itemsize:
            raise ValueError(f"{path}: tensor {name!r} does not fit the file (truncated or corrupt)")
        # clone: a fresh, aligned buffer for the dtype view
        out[name] = buf[begin:end].clone().view(dtype).reshape(shape)
    return out, dict(header.get("__metadata__") or {})
