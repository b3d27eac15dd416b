"""Read and write safetensors files safely: no pickles, header checked before any allocation.

`read_tensors` checks the 8-byte header length against the file size (a declared header larger
than the file is refused before anything is allocated), then lets `safetensors` validate the
rest and wraps its errors in `AdapterFormatError`. Arrays come back as NumPy in their stored
dtype (bfloat16 through `ml_dtypes`).

Example:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> write_tensors(path, {"x": np.arange(3, dtype=np.float32)})
    >>> read_tensors(path)["x"].tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from ..errors import AdapterFormatError

__all__ = ["MAX_HEADER_BYTES", "read_tensors", "serialize_tensors", "write_tensors"]

#: safetensors' own limit on the JSON header (100 MB); anything larger is refused up front.
MAX_HEADER_BYTES = 100_000_000

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def _check_header_size(path: Path, size: int, head: bytes) -> None:
    if size < 8 or len(head) < 8:
        raise AdapterFormatError(
            f"{path}: {size} bytes is too short to be a safetensors file (it needs an 8-byte "
            "header length). The file is truncated or not safetensors: save it again."
        )
    (declared,) = struct.unpack("<Q", head[:8])
    if declared > min(size - 8, MAX_HEADER_BYTES):
        raise AdapterFormatError(
            f"{path}: the safetensors header declares {declared} bytes but the file has only "
            f"{size - 8} bytes after the length field (limit {MAX_HEADER_BYTES}). The file is "
            "truncated or corrupted: save it again."
        )


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, as NumPy arrays in the stored dtype.

    Raises `AdapterFormatError` (naming the file) for a missing, truncated or corrupted file and
    for dtypes other than F64/F32/F16/BF16.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            _check_header_size(path, size, head)
            data = head + f.read()
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot read the weights file ({e}).") from e
    try:
        entries = safetensors.deserialize(data)
    except Exception as e:  # safetensors raises SafetensorError (a plain Exception subclass)
        raise AdapterFormatError(
            f"{path}: not a valid safetensors file ({e}). The file is truncated or corrupted: "
            "save it again."
        ) from e
    tensors = {}
    for name, info in entries:
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise AdapterFormatError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}; LoRA factors must be "
                f"one of {sorted(_DTYPES)}."
            )
        array = np.frombuffer(bytes(info["data"]), dtype=dtype.newbyteorder("<"))
        tensors[name] = array.astype(dtype, copy=False).reshape(info["shape"])
    return tensors


def serialize_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors bytes of `tensors` (C-contiguous copies are made where needed)."""
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return safetensors.numpy.save(contiguous, metadata=dict(metadata) if metadata else None)


def write_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` to `path`; neither atomic nor durable by itself: the writers call it
    inside `jaxlora.io.atomic_directory`, which fsyncs and swaps the whole directory."""
    Path(path).write_bytes(serialize_tensors(tensors, metadata))
