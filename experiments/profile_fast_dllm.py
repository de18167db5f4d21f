"""Where a Fast-dLLM generation spends its GPU time (LLaDA-8B shape, random bf16 weights).

For each cache mode, runs `dllm_generate` once to compile, once timed, once under
`jax.profiler.trace`, then reads the trace (`jax.profiler.ProfileData`) and sums GPU kernel time
by kind (GEMM, attention, copies, other fusions), GPU busy time (union of kernel intervals)
against the traced span, and the top kernels. A second part times the per-layer projections of
one cached step (M = query rows) with separate and with fused QKV / gate-up weights against a
plain read of the same weights, which bounds what the GEMMs could reach.

Writes experiments/results/fast_dllm_profile.json.
    python experiments/profile_fast_dllm.py [--length 256] [--modes none,prefix,dual] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_fast_dllm import generate_kwargs  # the benchmark's settings of one point
from timing import timed  # the benchmarks' one timing helper

from jaxstack.generate.dllm import dllm_generate
from jaxstack.models.dllm import DLLMConfig, init_dllm

KINDS = (
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma")),
    ("copy", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def union_ns(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize_trace(path: str, top: int = 15) -> dict:
    """GPU kernel time by kind, busy vs span, top kernels, from one .xplane.pb."""
    pd = jax.profiler.ProfileData.from_file(path)
    by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    intervals, ops = [], collections.Counter()
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name == "XLA Ops":
                for ev in line.events:
                    ops[ev.name] += ev.duration_ns
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                by_kind[kernel_kind(ev.name)] += ev.duration_ns
                by_name[ev.name] += ev.duration_ns
                count[ev.name] += 1
                intervals.append((int(ev.start_ns), int(ev.start_ns + ev.duration_ns)))
    if not intervals:
        return {"error": "no GPU kernel events in the trace"}
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    ms = lambda ns: ns / 1e6  # noqa: E731
    return {
        "span_ms": ms(span),
        "busy_ms": ms(union_ns(intervals)),
        "kernels": sum(count.values()),
        "ms_by_kind": {k: ms(v) for k, v in by_kind.most_common()},
        "top_kernels": [
            {"name": n[:120], "ms": ms(v), "calls": count[n]} for n, v in by_name.most_common(top)
        ],
        "top_xla_ops": [{"name": n[:120], "ms": ms(v)} for n, v in ops.most_common(top)],
    }


def profile_mode(model, dcfg, prompt, length, cache, prefix_bucket):
    kw = generate_kwargs(dcfg, length, 32, cache, prefix_bucket)
    jax.block_until_ready(dllm_generate(model, prompt, **kw).tokens)
    t0 = time.perf_counter()
    out = dllm_generate(model, prompt, **kw)
    jax.block_until_ready(out.tokens)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(dllm_generate(model, prompt, **kw).tokens)
        trace = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        summary = summarize_trace(trace)
    return {"cache": cache or "none", "gen_length": length, "nfe": int(out.nfe),
            "seconds": seconds, "ms_per_token": 1e3 * seconds / length, **summary}  # fmt: skip


def _median_ms(fn, *args, repeats=20):
    return 1e3 * timed(fn, *args, warmup=1, repeats=repeats)


def projection_bench(cfg, rows: int, layers: int, seed: int = 0) -> dict:
    """One cached step's projections (no attention, no LM head) over `layers` layers at M=rows:
    separate q/k/v/o/gate/up/down vs fused qkv and gate_up, and a plain read of the weights."""
    d, f, hq = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    hkv = cfg.num_kv_heads * cfg.head_dim
    key = jax.random.key(seed)
    shapes = dict(q=(d, hq), k=(d, hkv), v=(d, hkv), o=(hq, d), g=(d, f), u=(d, f), dn=(f, d))
    ws = []
    for i in range(layers):
        ks = jax.random.split(jax.random.fold_in(key, i), len(shapes))
        ws.append({n: 0.02 * jax.random.normal(k, s, jnp.bfloat16)
                   for k, (n, s) in zip(ks, shapes.items())})  # fmt: skip
    fused = [{"qkv": jnp.concatenate([w["q"], w["k"], w["v"]], 1), "o": w["o"],
              "gu": jnp.concatenate([w["g"], w["u"]], 1), "dn": w["dn"]} for w in ws]  # fmt: skip
    x = jax.random.normal(key, (1, rows, d), jnp.bfloat16)

    @jax.jit
    def separate(x, ws):
        for w in ws:
            q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
            h = x + (q + jnp.tile(k + v, hq // hkv)) @ w["o"]
            x = h + (jax.nn.silu(h @ w["g"]) * (h @ w["u"])) @ w["dn"]
        return x

    @jax.jit
    def fused_fn(x, ws):
        for w in ws:
            q, k, v = jnp.split(x @ w["qkv"], [hq, hq + hkv], axis=-1)
            h = x + (q + jnp.tile(k + v, hq // hkv)) @ w["o"]
            g, u = jnp.split(h @ w["gu"], 2, axis=-1)
            x = h + (jax.nn.silu(g) * u) @ w["dn"]
        return x

    @jax.jit
    def read(ws):
        return sum(jnp.sum(a, dtype=jnp.float32) for w in ws for a in w.values())

    nbytes = sum(a.size * a.dtype.itemsize for w in ws for a in w.values())
    out = {"rows": rows, "layers": layers, "weight_gb": nbytes / 1e9}
    out["separate_ms"] = _median_ms(separate, x, ws)
    out["fused_ms"] = _median_ms(fused_fn, x, fused)
    out["read_ms"] = _median_ms(read, ws)
    out["read_tb_per_s"] = nbytes / out["read_ms"] / 1e9
    out["separate_tb_per_s"] = nbytes / out["separate_ms"] / 1e9
    out["fused_tb_per_s"] = nbytes / out["fused_ms"] / 1e9
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--modes", default="none,prefix,dual")
    ap.add_argument("--prefix-bucket", type=int, default=32)
    ap.add_argument("--rows", default="32,64,128,256", help="M of the projection benchmark")
    ap.add_argument("--quick", action="store_true", help="tiny preset (CPU check)")
    ap.add_argument("--out", default="experiments/results/fast_dllm_profile.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.length, args.prompt, args.rows = "tiny-llada", 32, 16, "8"
    dcfg = DLLMConfig.preset(args.preset)
    cfg = dcfg.llm
    result = {"benchmark": "fast_dllm_profile", "device": jax.devices()[0].device_kind,
              "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "preset": args.preset, "prompt_len": args.prompt, "block_length": 32,
              "prefix_bucket": args.prefix_bucket, "modes": [], "projections": []}  # fmt: skip

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    for rows in (int(r) for r in args.rows.split(",")):
        r = projection_bench(cfg, rows, cfg.num_layers)
        result["projections"].append(r)
        print(json.dumps(r), flush=True)
        save()
    model = init_dllm(dcfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    vocab = min(cfg.vocab_size, dcfg.mask_id)
    prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prompt)).astype(np.int32)
    for mode in args.modes.split(","):
        cache = None if mode == "none" else mode
        r = profile_mode(model, dcfg, prompt, args.length, cache, args.prefix_bucket)
        result["modes"].append(r)
        print(json.dumps(r, indent=1), flush=True)
        save()
    print("\n== summary ==")
    for p in result["projections"]:
        print(f"M={p['rows']:4d} separate {p['separate_ms']:.2f} ms ({p['separate_tb_per_s']:.2f} "
              f"TB/s) fused {p['fused_ms']:.2f} ms ({p['fused_tb_per_s']:.2f}) "
              f"read {p['read_ms']:.2f} ms ({p['read_tb_per_s']:.2f})")  # fmt: skip
    for m in result["modes"]:
        kinds = " ".join(f"{k} {v:.0f}" for k, v in m.get("ms_by_kind", {}).items())
        print(f"{m['cache']:6s} {m['ms_per_token']:.2f} ms/token; span {m.get('span_ms', 0):.0f} "
              f"busy {m.get('busy_ms', 0):.0f} ms; {m.get('kernels', 0)} kernels; {kinds}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
