"""GPU checks (run with `pytest -m gpu` on a CUDA machine): the cuDNN attention path against the
XLA reference on fresh random inputs, forward and gradients, and a real-size decoder's bf16
forward/backward against its float32 self."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.models.llm import LLMConfig, init_llm
from jaxstack.nn.attention import dot_product_attention, make_attn_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("causal,use_mask", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("t,nq,nkv,h", [(1024, 16, 4, 128), (2048, 12, 2, 64), (2151, 12, 2, 128)])
def test_cudnn_attention_matches_reference(causal, use_mask, t, nq, nkv, h):
    keys = jax.random.split(jax.random.key(t + nq + h), 4)
    q = jax.random.normal(keys[0], (2, t, nq, h), jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, t, nkv, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, t, nkv, h), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (2, t, nq, h), jnp.float32)
    mask = None
    if use_mask:  # two packed segments per row
        seg = jnp.where(jnp.arange(t) < t // 3, 1, 2)[None].repeat(2, 0)
        mask = make_attn_mask(jnp.ones((2, t), jnp.int32), segment_ids_bt=seg)

    def loss(impl, q, k, v):
        out = dot_product_attention(q, k, v, mask=mask, causal=causal, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * dout), out

    (_, out), grads = jax.value_and_grad(lambda *a: loss("cudnn", *a), (0, 1, 2), has_aux=True)(
        q, k, v
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss("xla", *a), (0, 1, 2), has_aux=True)(
        *f32
    )
    assert rel_err(out, ref) < 1e-2
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-2


def test_real_size_decoder_bf16_close_to_float32():
    cfg = LLMConfig.preset("qwen2.5-0.5b")
    model32 = init_llm(cfg, seed=0)
    model16 = init_llm(cfg, seed=0, dtype=jnp.bfloat16)
    ids = jax.random.randint(jax.random.key(1), (2, 512), 0, cfg.vocab_size)
    ref = model32(ids)
    out = model16(ids)
    assert rel_err(out, ref) < 3e-2

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids).astype(jnp.float32), -1))

    g16 = nnx.to_pure_dict(nnx.grad(loss)(model16))
    g32 = nnx.to_pure_dict(nnx.grad(loss)(model32))
    k16 = g16["layers"][3]["mlp"]["down_proj"]["kernel"]
    k32 = g32["layers"][3]["mlp"]["down_proj"]["kernel"]
    assert bool(jnp.all(jnp.isfinite(k16)))
    assert rel_err(k16, k32) < 1e-1
