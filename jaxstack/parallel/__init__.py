"""Meshes, sharding rules, sequence parallelism and multi-host initialisation."""

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
from jaxstack.parallel.sequence import (
    from_zigzag,
    sequence_parallel_attention,
    to_zigzag,
    use_sequence_parallel,
    zigzag_permutation,
)

__all__ = [
    "AXES",
    "RULES",
    "constrain",
    "describe_environment",
    "detect_cluster",
    "from_zigzag",
    "initialize",
    "current_mesh",
    "make_mesh",
    "parse_mesh_spec",
    "sequence_parallel_attention",
    "shard_model",
    "spec_for",
    "state_shardings",
    "to_zigzag",
    "use_mesh",
    "use_sequence_parallel",
    "zigzag_permutation",
]
