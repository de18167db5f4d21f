"""Reading diffusers model folders: `diffusion_pytorch_model[.variant].safetensors`, or its
shards and `.index.json`, through the project's `CheckpointReader` (used by
`jaxstack/hf/dcae.py` and `jaxstack/hf/sana_transformer.py`)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from safetensors import SafetensorError, safe_open

from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.safetensors_io import CheckpointReader

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def weight_file_names(variant: str | None = None) -> tuple[str, str]:
    """(single weights file, index file) of a diffusers model folder, as diffusers'
    `_add_variant` names them ("diffusion_pytorch_model.bf16.safetensors")."""
    if variant is None:
        return WEIGHTS_FILE, WEIGHTS_INDEX

    def add(name: str) -> str:
        parts = name.split(".")
        return ".".join([*parts[:-1], variant, parts[-1]])

    return add(WEIGHTS_FILE), add(WEIGHTS_INDEX)


def diffusers_weight_map(path: str, variant: str | None) -> tuple[dict[str, str], str]:
    """(tensor key -> file name, the file listing the keys) of a diffusers model folder."""
    single_name, index_name = weight_file_names(variant)
    index_file = os.path.join(path, index_name)
    if os.path.isfile(index_file):
        try:
            with open(index_file) as f:
                return dict(json.load(f)["weight_map"]), index_file
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: unreadable index ({e!r})") from None
    single = os.path.join(path, single_name)
    if not os.path.isfile(single):
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        raise CheckpointError(
            f"no {single_name} or {index_name} in model folder {path!r} (safetensors files "
            f"there: {found}; pass variant= for e.g. diffusion_pytorch_model.bf16.safetensors)"
        )
    try:
        with safe_open(single, framework="numpy") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single}: corrupt or truncated safetensors file ({e})") from None
    return dict.fromkeys(keys, single_name), single


class DiffusersReader(CheckpointReader):
    """`CheckpointReader` over diffusers' file names (diffusion_pytorch_model[.variant]
    .safetensors, or its shards and index)."""

    def __init__(self, path: str | os.PathLike, variant: str | None = None):
        self.path = os.fspath(path)
        self.weight_map, self.listing = diffusers_weight_map(self.path, variant)
        self._files: dict[str, Any] = {}
        self._data_start: dict[str, tuple[int, dict]] = {}
        self._stack = contextlib.ExitStack()
