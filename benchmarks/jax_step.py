"""One training-step measurement of lorapro_jax per process (issue 9).

The model is :mod:`lorapro_jax.models.decoder` (scanned layers, cuDNN flash attention, bf16 matrix
products on float32 parameters) at a scale of ``benchmarks/common.py``, trained on random tokens
with the library's own :func:`lorapro_jax.train.make_train_step` (jitted, state donated):

``--mode`` is a method of :data:`lorapro_jax.methods.METHODS` (its adapters and optimizer chain,
without clipping) or a control:

* ``full``: every parameter trained, ``optax.adamw`` (float32 moments);
* ``lora`` / ``rslora``: LoRA r=8 alpha=16 on the seven linear layers of every block through
  :func:`lorapro_jax.inject.inject`, frozen base stored in bf16, ``optax.adamw`` on the adapters;
* ``lora_pro`` / ``lora_pro_full``: the same adapters, :func:`lorapro_jax.lora_pro.lora_pro` /
  :func:`lorapro_jax.lora_pro.lora_pro_full`;
* ``dynamic_rank`` / ``lora_pro_dynamic_rank``: gated adapters of initial rank ceil(1.5 r) = 12,
  AdamW / LoRA-Pro followed by :func:`lorapro_jax.dynamic_rank.dynamic_rank` toward r = 8 and
  the DEM penalty (measured inside the pruning phase);
* controls ``lora_r12`` / ``lora_r12_gated``: plain AdamW on the rank-12 adapters (without / with
  gates) that dynamic rank starts from, to separate the transform's cost from the larger rank's.

Usage: python benchmarks/jax_step.py --scale 1b --mode lora [--steps 10] [--out DIR] [--breakdown]
       [--fsdp N]
``--fsdp N`` trains on a (data, fsdp) mesh over all devices (:mod:`lorapro_jax.sharding`: base
and full-rank optimizer state split along fsdp, adapters like their kernels, rows along both
axes) with the scale's batch per device (weak scaling); the numbers stay per device, and
``global_tokens_per_s`` and the largest per-device peak memory are added.
``--breakdown`` also times the gradient alone (loss + backward, no optimizer), so that the
optimizer's share of the step is the difference.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from lorapro_jax.dynamic_rank import DynamicRankConfig  # noqa: E402
from lorapro_jax.lora import LoRAConfig  # noqa: E402
from lorapro_jax.methods import METHODS, Method  # noqa: E402
from lorapro_jax.models.decoder import DecoderConfig, DecoderForCausalLM  # noqa: E402

# control -> gated: method "lora" on the adapters that dynamic rank starts from
CONTROLS = {"lora_r12": False, "lora_r12_gated": True}
MODES = tuple(METHODS) + tuple(CONTROLS)
LEARNING_RATE = 1e-4
# Dynamic-rank schedule: T steps, pruning between 0.15 T and 0.5 T; the benchmark starts its timed
# steps inside the pruning phase so that scores, masks and events are all live.
DYNAMIC = DynamicRankConfig(total_steps=40, target_rank=common.LORA_RANK, dem_weight=0.1)
DYNRANK_START_STEP = 8


class Setup(NamedTuple):
  method: Method  # of the table ("lora" for the controls)
  model: Any
  base: Any
  trainable: Any
  optimizer: optax.GradientTransformation
  regularizer: Any  # the train step's regularizer (dynamic rank's DEM) or None
  config: DecoderConfig
  rank: int | None  # adapter rank (None: full fine-tuning)


def next_token_loss(model):
  def loss_fn(params, batch, rng):
    del rng
    logits = model.apply({"params": params}, batch["inputs"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["labels"])
    return jnp.mean(loss), None
  return loss_fn


def perturb_lora_b(trainable, key):
  """B = 0 at init is a degenerate point for LoRA-Pro's Grams; time on generic factors."""
  from lorapro_jax.adapters import adapter_paths, map_adapters
  index = {path: i for i, path in enumerate(adapter_paths(trainable))}

  def node(path, n):
    k = jax.random.fold_in(key, index[path])
    return {**n, "lora_b": 1e-3 * jax.random.normal(k, n["lora_b"].shape, n["lora_b"].dtype)}
  return map_adapters(node, trainable)


def build(scale: str, mode: str, remat: str, base_dtype, scan_unroll: int = 0) -> Setup:
  shape = common.model_shape(scale)
  config = DecoderConfig(**shape, remat=remat, scan_unroll=scan_unroll or shape["num_layers"])
  model = DecoderForCausalLM(config)
  batch, seq_len = common.SCALES[scale]["batch"], common.SCALES[scale]["seq_len"]
  example = jnp.zeros((batch, seq_len), jnp.int32)
  key = jax.random.key(0)
  method = METHODS["lora" if mode in CONTROLS else mode]
  if not method.adapters:
    params = jax.jit(model.init)(key, example)["params"]
    return Setup(method, model, None, params, method.optimizer(LEARNING_RATE, clip_norm=None),
                 None, config, None)

  dynamic = DYNAMIC if method.prunes else None

  from lorapro_jax.inject import inject
  from lorapro_jax.trees import split
  lora = LoRAConfig(rank=common.LORA_RANK, alpha=common.LORA_ALPHA, targets=common.TARGETS)
  if mode in CONTROLS:
    lora = dataclasses.replace(DYNAMIC.lora_config(lora), gated=CONTROLS[mode])
  else:
    lora = method.lora_config(lora, dynamic)
  lora_model = inject(model, lora)

  @jax.jit
  def init(key):
    params = lora_model.init(key, example)["params"]
    base, trainable = split(params, lora)
    base = jax.tree.map(lambda x: x.astype(base_dtype), base)
    return base, trainable

  base, trainable = init(key)
  if not lora.gated:
    trainable = perturb_lora_b(trainable, jax.random.key(1))
  optimizer = method.optimizer(LEARNING_RATE, scale=lora.scales(trainable), clip_norm=None,
                               dynamic=dynamic)
  return Setup(method, lora_model, base, trainable, optimizer, method.regularizer(dynamic),
               config, lora.rank)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", default="1b", choices=sorted(common.SCALES))
  parser.add_argument("--mode", required=True, choices=MODES)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--scan-unroll", type=int, default=0,
                      help="layers per iteration of the layer scan; 0 (default): all (unrolled)")
  parser.add_argument("--base-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--breakdown", action="store_true")
  parser.add_argument("--out", default=None)
  parser.add_argument("--fsdp", type=int, default=0,
                      help="shard over all devices on a (data, fsdp) mesh with this fsdp size "
                           "(0: one device)")
  args = parser.parse_args(argv)

  from lorapro_jax.train import TrainState, make_train_step
  from lorapro_jax.trees import count_params
  setup = build(args.scale, args.mode, args.remat, jnp.dtype(args.base_dtype), args.scan_unroll)
  model, optimizer, config = setup.model, setup.optimizer, setup.config
  batch, seq_len = common.SCALES[args.scale]["batch"], common.SCALES[args.scale]["seq_len"]
  devices = jax.device_count() if args.fsdp else 1
  batch *= devices
  tokens = jax.random.randint(jax.random.key(2), (batch, seq_len + 1), 0, config.vocab_size)
  data = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  loss_fn = next_token_loss(model)
  state, base = TrainState.create(setup.trainable, optimizer, jax.random.key(3)), setup.base
  shardings = {}
  if args.fsdp:
    from lorapro_jax.sharding import make_mesh, train_shardings
    mesh = make_mesh(fsdp=args.fsdp)
    shardings = train_shardings(state, base, mesh)
    state = jax.device_put(state, shardings["state_sharding"])
    base = jax.device_put(base, shardings["base_sharding"])
    data = jax.device_put(data, shardings["batch_sharding"])
  train_step = make_train_step(loss_fn, optimizer, regularizer=setup.regularizer, **shardings)

  losses = []
  warmup = args.warmup
  if setup.method.prunes:  # time inside the pruning phase
    warmup = max(warmup, DYNRANK_START_STEP)
  for _ in range(warmup):
    state, metrics = train_step(state, base, data)
    losses.append(float(metrics["loss"]))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = train_step(state, base, data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  losses.append(float(metrics["loss"]))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"non-finite loss in {args.mode}: {losses}")

  extra = {}
  if args.breakdown:
    from lorapro_jax.train import combine_params

    @jax.jit
    def grad_only(state, base, data):
      def objective(trainable):
        return loss_fn(combine_params(base, trainable), data, None)[0]
      return jax.grad(objective)(state.trainable)
    for _ in range(2):
      jax.block_until_ready(grad_only(state, base, data))
    grad_times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(grad_only(state, base, data))
      grad_times.append(time.perf_counter() - start)
    extra["grad_only_ms"] = 1e3 * float(np.median(grad_times))

  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if args.fsdp:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices()]
    stats = {"peak_bytes_in_use": max(peaks)}
    extra.update(devices=devices, mesh=dict(mesh.shape))
  trainable_count = count_params(state.trainable)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  result = common.summarize(
      times, scale=args.scale, train_base=not setup.method.adapters,
      device_name=getattr(device, "device_kind", str(device)),
      peak_bytes=stats.get("peak_bytes_in_use"), framework="jax", mode=args.mode,
      remat=args.remat, scan_unroll=config.scan_unroll, xla_flags=os.environ.get("XLA_FLAGS", ""),
      base_dtype=args.base_dtype if setup.method.adapters else "float32",
      rank=setup.rank, trainable_params=trainable_count,
      opt_state_gib=opt_bytes / 2**30, losses=losses,
      versions=dict(jax=jax.__version__), **extra)
  if args.fsdp:
    result["global_tokens_per_s"] = result["tokens_per_s"] * devices
  common.write_result(result, args.out)


if __name__ == "__main__":
  main()
