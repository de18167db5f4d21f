"""SparseLoRA's offline SVD estimator: rank-r factors of each frozen projection.

For a projection kernel W [in, out] (float32), W = U S V^H and the estimator keeps

    A = U_r sqrt(S_r)   [in, r]        B = sqrt(S_r) V_r^H   [r, out]

so x @ A @ B is the best rank-r approximation of x @ W (Eckart-Young: the Frobenius error of
A @ B is sqrt(sum_{i > r} s_i^2)). Only the projections the channel selection reads get factors:
q/k/v (attention) and gate/up (MLP); o/down follow the v / intermediate choice
(`jaxstack/lora/sparse.py`).

    from jaxstack.lora.svd_estimator import build_estimator, save_estimator, load_estimator
    est = build_estimator(model, rank=8)          # {"layers.3.mlp.gate_proj": (A, B), ...}
    save_estimator(est, "runs/x/adapter")         # sparselora_estimator.safetensors
    est = load_estimator("runs/x/adapter")

The file sits next to a PEFT adapter (`jaxstack/hf/peft.py` writes adapter_model.safetensors in
the same folder); PEFT ignores it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx

from jaxstack.lora.linear import LoRALinear
from jaxstack.models.llm import MLP, Attention
from jaxstack.nn.layers import Dense

ESTIMATOR_FILE = "sparselora_estimator.safetensors"
ESTIMATED = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}

Estimator = dict[str, tuple[np.ndarray, np.ndarray]]  # "layers.{i}.{block}.{proj}" -> (A, B)


def svd_factors(kernel: np.ndarray | jax.Array, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A float32 [in, r], B float32 [r, out]) with A @ B the best rank-r approximation of
    kernel [in, out] (SVD in float64, r clipped to min(in, out))."""
    w = np.asarray(jax.device_get(kernel), np.float64)
    if w.ndim != 2:
        raise ValueError(f"SVD estimator needs a 2-D kernel [in, out], got shape {w.shape}")
    if rank < 1:
        raise ValueError(f"SVD estimator rank must be >= 1, got {rank}")
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    r = min(rank, s.shape[0])
    root = np.sqrt(s[:r])
    return (u[:, :r] * root).astype(np.float32), (root[:, None] * vh[:r]).astype(np.float32)


def _dense(proj: nnx.Module) -> Dense:
    return proj.base if isinstance(proj, LoRALinear) else proj


def decoder_blocks(model: nnx.Module) -> list[tuple[int, str, nnx.Module]]:
    """(layer index, "attn" | "mlp", block) of every decoder Attention / MLP in `model`, the
    layer index counted in module-tree order (layer i's attention then its MLP)."""
    out, layer = [], {"attn": 0, "mlp": 0}
    for _, module in nnx.iter_modules(model):
        kind = "attn" if isinstance(module, Attention) else "mlp" if isinstance(module, MLP) else ""
        if kind:
            out.append((layer[kind], kind, module))
            layer[kind] += 1
    return out


def estimator_key(layer: int, kind: str, proj: str) -> str:
    """The estimator's name for one projection, e.g. "layers.3.self_attn.q_proj"."""
    return f"layers.{layer}.{'self_attn' if kind == 'attn' else 'mlp'}.{proj}"


def build_estimator(
    model: nnx.Module, rank: int = 8, *, layers: Iterable[tuple[int, str]] | None = None
) -> Estimator:
    """Rank-`rank` factors of the frozen q/k/v and gate/up kernels of `model`'s decoder blocks
    (plain Dense or the base of a `LoRALinear`). layers: (layer, "attn" | "mlp") pairs to
    cover (default every block). Returns {estimator_key: (A [in, r], B [r, out])}, float32."""
    wanted = None if layers is None else set(layers)
    est: Estimator = {}
    for i, kind, block in decoder_blocks(model):
        if wanted is not None and (i, kind) not in wanted:
            continue
        for name in ESTIMATED[kind]:
            est[estimator_key(i, kind, name)] = svd_factors(
                _dense(getattr(block, name)).kernel.get_value(), rank
            )
    return est


def save_estimator(est: Estimator, folder: str) -> str:
    """Write `est` to folder/sparselora_estimator.safetensors ("<key>.A", "<key>.B"); returns
    the path."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for key, (a, b) in est.items():
        tensors[f"{key}.A"], tensors[f"{key}.B"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    ranks = sorted({a.shape[1] for a, _ in est.values()})
    path = os.path.join(folder, ESTIMATOR_FILE)
    save_file(tensors, path, metadata={"format": "sparselora-svd", "ranks": json.dumps(ranks)})
    return path


def load_estimator(folder_or_file: str) -> Estimator:
    """Read an estimator written by `save_estimator` (a folder holding
    sparselora_estimator.safetensors, or the file). ValueError if a factor lacks its pair."""
    from safetensors.numpy import load_file

    path = folder_or_file
    if os.path.isdir(path):
        path = os.path.join(path, ESTIMATOR_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SparseLoRA estimator at {path}")
    tensors = load_file(path)
    est: Estimator = {}
    for name in sorted(tensors):
        key, part = name.rsplit(".", 1)
        if part == "A":
            if f"{key}.B" not in tensors:
                raise ValueError(f"SparseLoRA estimator {path}: {key}.A has no {key}.B")
            est[key] = (tensors[name], tensors[f"{key}.B"])
        elif part != "B" or f"{key}.A" not in tensors:
            raise ValueError(f"SparseLoRA estimator {path}: unexpected tensor {name}")
    return est
