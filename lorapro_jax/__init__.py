"""lorapro_jax: LoRA-Pro and DoRA dynamic-rank low-rank adapters for JAX/Flax.

The public API is re-exported here; each module holds one idea (see README.md's module map).
"""
from lorapro_jax.adapters import AdapterKeys, adapter_paths, is_adapter, map_adapters

__version__ = "0.1.0"
