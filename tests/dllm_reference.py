"""Shared by the dLLM sampler tests (test_dllm.py, test_dllm_rules.py): tiny random LLaDA /
Dream models and a plain loop-and-index reference of the LLaDA / Fast-dLLM sampler (spec
dllm.md §2, §4), the oracle `dllm_generate` is compared with token for token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.generate.dllm import step_noise
from jaxstack.models.llm import LLM, LLMConfig

MASK = 63


def tiny_cfg(kind: str = "llada", causal: bool = False, num_layers: int = 1) -> LLMConfig:
    return LLMConfig(
        architecture="llama" if kind == "llada" else "qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=4 if kind == "llada" else 2,
        head_dim=8,
        rope_theta=500000.0 if kind == "llada" else 10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=kind == "dream",
        causal=causal,
    )


def tiny_model(
    kind: str = "llada", causal: bool = False, seed: int = 0, num_layers: int = 1
) -> LLM:
    """A tiny model with O(1) random weights (the default init gives near-uniform logits)."""
    model = LLM(tiny_cfg(kind, causal, num_layers), rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    new = [
        1.0 + 0.2 * jax.random.normal(k, x.shape)
        if x.ndim == 1
        else 1.5 * jax.random.normal(k, x.shape) / np.sqrt(x.shape[0])
        for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def jit_forward(model: LLM):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: fn(state, jnp.asarray(x))


# -- a plain reference of spec §2 (LLaDA generate / Fast-dLLM get_transfer_index) -----------------


def _factor_count(sorted_c: np.ndarray, factor: float) -> int:
    """Fast-dLLM `get_transfer_index_dynamic`: how many of the m masked positions (confidences
    sorted descending) to commit. Threshold of 1-based rank n: 1 - factor / (n + 1), rank 1
    forced (-1); stop at the first failing rank; a stop at rank 1 or at the last rank
    commits one more (so rank 1 always goes, and a failure at the last rank is accepted)."""
    m = len(sorted_c)
    threshs = [1 - factor / (n + 1) for n in range(1, m + 1)]
    threshs[0] = -1
    top_i = 0
    for top_i in range(m):
        if sorted_c[top_i] < threshs[top_i]:
            break
    if top_i == 0 or top_i == m - 1:
        top_i += 1
    return top_i


def reference_generate(
    forward,
    prompt: np.ndarray,
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    factor: float | None = None,
    kind: str = "llada",
    seed: int = 0,
):
    """Loop-and-index transcription of the reference sampler (no cache). Returns (x, nfe)."""
    b, lp = prompt.shape
    x = np.concatenate([prompt, np.full((b, gen_length), MASK)], axis=1)
    num_blocks = gen_length // block_length
    s_b = steps // num_blocks
    key = jax.random.key(seed)
    nfe = 0
    for blk in range(num_blocks):
        s, e = lp + blk * block_length, lp + (blk + 1) * block_length
        n = (x[:, s:e] == MASK).sum(1)
        if kind == "dream":  # step 0 commits the block's first token; the rest over s_b - 1
            sb = max(s_b - 1, 1)
            k_sched = [[(r - 1) // sb + (i < (r - 1) % sb) for i in range(sb)] for r in n]
        else:
            k_sched = [[r // s_b + (i < r % s_b) for i in range(s_b)] for r in n]
        i = 0
        while True:
            logits = np.asarray(forward(x), np.float64)
            if kind == "dream":
                logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
            block = logits[:, s:e]
            gumbel_u, remask_u = (np.asarray(a) for a in step_noise(key, nfe, block.shape))
            score = (
                np.exp(block) / (-np.log(gumbel_u)) ** temperature if temperature else block.copy()
            )
            score[..., MASK] = -np.inf  # [MASK] is never a prediction (see `predict`)
            x0 = np.argmax(score, axis=-1)
            if remasking == "low_confidence":
                p = np.exp(block - block.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                c = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            else:
                c = remask_u
            masked = x[:, s:e] == MASK
            conf = np.where(masked, c, -np.inf)
            for r in range(b):
                order = np.argsort(-conf[r], kind="stable")
                m = int(masked[r].sum())
                if kind == "dream" and i == 0:
                    chosen = [0] if masked[r, 0] else []
                elif m == 0:
                    chosen = []
                elif threshold is not None:
                    chosen = [
                        j for t, j in enumerate(order[:m]) if t == 0 or conf[r, j] >= threshold
                    ]
                elif factor is not None:
                    chosen = list(order[: _factor_count(conf[r, order[:m]], factor)])
                else:
                    k = k_sched[r][min(i - (kind == "dream"), len(k_sched[r]) - 1)]
                    chosen = list(order[:k])
                for j in chosen:  # x0 = where(mask_index, x0, x) in the reference
                    if masked[r, j]:
                        x[r, s + j] = x0[r, j]
            nfe += 1
            i += 1
            if not (x[:, s:e] == MASK).any():
                break
    return x, nfe
