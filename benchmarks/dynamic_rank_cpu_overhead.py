"""The per-step cost of the dynamic-rank transform on the CPU (docs/dynamic_rank.md, "Cost").

A small model: 6 residual layers of MiniLM-L6-shaped kernels (4 of 384x384, 384x1536, 1536x384),
gated adapters r' = 12 on all 36, batch 64. Times, interleaved so that a shared machine's load
hits all alike: the jitted train step and the jitted optimizer update alone, each with AdamW and
with AdamW followed by :func:`lorapro_jax.dynamic_rank.dynamic_rank`. GPU numbers belong to
``jax_step.py``; ``tests/test_dynamic_rank.py`` checks on :func:`problem` that a step without a
pruning event passes every update through bit for bit.

Usage: python benchmarks/dynamic_rank_cpu_overhead.py [--runs 15]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorapro_jax.dynamic_rank import DynamicRankConfig, dynamic_rank

SHAPES = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "out": (384, 384),
          "ffn_in": (384, 1536), "ffn_out": (1536, 384)}


def problem(num_layers: int = 6):
  """``(params, loss, grads)``: the gated adapters, the loss of the model, constant gradients."""
  layers = tuple(str(i) for i in range(num_layers))
  rng = np.random.default_rng(0)
  base = {i: {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
              for k, s in SHAPES.items()} for i in layers}
  params = {"layer": {i: {k: {"lora_a": jnp.asarray(rng.normal(size=(n, 12)) / 20, jnp.float32),
                              "lora_b": jnp.asarray(rng.normal(size=(12, m)) / 20, jnp.float32),
                              "lora_c": jnp.zeros((12,), jnp.float32)}
                          for k, (n, m) in SHAPES.items()} for i in layers}}
  x = jnp.asarray(rng.normal(size=(64, 384)), jnp.float32)

  def dense(h, kernel, node):
    return h @ kernel + 2.0 * ((h @ node["lora_a"]) * node["lora_c"]) @ node["lora_b"]

  def loss(p):
    h = x
    for i in layers:
      for k in ("query", "key", "value", "out"):
        h = h + jnp.tanh(dense(h, base[i][k], p["layer"][i][k]))
      h = h + dense(jax.nn.gelu(dense(h, base[i]["ffn_in"], p["layer"][i]["ffn_in"])),
                    base[i]["ffn_out"], p["layer"][i]["ffn_out"])
    return jnp.mean(h ** 2)

  return params, loss, jax.tree.map(lambda leaf: 1e-3 * jnp.ones_like(leaf), params)


def optimizers() -> dict[str, optax.GradientTransformation]:
  return {"adamw": optax.adamw(1e-3),
          "adamw+dynamic_rank": optax.chain(optax.adamw(1e-3),
                                            dynamic_rank(DynamicRankConfig(1000, 8)))}


def train_step(loss, optimizer):
  def step(params, state):
    updates, state = optimizer.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def main(argv=None) -> dict[str, list[float]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=15)
  args = parser.parse_args(argv)
  params, loss, grads = problem()
  calls = {}
  for name, optimizer in optimizers().items():
    state = optimizer.init(params)
    calls[f"{name} step"] = (train_step(loss, optimizer), (params, state))
    calls[f"{name} update"] = (jax.jit(optimizer.update), (grads, state, params))
  for fn, fn_args in calls.values():
    jax.block_until_ready(fn(*fn_args))  # compiles
  runs = {name: [] for name in calls}
  for _ in range(args.runs):
    for name, (fn, fn_args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))
      runs[name].append(1e3 * (time.perf_counter() - start))
  print(f"ms on {jax.devices()[0].platform}, {args.runs} interleaved runs:")
  for name, times in runs.items():
    print(f"  {name:28s} min {min(times):7.2f}  median {np.median(times):7.2f}")
  return runs


if __name__ == "__main__":
  main()
