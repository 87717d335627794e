"""The optimizer update alone, on the 154 LoRA pairs of a 1B Llama-style model (issue 4, item 4).

Adapters r=8 on q/k/v/o/gate/up/down of 22 layers (hidden 2048, SwiGLU 5632, 4 KV heads of 64),
float32. Each variant is one jitted ``params, state = step(params, state, grads)`` (update +
apply, params and state donated), timed as the median of ``--steps`` calls after warm-up:

* ``adamw``: ``optax.adamw`` on the adapters;
* ``lora_pro_project``: ``lora_pro_project`` alone (the adjustment, no Adam);
* ``lora_pro`` / ``lora_pro_full``: :func:`lorapro_jax.lora_pro.lora_pro` /
  :func:`lorapro_jax.lora_pro.lora_pro_full`;
* ``lora_pro_full_factored``: ``lora_pro_full`` with ``inner=optax.scale_by_factored_rms()``
  (Adafactor's factored second moment, no first moment: state O(n_in + n_out) per kernel);
* ``adamw_full_rank``: ``optax.adamw`` on the full-rank float32 kernels of the same 154 layers
  (what ``lora_pro_full`` does in essence: its moments have those shapes).

Two layouts of the same adapters: ``stacked`` (7 nodes of shape (22, n_in, r), as the scanned
model of ``lorapro_jax.models.decoder`` holds them) and ``flat`` (154 nodes, one per layer, as an
unscanned model holds them).

Usage: python benchmarks/lora_pro_update.py [--tiny] [--steps 20] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from lorapro_jax.lora_pro import lora_pro, lora_pro_full, lora_pro_project  # noqa: E402


def layer_shapes(shape: dict) -> dict[str, tuple[int, int]]:
  h, f = shape["hidden_size"], shape["intermediate_size"]
  kv = shape["num_kv_heads"] * (h // shape["num_heads"])
  return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
          "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def adapters(shape: dict, rank: int, layout: str, key, full_rank: bool = False):
  """The adapter tree (or, with ``full_rank``, the kernels) with random values."""
  layers = shape["num_layers"]
  tree = {}
  for index, (name, (n_in, n_out)) in enumerate(layer_shapes(shape).items()):
    k = jax.random.fold_in(key, index)
    stack = (layers,) if layout == "stacked" else ()

    def node(k, stack=stack):
      ka, kb = jax.random.split(k)
      if full_rank:
        return {"kernel": 0.02 * jax.random.normal(ka, stack + (n_in, n_out))}
      return {"lora_a": jax.random.normal(ka, stack + (n_in, rank)) / np.sqrt(n_in),
              "lora_b": 1e-2 * jax.random.normal(kb, stack + (rank, n_out))}
    if layout == "stacked":
      tree[name] = node(k)
    else:
      for layer in range(layers):
        tree.setdefault(str(layer), {})[name] = node(jax.random.fold_in(k, layer))
  return tree


def optimizer_for(variant: str, scale: float):
  lr = 1e-4
  return {
      "adamw": lambda: optax.adamw(lr),
      "adamw_full_rank": lambda: optax.adamw(lr),
      "lora_pro_project": lambda: lora_pro_project(scale),
      "lora_pro": lambda: lora_pro(lr, scale),
      "lora_pro_full": lambda: lora_pro_full(lr, scale),
      "lora_pro_full_factored": lambda: lora_pro_full(lr, scale,
                                                      inner=optax.scale_by_factored_rms()),
  }[variant]()


def time_variant(variant: str, layout: str, shape: dict, steps: int, warmup: int) -> dict:
  scale = common.LORA_ALPHA / common.LORA_RANK
  optimizer = optimizer_for(variant, scale)
  params = adapters(shape, common.LORA_RANK, layout, jax.random.key(0),
                    full_rank=variant == "adamw_full_rank")
  grads = jax.tree.map(lambda x: 1e-3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                       params)
  state = jax.jit(optimizer.init)(params)

  @jax.jit
  def step_fn(params, state, grads):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  step = jax.jit(step_fn, donate_argnums=(0, 1))

  for _ in range(warmup):
    params, state = step(params, state, grads)
  jax.block_until_ready((params, state))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - start)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  if not finite:
    raise FloatingPointError(f"{variant}/{layout}: non-finite parameters")
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return dict(variant=variant, layout=layout, ms=1e3 * float(np.median(times)),
              ms_min=1e3 * min(times), pairs=len(jax.tree.leaves(params)) // (
                  1 if variant == "adamw_full_rank" else 2),
              state_gib=state_bytes / 2**30)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--variants", default="adamw,lora_pro_project,lora_pro,lora_pro_full,"
                      "adamw_full_rank")
  parser.add_argument("--layouts", default="stacked,flat")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  shape = common.model_shape("tiny" if args.tiny else "1b")
  device = jax.devices()[0]
  rows = []
  for layout in args.layouts.split(","):
    for variant in args.variants.split(","):
      row = time_variant(variant, layout, shape, args.steps, args.warmup)
      row.update(device=getattr(device, "device_kind", str(device)), jax=jax.__version__,
                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lora_pro_update.json"), "w") as f:
      json.dump(rows, f, indent=1)
  base = {r["layout"]: r["ms"] for r in rows if r["variant"] == "adamw"}
  print(f"{'layout':8} {'variant':22} {'ms':>9} {'x adamw':>8} {'state GiB':>9}")
  for r in rows:
    ratio = r["ms"] / base[r["layout"]] if r["layout"] in base else float("nan")
    print(f"{r['layout']:8} {r['variant']:22} {r['ms']:9.3f} {ratio:8.2f} {r['state_gib']:9.3f}")


if __name__ == "__main__":
  main()
