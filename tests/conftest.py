"""Test session setup: 8 simulated CPU devices (sharding tests) and float32 matmuls everywhere."""

import os

# Must happen before jax is imported anywhere: sharded tests compare meshes of 8 CPU devices
# against the single-device result (device 0 is the default device for everything else).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
