"""Meshes, sharding rules, and multi-host initialisation."""

from jaxstack.parallel.distributed import describe_environment, detect_cluster, initialize
from jaxstack.parallel.mesh import (
    AXES,
    RULES,
    constrain,
    current_mesh,
    make_mesh,
    parse_mesh_spec,
    shard_model,
    spec_for,
    state_shardings,
    use_mesh,
)

__all__ = [
    "AXES",
    "RULES",
    "constrain",
    "describe_environment",
    "detect_cluster",
    "initialize",
    "current_mesh",
    "make_mesh",
    "parse_mesh_spec",
    "shard_model",
    "spec_for",
    "state_shardings",
    "use_mesh",
]
