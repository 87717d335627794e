"""Test-wide set-up (tests/ and the library's doctests): 8 fake CPU devices for sharding tests,
offline hubs, a compilation cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                 os.path.join(os.path.dirname(__file__), ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
