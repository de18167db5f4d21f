"""Meshes, sharding rules, sequence parallelism and multi-host initialisation."""

from jaxstack.parallel.distributed import describe_environment, detect_cluster, initialize
from jaxstack.parallel.mesh import (
    AXES,
    RULES,
    IndivisibleShardingWarning,
    constrain,
    context_mesh,
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
    sequence_parallel_size,
    shard_map,
    to_zigzag,
    use_sequence_parallel,
    zigzag_permutation,
)

__all__ = [
    "AXES",
    "RULES",
    "IndivisibleShardingWarning",
    "constrain",
    "context_mesh",
    "describe_environment",
    "detect_cluster",
    "from_zigzag",
    "initialize",
    "make_mesh",
    "parse_mesh_spec",
    "sequence_parallel_attention",
    "sequence_parallel_size",
    "shard_map",
    "shard_model",
    "spec_for",
    "state_shardings",
    "to_zigzag",
    "use_mesh",
    "use_sequence_parallel",
    "zigzag_permutation",
]
