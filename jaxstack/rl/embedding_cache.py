"""MR-SP stage 1: video embeddings computed once per prompt and reused by every RL pass.

`VideoEmbeddingCache` maps a prompt id (the record's "id") to its video embeddings [V, D] (the
output of the frozen vision tower + projector + temporal pooling + separators). The rollout, the
old / reference log-prob passes and the policy update all read rows by id, so reordering,
filtering or repeating samples can never pair a response with another prompt's video (no
positional `i % G` pairing).

The separator rows ("\\n" after each frame group) use the LLM embedding captured when the cache
was built (the RL run starts from it; it is an input, not trained, on this path). Each clip is
encoded on its own (one compiled program for [F, S, S, 3]), so an embedding does
not depend on which other clips shared its batch, and a resumed run rebuilds bit-identical
entries. With a mesh, frames are sharded over the devices (`jaxstack.models.vlm.encode_video`).
Memory is bounded by `max_bytes` (least recently used entries are evicted and re-encoded on
their next use).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.models.nvila_connector import interleave_separators, temporal_pool
from jaxstack.models.vlm import NVILA, frame_tokens

Array = jax.Array


class VideoEmbeddingCache:
    """Prompt id -> video embeddings [V, D] (device arrays), encoded at most once while cached.

    load_frames(record) -> float32 [F, S, S, 3] (normalised frames; may raise VideoError).
    encoder_calls counts clips run through the vision tower; hits counts reads served from the
    cache; enabled=False re-encodes on every read (the no-cache baseline).
    """

    def __init__(
        self,
        model: NVILA,
        load_frames: Callable[[dict], np.ndarray],
        *,
        mesh: Any = None,
        enabled: bool = True,
        max_bytes: int = 8 << 30,
    ):
        self.model, self.load_frames, self.mesh = model, load_frames, mesh
        self.enabled, self.max_bytes = enabled, max_bytes
        self._store: collections.OrderedDict[str, Array] = collections.OrderedDict()
        self._bytes = 0
        self.encoder_calls = 0
        self.hits = 0
        # Only the frozen parts are captured: the tower, the projector and a copy of the
        # separator row (the LLM's own arrays may be donated by the RL update).
        graphdef, state = nnx.split((model.vision_tower, model.projector))
        sep = jnp.array(model.separator_embedding(), copy=True)
        group = model.cfg.frames_per_group

        @jax.jit
        def encode(state, sep, frames):
            tower, projector = nnx.merge(graphdef, state)
            tokens = frame_tokens(tower, projector, frames, mesh=mesh, freeze=True)
            return interleave_separators(temporal_pool(tokens, group), sep)

        self._encode = lambda frames: encode(state, sep, frames)

    def encode(self, record: dict) -> Array:
        """Run the vision tower on one record's clip (always; counts an encoder call)."""
        self.encoder_calls += 1
        return self._encode(jnp.asarray(self.load_frames(record)))

    def get(self, record: dict) -> Array:
        """Embeddings [V, D] of record["id"], encoding the clip on a miss."""
        key = record["id"]
        if self.enabled and key in self._store:
            self.hits += 1
            self._store.move_to_end(key)
            return self._store[key]
        emb = self.encode(record)
        if self.enabled:
            self._store[key] = emb
            self._bytes += emb.nbytes
            while self._bytes > self.max_bytes and len(self._store) > 1:
                _, old = self._store.popitem(last=False)
                self._bytes -= old.nbytes
        return emb

    def get_many(self, records: Sequence[dict]) -> Array:
        """Stacked embeddings [len(records), V, D] in the order given."""
        return jnp.stack([self.get(r) for r in records])

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def stats(self) -> dict[str, int]:
        return {"encoder_calls": self.encoder_calls, "hits": self.hits, "entries": len(self)}
