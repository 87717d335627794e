"""Experiment (issue 16): the gate/up adapters folded into their base GEMM by augmenting its
contraction, measured as ``jax_step.py`` rows. Not a library feature.

For ``y = x W + s (x A) B`` the patched layer computes ``[x | s x A] @ [W ; B]``: one GEMM of
contraction ``n_in + r``. Against the library's form (``x W``, then ``(x A) B`` as its own kernel
that writes a full ``(tokens, n_out)`` tensor for the consumer to read beside ``x W``), it trades
the expansion's write and read (2 x 92 MB a projection at 1b) and, in the backward pass, the read
of ``dy`` for ``dy Bᵀ`` (which the transposed GEMM ``dy [Wᵀ | Bᵀ]`` now yields) for a copy of
``x`` next to ``s x A`` (2 x 32 MB) and a copy of ``[W ; B]`` (2 x 23 MB). Only gate and up, whose
outputs are 2.75x wider than their input, gain by that count (about 1.9 ms a step at 1b); the
other projections use the library's form.

Usage: [AUGMENTED_PAD=64] python benchmarks/augmented_gate_up.py <jax_step.py arguments>
(LoRA modes only). ``AUGMENTED_PAD``: pad the contraction ``n_in + r`` with zeros up to a
multiple of this (the GEMM kernels' K tile), so that no kernel runs a partial K tile.
"""
from __future__ import annotations

import importlib
import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax_step  # noqa: E402  (sets up the path and the timer first)
from lorapro_jax.adapters import DEFAULT_KEYS  # noqa: E402

inject = importlib.import_module("lorapro_jax.inject")  # the module (the package exports the function)
AUGMENTED = ("gate_proj", "up_proj")
PAD = int(os.environ.get("AUGMENTED_PAD", "1"))
library_add_adapter = inject.add_adapter


def augmented_add_adapter(module, x, y, layout, config, precision=None):
  """The library's ``add_adapter`` except for gate/up: ``[x | s x A] @ [W ; B]`` (the base
  product ``y`` is then unused, and XLA drops it)."""
  path = tuple(str(p) for p in module.path)
  if (not path or path[-1] not in AUGMENTED or module.is_initializing() or config.gated
      or config.dropout > 0.0 or layout.stack_shape or getattr(module, "use_bias", False)):
    return library_add_adapter(module, x, y, layout, config, precision)
  compute = y.dtype
  kernel = module.get_variable("params", "kernel").astype(compute)
  a = module.get_variable("params", DEFAULT_KEYS.a).astype(compute)
  b = module.get_variable("params", DEFAULT_KEYS.b).astype(compute)
  x = x.astype(compute)
  u = config.scale_for(path) * jnp.matmul(x, a, precision=precision)
  extra = -(x.shape[-1] + u.shape[-1]) % PAD  # zero columns of u, zero rows of B
  u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, extra)])
  b = jnp.pad(b, [(0, extra), (0, 0)])
  return jnp.matmul(jnp.concatenate([x, u], axis=-1), jnp.concatenate([kernel, b], axis=0),
                    precision=precision)


if __name__ == "__main__":
  inject.add_adapter = augmented_add_adapter
  jax_step.main()
