"""Structural checks of safetensors checkpoints, before anything heavy loads them.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, ``data_offsets``), then the tensor bytes. :func:`safetensors_problem` verifies all of
that against the file size without reading the data, so a truncated download, a garbled header
or a file that is not safetensors at all fails with a clear error instead of deep in a library.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from modelfactory.core.errors import SourceError

#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20


def safetensors_problem(path: Path) -> str | None:
    """What is structurally wrong with safetensors file *path*, or ``None`` when it is sound."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return f"only {size} bytes, shorter than the 8-byte header length"
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            return f"header length {header_len} does not fit in the file ({size} bytes)"
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"header is not valid JSON ({exc})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has a malformed header entry"
        if stop - start != expected or start < 0:
            return f"tensor {name!r}: {dtype}{shape} needs {expected} bytes, header gives {stop - start}"
        end = max(end, stop)
    data = size - 8 - header_len
    if end != data:
        return f"header describes {end} bytes of tensor data, the file holds {data} (truncated or padded)"
    return None


def check_safetensors(folder: Path, *, label: str) -> None:
    """Raise :class:`SourceError` naming the first corrupted ``*.safetensors`` file under *folder*."""
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise SourceError(
                f"{label}: weights file {file.name} is corrupted ({problem}): download or save the model "
                f"again; a cached copy can be removed from {folder}"
            )
