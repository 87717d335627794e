"""Where a training step's GPU time goes: jax.profiler trace of a few steps, summarised as text.

Builds the same step as ``jax_step.py`` (same modes and scales), traces ``--steps`` steps after
warm-up, and prints the GPU time per XLA op (``fusion.N``, ``custom-call`` for cuBLAS / cuDNN, ...)
aggregated over the traced steps, grouped into matrix products, attention, the other fusions and
copies. ``--hlo`` also writes the optimised HLO so that ``fusion.N`` can be read back.

Usage: python benchmarks/profile_step.py --scale 1b --mode lora [--steps 3] [--out DIR] [--hlo]
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax_step  # noqa: E402


def category(name: str, long_name: str) -> str:
  text = (name + " " + long_name).lower()
  if any(word in text for word in ("all-reduce", "all-gather", "reduce-scatter", "nccl",
                                    "collective-permute", "all-to-all")):
    return "collective"
  if "cudnn" in text or "fmha" in text or "flash" in text or "dot_product_attention" in text:
    return "attention"
  if "gemm" in text or "cublas" in text or "dot(" in text or "triton" in text or "nvjet" in text:
    return "matmul"
  if "copy" in text or "transpose" in text or "dynamic-update-slice" in text:
    return "copy/layout"
  if "reduce" in text:
    return "reduction fusion"
  return "elementwise/other"


def summarise(trace_dir: str, steps: int, top: int) -> None:
  from jax.profiler import ProfileData
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  data = ProfileData.from_file(paths[0])
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  planes = planes or [p for p in data.planes if p.name == "/host:CPU"]  # CPU runs (tests)
  for plane in planes:
    lines = list(plane.lines)
    print(f"{plane.name}: lines {[line.name for line in lines]}")
    ops = [line for line in lines if line.name == "XLA Ops"]
    for line in ops or [line for line in lines if line.name != "python"]:
      totals, counts, long_names = collections.Counter(), collections.Counter(), {}
      for event in line.events:
        stats = dict(event.stats)
        totals[event.name] += event.duration_ns
        counts[event.name] += 1
        long_names.setdefault(event.name, str(stats.get("long_name", stats.get("tf_op", ""))))
      grand = sum(totals.values())
      print(f"\n{plane.name} / {line.name}: {grand / 1e6 / steps:.2f} ms of ops per step")
      groups = collections.Counter()
      for name, ns in totals.items():
        groups[category(name, long_names[name])] += ns
      for group, ns in groups.most_common():
        print(f"  {group:20s} {ns / 1e6 / steps:8.2f} ms/step  {ns / grand:6.1%}")
      print(f"  top {top} ops (ms/step, calls/step, share, HLO):")
      for name, ns in totals.most_common(top):
        print(f"  {ns / 1e6 / steps:8.3f} {counts[name] / steps:6.0f} {ns / grand:6.1%}  {name:28s}"
              f" {long_names[name][:150]}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", default="1b", choices=sorted(common.SCALES))
  parser.add_argument("--mode", required=True, choices=jax_step.MODES)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--scan-unroll", type=int, default=0,
                      help="layers per iteration of the layer scan; 0 (default): all (unrolled)")
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--hlo", action="store_true")
  parser.add_argument("--out", default=None)
  parser.add_argument("--fsdp", type=int, default=0,
                      help="as jax_step.py: shard over all devices on a (data, fsdp) mesh with "
                           "this fsdp size (0: one device)")
  args = parser.parse_args(argv)

  from lorapro_jax.train import TrainState, make_train_step
  setup = jax_step.build(args.scale, args.mode, args.remat, jnp.bfloat16, args.scan_unroll)
  config = setup.config
  batch, seq_len = common.SCALES[args.scale]["batch"], common.SCALES[args.scale]["seq_len"]
  batch *= jax.device_count() if args.fsdp else 1   # weak scaling, as jax_step.py
  tokens = jax.random.randint(jax.random.key(2), (batch, seq_len + 1), 0, config.vocab_size)
  data = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  state, base = TrainState.create(setup.trainable, setup.optimizer, jax.random.key(3)), setup.base
  shardings = {}
  if args.fsdp:
    from lorapro_jax.sharding import make_mesh, train_shardings
    shardings = train_shardings(state, base, make_mesh(fsdp=args.fsdp))
    state = jax.device_put(state, shardings["state_sharding"])
    base = jax.device_put(base, shardings["base_sharding"])
    data = jax.device_put(data, shardings["batch_sharding"])
  train_step = make_train_step(jax_step.next_token_loss(setup.model), setup.optimizer,
                               regularizer=setup.regularizer, **shardings)
  if args.hlo and args.out:
    os.makedirs(args.out, exist_ok=True)
    text = train_step.lower(state, base, data).compile().as_text()
    name = f"hlo_{args.scale}_{args.mode}_u{config.scan_unroll}_fsdp{args.fsdp}.txt"
    with open(os.path.join(args.out, name), "w") as f:
      f.write(text)
  for _ in range(3):
    state, metrics = train_step(state, base, data)
  jax.block_until_ready(state)
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir):
    for _ in range(args.steps):
      state, metrics = train_step(state, base, data)
    jax.block_until_ready((state, metrics))
  print(f"== profile {args.scale} {args.mode} remat={args.remat} scan_unroll={config.scan_unroll}"
        f" fsdp={args.fsdp} devices={jax.device_count() if args.fsdp else 1}")
  summarise(trace_dir, args.steps, args.top)


if __name__ == "__main__":
  main()
