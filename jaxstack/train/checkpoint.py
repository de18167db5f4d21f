"""Training checkpoints over orbax `CheckpointManager`: sharded arrays + a JSON meta record.

A checkpoint `<directory>/<step>/` holds three items:

- `state`: every array of the `TrainState` (step, float32 params, optimizer moments) as a
  nested dict with string keys (`params/layers/0/mlp/up_proj/kernel`, `opt_state/1/0/mu/...`),
  written shard by shard by every process (orbax coordinates multi-process saves);
- `meta`: a JSON record chosen by the caller (data position, seeds, the resolved config);
- `arrays`: JSON `{path: [shape, dtype]}` so a mismatched model gets a clear error naming the
  parameter instead of a deep orbax trace.

Restoring takes an abstract state whose leaves are `jax.ShapeDtypeStruct(shape, dtype,
sharding=...)` and reads each array directly into its sharding (any mesh, any process count).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxstack.hf.errors import CheckpointError  # the one exception for unusable checkpoints
from jaxstack.train.step import TrainState

__all__ = ["CheckpointError", "Checkpointer", "abstract_state"]


def _path_str(entry: Any) -> str:
    """One pytree key-path entry as a string (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_paths(tree: Any) -> dict[tuple[str, ...], Any]:
    """{(str, ...) path: leaf} for every leaf of `tree` (TrainState, namedtuples, int keys ...)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in flat:
        key = tuple(_path_str(p) for p in path)
        if key in out:
            raise CheckpointError(f"two leaves map to the same checkpoint key {'/'.join(key)!r}")
        out[key] = leaf
    return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    """Nested dict with string keys from {path: leaf} (the layout orbax stores)."""
    root: dict = {}
    for path, leaf in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return root


def _lookup(tree: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _array_table(flat: dict[tuple[str, ...], Any]) -> dict[str, list]:
    return {"/".join(k): [list(v.shape), str(v.dtype)] for k, v in flat.items()}


def _with_sharding(leaf: Any) -> jax.ShapeDtypeStruct:
    """Restore target for one leaf; arrays without a sharding go to the first local device."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


class Checkpointer:
    """Save / restore `TrainState`s under `directory`, keeping the newest `keep` (None: all).

    Saves are asynchronous: `save` returns once the arrays are copied to host memory (so the
    caller may donate or overwrite them) and the files are written in the background;
    `wait_until_finished` blocks until they are on disk. Every process must call every method
    (orbax synchronises them); only the primary process writes JSON items.
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: TrainState, meta: dict) -> None:
        """Write `state` (any pytree of jax.Arrays) and the JSON-serialisable `meta` at `step`."""
        flat = _flat_paths(state)
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_nest(flat)),
                meta=ocp.args.JsonSave(meta),
                arrays=ocp.args.JsonSave(_array_table(flat)),
            ),
            force=True,
        )

    def latest_step(self) -> int | None:
        """The newest fully written step, or None if the directory holds no checkpoint."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The JSON meta record of checkpoint `step` (no arrays are read)."""
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            return dict(self._manager.restore(step, args=args)["meta"])
        except Exception as e:  # not written by Checkpointer.save, or damaged
            where = os.path.join(self.directory, str(step))
            raise CheckpointError(f"{where} has no readable meta record: {e}") from e

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`.

        target: the state's structure with `jax.ShapeDtypeStruct` leaves (shape, dtype
        and target `sharding`; e.g. `jax.eval_shape` output with shardings attached). Each array
        is read straight into its sharding. Raises CheckpointError if the step is missing or
        the shapes/dtypes/keys differ from the checkpoint.
        """
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} ({steps})")
        where = os.path.join(self.directory, str(step))
        flat = _flat_paths(target)
        targets = {k: _with_sharding(v) for k, v in flat.items()}
        try:
            args = ocp.args.Composite(arrays=ocp.args.JsonRestore())
            stored = self._manager.restore(step, args=args)["arrays"]
        except Exception as e:  # not written by Checkpointer.save, or damaged
            raise CheckpointError(f"{where} has no readable array table: {e}") from e
        self._check_match(where, stored, _array_table(targets))
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_nest(targets)), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # corrupt / partially written files
            raise CheckpointError(f"cannot restore checkpoint {where}: {e}") from e
        nested = out["state"]
        leaves = [_lookup(nested, k) for k in flat]
        treedef = jax.tree.structure(target)
        return jax.tree.unflatten(treedef, leaves), dict(out["meta"])

    @staticmethod
    def _check_match(where: str, stored: dict, wanted: dict) -> None:
        problems = []
        missing = sorted(set(wanted) - set(stored))
        extra = sorted(set(stored) - set(wanted))
        if missing:
            problems.append(f"missing in checkpoint: {', '.join(missing[:5])}")
        if extra:
            problems.append(f"not in the model: {', '.join(extra[:5])}")
        for key in sorted(set(wanted) & set(stored)):
            if list(stored[key]) != list(wanted[key]):
                s, w = stored[key], wanted[key]
                problems.append(
                    f"{key}: checkpoint {tuple(s[0])} {s[1]} vs model {tuple(w[0])} {w[1]}"
                )
        if problems:
            raise CheckpointError(
                f"checkpoint {where} does not match the model/optimizer state: "
                + "; ".join(problems[:8])
            )

    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_state(state: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStruct tree of `state` (concrete or from `jax.eval_shape`) with shardings.

    shardings: a tree of the same structure (e.g. from `init_train_state`), or None to keep
    each leaf's own sharding (or the first local device).
    """
    if shardings is None:
        return jax.tree.map(_with_sharding, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
