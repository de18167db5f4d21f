"""Multi-process start-up on JAX's own runtime (`jax.distributed.initialize`).

`initialize()` is called once at the top of every entry point, before any JAX computation:

- explicit arguments win (passed straight to `jax.distributed.initialize`);
- else the environment decides, first match wins:
    JAXSTACK_COORDINATOR=host:port, JAXSTACK_NUM_PROCESSES=n, JAXSTACK_PROCESS_ID=i
        (optional JAXSTACK_LOCAL_DEVICE_IDS=0,1): any launcher, e.g. local tests, pdsh, ssh;
    Kubernetes indexed Job / JobSet: JOB_COMPLETION_INDEX (the process id) together with
        JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES set in the pod spec;
    SLURM (inside `srun` with more than one task): jax's own SLURM auto-detection;
    Open MPI (`mpirun -np n`, n > 1): jax's own Open MPI auto-detection;
- nothing found: a single process, nothing to do.

On the CPU, cross-process collectives go through gloo (enabled here when the jax version
leaves it unset), so the same code runs as 2 local CPU processes in tests.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax

_DEFAULT_PORT = 8476
_state: dict[str, Any] = {"initialized": False, "method": None}


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _with_port(address: str) -> str:
    return address if ":" in address.rsplit("]", 1)[-1] else f"{address}:{_DEFAULT_PORT}"


def detect_cluster(env: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]] | None:
    """(method, kwargs for jax.distributed.initialize) found in `env` (default os.environ).

    None means a single process. Raises ValueError for a half-set JAXSTACK_* environment.
    """
    env = os.environ if env is None else env
    names = ("JAXSTACK_COORDINATOR", "JAXSTACK_NUM_PROCESSES", "JAXSTACK_PROCESS_ID")
    if any(n in env for n in names):
        missing = [n for n in names if not env.get(n)]
        if missing:
            raise ValueError(f"multi-process environment incomplete: set {', '.join(missing)}")
        num, pid = _int_env(env, names[1]), _int_env(env, names[2])
        if not 0 <= pid < num:
            raise ValueError(f"JAXSTACK_PROCESS_ID={pid} is not in [0, {num})")
        if num == 1:
            return None
        kwargs: dict[str, Any] = dict(
            coordinator_address=_with_port(env[names[0]]), num_processes=num, process_id=pid
        )
        if env.get("JAXSTACK_LOCAL_DEVICE_IDS"):
            ids = env["JAXSTACK_LOCAL_DEVICE_IDS"].split(",")
            kwargs["local_device_ids"] = [int(i) for i in ids]
        return "env", kwargs
    if "JOB_COMPLETION_INDEX" in env and env.get("JAX_COORDINATOR_ADDRESS"):
        if "JAX_NUM_PROCESSES" not in env:
            raise ValueError(
                "Kubernetes indexed job detected (JOB_COMPLETION_INDEX, JAX_COORDINATOR_ADDRESS) "
                "but JAX_NUM_PROCESSES is not set; set it to the number of pods"
            )
        num = _int_env(env, "JAX_NUM_PROCESSES")
        if num > 1:
            return "kubernetes", dict(
                coordinator_address=_with_port(env["JAX_COORDINATOR_ADDRESS"]),
                num_processes=num,
                process_id=_int_env(env, "JOB_COMPLETION_INDEX"),
            )
        return None
    if "SLURM_JOB_ID" in env:
        ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        if ntasks > 1:
            if "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:
                return "slurm", {}
            warnings.warn(
                f"SLURM job with {ntasks} tasks but this process is not inside an srun step: "
                "running as a single process (launch with `srun python ...` for multi-process)",
                stacklevel=3,
            )
        return None
    if int(env.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi", {}
    return None


def _enable_cpu_collectives() -> None:
    """Use gloo for cross-process CPU collectives where this jax version leaves them unset."""
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # option renamed or gone: jax decides
        pass


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Start JAX's multi-process runtime if this is a multi-process job; True if it is.

    Call before any JAX computation. With any argument given they go straight to
    jax.distributed.initialize (which fills the rest from the cluster); otherwise see the
    module doc for the environments detected. Idempotent: later calls do nothing and return
    the first call's answer (True also when jax.distributed was initialized elsewhere).
    """
    if _state["initialized"] or jax.distributed.is_initialized():
        _state["initialized"] = True
        return True
    explicit = dict(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
    )
    explicit = {k: v for k, v in explicit.items() if v is not None}
    found = ("explicit", explicit) if explicit else detect_cluster()
    if found is None:
        return False
    method, kwargs = found
    _enable_cpu_collectives()
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({method}: {kwargs or 'auto-detect'}): {e}. "
            "It must run before any JAX computation, and every process must reach the coordinator."
        ) from e
    _state.update(initialized=True, method=method)
    return True


def describe_environment() -> dict[str, Any]:
    """Where this process stands: process index/count, local/global devices, platform.

    Initializes the JAX backend (call it after `initialize`).
    """
    local = jax.local_devices()
    return {
        "hostname": socket.gethostname(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "distributed": bool(_state["initialized"] or jax.distributed.is_initialized()),
        "cluster": _state["method"],
        "platform": jax.default_backend(),
        "device_kind": local[0].device_kind if local else None,
        "local_device_count": len(local),
        "device_count": jax.device_count(),
        "local_devices": [str(d) for d in local],
        "jax_version": jax.__version__,
    }
