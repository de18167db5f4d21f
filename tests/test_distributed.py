"""Multi-process start-up: environment detection (fake initialize) and a real 2-process CPU run."""

from __future__ import annotations

import json
import textwrap

import jax
import pytest
from localhost_workers import start_workers, wait_workers

from jaxstack.parallel import distributed

CLUSTER_VARS = (
    "JAXSTACK_COORDINATOR",
    "JAXSTACK_NUM_PROCESSES",
    "JAXSTACK_PROCESS_ID",
    "JAXSTACK_LOCAL_DEVICE_IDS",
    "JOB_COMPLETION_INDEX",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NODELIST",
    "SLURM_PROCID",
    "OMPI_COMM_WORLD_SIZE",
)


@pytest.fixture
def fake_init(monkeypatch):
    """Clean cluster env, fresh module state, and a recording stand-in for jax's initialize."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_state", {"initialized": False, "method": None})
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_single_process_is_noop(fake_init):
    assert distributed.detect_cluster() is None
    assert distributed.initialize() is False and fake_init == []
    env = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}
    assert distributed.detect_cluster(env) is None
    assert (
        distributed.detect_cluster(
            {
                "JAXSTACK_COORDINATOR": "h:1",
                "JAXSTACK_NUM_PROCESSES": "1",
                "JAXSTACK_PROCESS_ID": "0",
            }
        )
        is None
    )


def test_env_detection(fake_init, monkeypatch):
    monkeypatch.setenv("JAXSTACK_COORDINATOR", "node0")
    monkeypatch.setenv("JAXSTACK_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXSTACK_PROCESS_ID", "3")
    monkeypatch.setenv("JAXSTACK_LOCAL_DEVICE_IDS", "0,1")
    monkeypatch.setenv("SLURM_JOB_ID", "9")  # JAXSTACK_* wins over a surrounding cluster
    assert distributed.initialize() is True
    assert distributed.initialize() is True  # idempotent: second call does nothing
    assert fake_init == [
        dict(
            coordinator_address="node0:8476",
            num_processes=4,
            process_id=3,
            local_device_ids=[0, 1],
        )
    ]
    assert distributed._state["method"] == "env"


def test_explicit_arguments_win(fake_init, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    assert distributed.initialize("10.0.0.1:1234", 2, 1) is True
    assert fake_init == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {
                "SLURM_JOB_ID": "7",
                "SLURM_NTASKS": "8",
                "SLURM_STEP_NODELIST": "n[1-2]",
                "SLURM_PROCID": "0",
            },
            ("slurm", {}),
        ),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, ("openmpi", {})),
        (
            {
                "JOB_COMPLETION_INDEX": "2",
                "JAX_COORDINATOR_ADDRESS": "job-0.svc:5555",
                "JAX_NUM_PROCESSES": "4",
            },
            (
                "kubernetes",
                dict(coordinator_address="job-0.svc:5555", num_processes=4, process_id=2),
            ),
        ),
        (
            {
                "JAXSTACK_COORDINATOR": "[::1]",
                "JAXSTACK_NUM_PROCESSES": "2",
                "JAXSTACK_PROCESS_ID": "0",
            },
            ("env", dict(coordinator_address="[::1]:8476", num_processes=2, process_id=0)),
        ),
    ],
)
def test_cluster_detection(env, expected, fake_init):
    assert distributed.detect_cluster(env) == expected


def test_auto_detected_clusters_call_jax_autodetect(fake_init, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.initialize() is True and fake_init == [{}]
    assert distributed._state["method"] == "openmpi"


def test_bad_environments(fake_init):
    with pytest.raises(ValueError, match="incomplete: set JAXSTACK_PROCESS_ID"):
        distributed.detect_cluster({"JAXSTACK_COORDINATOR": "h:1", "JAXSTACK_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="JAXSTACK_NUM_PROCESSES='two' is not an integer"):
        distributed.detect_cluster(
            {
                "JAXSTACK_COORDINATOR": "h",
                "JAXSTACK_NUM_PROCESSES": "two",
                "JAXSTACK_PROCESS_ID": "0",
            }
        )
    with pytest.raises(ValueError, match=r"JAXSTACK_PROCESS_ID=2 is not in \[0, 2\)"):
        distributed.detect_cluster(
            {"JAXSTACK_COORDINATOR": "h", "JAXSTACK_NUM_PROCESSES": "2", "JAXSTACK_PROCESS_ID": "2"}
        )
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES is not set"):
        distributed.detect_cluster({"JOB_COMPLETION_INDEX": "0", "JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.warns(UserWarning, match="not inside an srun step"):  # sbatch without srun
        assert distributed.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) is None


def test_describe_environment_single_process():
    info = distributed.describe_environment()
    assert info["process_index"] == 0 and info["process_count"] == 1
    assert info["device_count"] == info["local_device_count"] == len(jax.devices())
    assert info["platform"] == "cpu"


WORKER = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxstack.parallel import distributed
    from jaxstack.parallel.mesh import make_mesh

    assert distributed.initialize() is True
    assert distributed.initialize() is True  # idempotent
    info = distributed.describe_environment()
    mesh = make_mesh("data=-1")  # all devices of both processes
    pid = jax.process_index()
    local = (np.arange(4, dtype=np.float32) + 10 * pid).reshape(1, 4)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)  # [2, 4]
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    smap = getattr(jax, "shard_map", None)
    if smap is None:
        from jax.experimental.shard_map import shard_map as smap
    psum = jax.jit(smap(lambda a: jax.lax.psum(a.sum(0), "data"), mesh=mesh,
                        in_specs=P("data"), out_specs=P()))(x)
    print("RESULT " + json.dumps(dict(info=info, shape=list(x.shape), total=float(total),
                                      psum=np.asarray(psum.addressable_data(0)).tolist())))
    """
)


def test_two_processes_localhost():
    procs = start_workers(["-c", WORKER], drop_env=tuple(CLUSTER_VARS))
    logs = wait_workers(procs, timeout=120)
    outs = [json.loads(log.split("RESULT ", 1)[1].splitlines()[0]) for log in logs]
    for i, r in enumerate(outs):
        assert r["info"]["process_index"] == i and r["info"]["process_count"] == 2
        assert r["info"]["local_device_count"] == 1 and r["info"]["device_count"] == 2
        assert r["info"]["distributed"] and r["info"]["cluster"] == "env"
        assert r["shape"] == [2, 4]
        assert r["total"] == sum(range(4)) + sum(range(10, 14))  # 52: data of both processes
        assert r["psum"] == [10.0, 12.0, 14.0, 16.0]
