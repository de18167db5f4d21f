"""Sliced reading and streamed writing of (sharded) safetensors checkpoints.

Reading goes through `safetensors.safe_open(..., framework="numpy")`, which validates each file
(header, offsets, size) and memory-maps it; `read` returns only the requested slice of a
tensor, so a device reads just its own shard. bfloat16, which numpy cannot name, is read from
the same memory map with the `ml_dtypes` type. Writing streams one tensor at a time, so host
memory never holds more than the tensor being written.

Layout (transformers): `model.safetensors`, or `model-00001-of-0000N.safetensors` files plus
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {key: file}}).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxstack.hf.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# safetensors dtype codes that safe_open(framework="numpy") cannot return -> numpy dtype.
_RAW_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip

Index = tuple[slice, ...]


def _weight_map(path: str, single_file: str = SINGLE_FILE) -> tuple[dict[str, str], str]:
    """(tensor key -> file name, the file that lists the keys) for checkpoint dir `path`."""
    index_file = os.path.join(path, INDEX_FILE)
    if single_file == SINGLE_FILE and os.path.isfile(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: unreadable index ({e!r})") from None
        return dict(weight_map), index_file
    single = os.path.join(path, single_file)
    if not os.path.isfile(single):
        listing = f"{SINGLE_FILE} or {INDEX_FILE}" if single_file == SINGLE_FILE else single_file
        raise CheckpointError(f"no {listing} in checkpoint directory {path!r}")
    try:
        with safe_open(single, framework="numpy") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single}: corrupt or truncated safetensors file ({e})") from None
    return dict.fromkeys(keys, single_file), single


class CheckpointReader:
    """Tensors of a safetensors checkpoint directory, read lazily slice by slice.

    Use as a context manager; files are open (memory-mapped) inside the `with` block.
    single_file: the one-file name to read (no index), e.g. PEFT's adapter_model.safetensors.
    """

    def __init__(self, path: str | os.PathLike, *, single_file: str = SINGLE_FILE):
        self.path = os.fspath(path)
        self.weight_map, self.listing = _weight_map(self.path, single_file)
        self._files: dict[str, Any] = {}
        self._data_start: dict[str, tuple[int, dict]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> CheckpointReader:
        for name in sorted(set(self.weight_map.values())):
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                raise CheckpointError(
                    f"safetensors file {file} (listed in {self.listing}) is missing"
                )
            try:
                self._files[name] = self._stack.enter_context(safe_open(file, framework="numpy"))
            except (SafetensorError, OSError) as e:
                self._stack.close()
                raise CheckpointError(
                    f"{file}: corrupt or truncated safetensors file ({e})"
                ) from None
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._files.clear()

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def _slice(self, key: str):
        name = self.weight_map.get(key)
        if name is None:
            raise CheckpointError(f"tensor {key!r} missing from {self.listing}")
        try:
            return self._files[name].get_slice(key)
        except SafetensorError:
            raise CheckpointError(f"tensor {key!r} missing from {self.path}/{name}") from None

    def where(self, key: str) -> str:
        """The file holding `key` (for messages)."""
        return os.path.join(self.path, self.weight_map.get(key, "?"))

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key` as stored."""
        return tuple(self._slice(key).get_shape())

    def read(self, key: str, index: Index) -> np.ndarray:
        """Host copy of `tensor[index]` (its stored dtype); reads only the slice's bytes."""
        sl = self._slice(key)
        code = sl.get_dtype()
        if code not in _RAW_DTYPES:
            return np.asarray(sl[index])
        return np.array(self._memmap(key, code, tuple(sl.get_shape()))[index])

    def _memmap(self, key: str, code: str, shape: tuple[int, ...]) -> np.ndarray:
        name = self.weight_map[key]
        file = os.path.join(self.path, name)
        if name not in self._data_start:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._data_start[name] = (8 + n, json.loads(f.read(n)))
        start, header = self._data_start[name]
        begin, end = header[key]["data_offsets"]
        dtype = _RAW_DTYPES[code]
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype)
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {key!r} has {end - begin} bytes for {shape}")
        flat = np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=(count,))
        return flat.reshape(shape)


def plan_shards(nbytes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
    """Split tensors (sizes in bytes, in order) into consecutive groups of <= max_shard_bytes.

    A tensor larger than the limit gets a file of its own. Returns lists of tensor positions.
    """
    shards: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(nbytes):
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    """transformers' file names for `num_shards` files."""
    if num_shards == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def remove_checkpoint_files(path: str) -> None:
    """Delete safetensors files and index of an earlier save in `path` (stale shards would mix)."""
    for name in os.listdir(path):
        if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(name):
            os.remove(os.path.join(path, name))


def write_safetensors(
    file: str,
    specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    arrays: Iterable[np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one safetensors file, streaming `arrays` (in the order of `specs`) to disk.

    specs: (key, shape, dtype) per tensor; the header is written first from them. The file
    appears under its name only once complete.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, shape, dtype in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        code = _DTYPE_CODES[np.dtype(dtype).name]
        header[key] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (key, shape, dtype), array in zip(specs, arrays, strict=True):
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{key}: got {array.shape} {array.dtype}, header says {shape} {dtype}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    os.replace(tmp, file)


def write_index(path: str, weight_map: dict[str, str], total_size: int) -> None:
    """Write `model.safetensors.index.json` (key -> file name) into `path`."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
