"""Decode-step variants at batch 1 (Qwen2.5-1.5B shape, bf16), one variant per process.

Compares the attention implementation used for single-token decode (cuDNN vs XLA) under the
XLA_FLAGS the caller sets (e.g. command buffers for while loops). Prints one JSON line.
    XLA_FLAGS=... python experiments/decode_variants.py --attn xla --batch 1
"""

from __future__ import annotations

import argparse
import json
import os

import jax

import jaxstack.nn.attention as attention
from experiments.bench_llm_train import bench_decode, measure_ceilings
from jaxstack.models.llm import LLMConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attn", choices=["cudnn", "xla"], default="cudnn")
    ap.add_argument("--batches", default="1", help="comma list of batch sizes")
    ap.add_argument("--preset", default="qwen2.5-1.5b")
    args = ap.parse_args()
    if args.attn == "xla":
        attention._cudnn_ok = lambda q, k: False  # force the XLA path for this process
    bw = measure_ceilings()["copy_bytes_per_s"]
    for b in (int(x) for x in args.batches.split(",")):
        r = bench_decode(LLMConfig.preset(args.preset), b, 128, 256, bw)
        r.update(
            attn=args.attn,
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            device=jax.devices()[0].device_kind,
        )
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
