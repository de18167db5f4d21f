"""Data parallelism across 2 real processes (localhost, CPU, gloo collectives).

Two workers (this file run as a script) start through `jaxstack.parallel.distributed.initialize()`
from JAXSTACK_* variables, with one CPU device each, build the tiny model on the mesh "data=2"
spanning both processes, place one global batch with `place_batch` and run one training step;
then both save the state with the orbax `Checkpointer` and restore it. The pytest process runs
the same step on one device: loss and parameters must agree within 1e-5 (loss relative; params
as max |p - p_ref| / max |p_ref - p_before|, the error relative to the update size), and the
checkpoint written by the two processes must restore here, on one device, to the same values.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import optax
from localhost_workers import start_workers, wait_workers

TOL = 1e-5
VOCAB = 263  # the byte tokenizer's vocabulary


def _optimizer() -> optax.GradientTransformation:
    """AdamW + clipping at a constant lr, eps=1 so one update is ~g (see test_sharding.py)."""
    from jaxstack.train.step import weight_decay_mask

    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1.0, b1=0.9, b2=0.95, eps=1.0, weight_decay=0.1, mask=weight_decay_mask),
    )


def _batch() -> dict[str, np.ndarray]:
    """The global batch [4, 16] (identical on every process): two packed segments per row."""
    rng = np.random.default_rng(0)
    seg = np.zeros((4, 16), np.int32)
    seg[:, :9], seg[:, 9:14] = 1, 2
    return {
        "input_ids": rng.integers(0, VOCAB, (4, 16)).astype(np.int32),
        "targets": rng.integers(0, VOCAB, (4, 16)).astype(np.int32),
        "segment_ids": seg,
        "loss_mask": (rng.random((4, 16)) < 0.8) & (seg > 0),
    }


def _host(tree):
    """Full values of (possibly multi-process) arrays as numpy."""
    from jax.experimental.multihost_utils import process_allgather

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(lambda x: np.asarray(process_allgather(x, tiled=True)), tree)


def _one_step(mesh):
    """(loss, params before, params after, state, shardings) of one step on `mesh`."""
    from flax import nnx

    from jaxstack.train import ModelSection, build_model, init_train_state
    from jaxstack.train.step import make_train_step, place_batch

    model = build_model(ModelSection(), VOCAB, mesh, seed=0)
    optimizer = _optimizer()
    state, shardings = init_train_state(model, optimizer, mesh)
    before = _host(state.params)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    step = make_train_step(graphdef, rest, optimizer, mesh=mesh, state_sh=shardings)
    state, metrics = step(state, place_batch(mesh, _batch()))
    return float(_host(metrics["loss"])), before, state, shardings


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _worker(out_dir: str) -> None:
    from jaxstack.parallel.distributed import initialize

    assert initialize(), "JAXSTACK_* variables did not start a multi-process runtime"
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxstack.parallel.mesh import make_mesh
    from jaxstack.train import Checkpointer, abstract_state

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 2, 1)
    mesh = make_mesh("data=2")
    loss, _, state, shardings = _one_step(mesh)
    params = _host(state.params)
    ckpt = Checkpointer(os.path.join(out_dir, "ckpt"))
    ckpt.save(1, state, {"processes": jax.process_count()})
    ckpt.wait_until_finished()
    restored, meta = ckpt.restore(1, abstract_state(state, shardings))
    ckpt.close()
    same = jax.tree.map(np.array_equal, _host(restored.params), params)
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "params.npz"), **_flat(params))
        info = {"loss": loss, "restored_equal": all(jax.tree.leaves(same)), "meta": meta}
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(info, f)


def test_two_process_data_parallel_step_matches_single_process(tmp_path):
    procs = start_workers([os.path.abspath(__file__), str(tmp_path)])  # 1 CPU device each
    # The single-device reference runs here meanwhile (same code, mesh of one device).
    from jaxstack.parallel.mesh import make_mesh
    from jaxstack.train import Checkpointer, abstract_state

    ref_loss, before, ref_state, _ = _one_step(make_mesh("data=1", jax.devices()[:1]))
    ref = _flat(jax.device_get(ref_state.params))
    wait_workers(procs, timeout=180)

    result = json.load(open(tmp_path / "result.json"))
    assert abs(result["loss"] - ref_loss) / abs(ref_loss) <= TOL
    assert result["restored_equal"] and result["meta"] == {"processes": 2}
    got = dict(np.load(tmp_path / "params.npz"))
    assert got.keys() == ref.keys()
    update = max(np.max(np.abs(ref[k] - v)) for k, v in _flat(before).items())
    err = max(np.max(np.abs(got[k] - ref[k])) for k in ref) / update
    assert err <= TOL, f"2-process params differ by {err:.2e} of the update size"

    # The checkpoint the two processes wrote restores here, onto one device.
    on_one = abstract_state(jax.device_get(ref_state))
    restored, _ = Checkpointer(tmp_path / "ckpt").restore(1, on_one)
    restored_flat = _flat(jax.device_get(restored.params))
    assert all(np.array_equal(restored_flat[k], got[k]) for k in got)


if __name__ == "__main__":
    _worker(sys.argv[1])
