"""Test-wide set-up (tests/ and the library's doctests): 8 fake CPU devices for sharding tests,
fast XLA:CPU compiles, offline hubs, a compilation cache."""
import os

# LLVM's optimisations off: the suite's programs are tiny, so XLA:CPU's compile dominates their
# cost (fresh-clone CI on 2 cores: pytest 15:05 -> 11:58, every test passing as before). Child
# processes that inherit XLA_FLAGS get it too; those that set their own (one device) do not.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                 os.path.join(os.path.dirname(__file__), ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
