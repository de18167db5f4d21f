"""Test session setup: 8 simulated CPU devices (sharding tests), float32 matmuls everywhere, and
a compilation cache private to this session."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere: sharded tests compare meshes of 8 CPU devices
# against the single-device result (device 0 is the default device for everything else).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The jobs under test (train / SFT / RL / dLLM resume tests, the CLI) build the same programs
# again in fresh closures -- a resumed run recompiles exactly the step the straight run did.
# XLA's persistent cache, in a directory that lives only as long as this session, turns those
# identical recompilations into lookups (keyed by the full HLO, compile options and devices, so
# a hit is the same executable). Nothing carries over between sessions; tests that count
# traces (the TRACE_COUNTS counters) see every trace as before.
if jax.config.jax_compilation_cache_dir is None:
    _CACHE_DIR = tempfile.mkdtemp(prefix="jaxstack-tests-xla-cache-")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
