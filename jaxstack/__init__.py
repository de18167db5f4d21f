"""jaxstack: a JAX/Flax stack for efficient multimodal AI on NVIDIA GPUs.

Importing jaxstack parses no arguments and allocates no device memory; subpackages
(`jaxstack.hf`, `jaxstack.parallel`, `jaxstack.train`, `jaxstack.generate`, ...) load on use.
"""

__version__ = "0.1.0"
