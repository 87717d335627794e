"""Multi-device correctness on real GPUs (issue 15): every method on a (data, fsdp) mesh equals one device.

For each method of :data:`lorapro_jax.methods.METHODS`, the same model, adapters, optimizer and
global batch are trained for ``--steps`` steps three times: on one device, on a mesh
``(data=N, fsdp=1)`` and on ``(data=1, fsdp=N)`` over all N devices (bf16 compute, the base in
bf16, cuDNN flash attention on GPUs). Both measures are relative to how far training moved, so that
a sharding bug (a gradient of half the batch, a missing reduction) cannot hide under the size of
the pretrained values: the loss curve must match, ``max_t |L_t − L_t^ref| <= loss_tol · max_t
|L_t^ref − L_0^ref|`` (at least bf16's resolution of the loss), and so must the change of the trainable tree,
``‖Δθ − Δθ^ref‖ / ‖Δθ^ref‖ <= update_tol`` with ``Δθ = θ_final − θ_init``. The script prints one table row per
(method, mesh) and exits 1 on any mismatch, compile failure or non-finite loss.

Fake CPU devices cannot stand in for this check: cuDNN attention and its sharding partitioner
exist only on GPUs (the fsdp crash of issue 15 was raised there).

Usage (2 GPUs): NCCL_NVLS_ENABLE=0 python benchmarks/multi_gpu_check.py --scale base [--out DIR]
On CPU (logic only): XLA_FLAGS=--xla_force_host_platform_device_count=2 python
benchmarks/multi_gpu_check.py --scale tiny
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import jax_step  # noqa: E402

from lorapro_jax.methods import METHODS  # noqa: E402
from lorapro_jax.sharding import make_mesh, train_shardings  # noqa: E402
from lorapro_jax.train import TrainState, make_train_step  # noqa: E402


def run(method: str, scale: str, steps: int, mesh_shape: tuple[int, int] | None, batch: dict,
        scan_unroll: int = 0):
  """Losses of ``steps`` steps, the change of the trainable tree (float32 numpy), compile s."""
  setup = jax_step.build(scale, method, remat="none", base_dtype=jnp.bfloat16,
                         scan_unroll=scan_unroll)
  loss_fn = jax_step.next_token_loss(setup.model)
  state, base = TrainState.create(setup.trainable, setup.optimizer, jax.random.key(3)), setup.base
  shardings = {}
  if mesh_shape is not None:
    shardings = train_shardings(state, base, make_mesh(*mesh_shape))
    state = jax.device_put(state, shardings["state_sharding"])
    base = jax.device_put(base, shardings["base_sharding"])
    batch = jax.device_put(batch, shardings["batch_sharding"])
  else:
    state, base, batch = jax.device_put((state, base, batch), jax.devices()[0])
  step = make_train_step(loss_fn, setup.optimizer, regularizer=setup.regularizer,
                         compute_dtype=jnp.bfloat16, **shardings)
  start = time.perf_counter()
  compiled = step.lower(state, base, batch).compile() if hasattr(step, "lower") else step
  compile_s = time.perf_counter() - start
  initial = jax.tree.map(lambda x: np.asarray(x, np.float32), state.trainable)
  losses = []
  for _ in range(steps):
    state, metrics = compiled(state, base, batch)
    losses.append(float(metrics["loss"]))
  update = jax.tree.map(lambda x, x0: np.asarray(x, np.float32) - x0, state.trainable, initial)
  return losses, update, compile_s


def loss_difference(losses, reference) -> float:
  """``max_t |L_t − L_t^ref|`` over how far the reference moved, floored at bf16's resolution of
  the loss (``2^-8·|L_0|``): a run that barely moves (gates at 0) is not judged on noise."""
  movement = max(float(np.max(np.abs(np.subtract(reference, reference[0])))),
                 2.0 ** -8 * abs(reference[0]))
  return float(np.max(np.abs(np.subtract(losses, reference)))) / movement


def relative_distance(tree, reference) -> float:
  diff = sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(tree),
                                                         jax.tree.leaves(reference)))
  norm = sum(float(np.sum(y ** 2)) for y in jax.tree.leaves(reference))
  return float(np.sqrt(diff / max(norm, 1e-30)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", default="base", choices=sorted(common.SCALES))
  parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--lr", type=float, default=1e-3,
                      help="large enough that 5 steps move the loss well beyond bf16 noise")
  parser.add_argument("--loss-tol", type=float, default=0.1,
                      help="loss-curve difference relative to the reference's loss movement")
  parser.add_argument("--update-tol", type=float, default=0.2,
                      help="relative distance of the trainable trees' changes (bf16 reductions "
                           "in another order flip the Adam sign of near-zero gradients)")
  parser.add_argument("--scan-unroll", type=int, default=0,
                      help="layers per iteration of the layer loop; 0: the model's default "
                           "(unrolled), 1: rolled")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  jax_step.LEARNING_RATE = args.lr
  n = jax.device_count()
  if n < 2:
    raise SystemExit(f"needs >= 2 devices, found {n}")
  vocab = common.SCALES[args.scale]["vocab_size"]
  rows, seq_len = common.SCALES[args.scale]["batch"] * n, common.SCALES[args.scale]["seq_len"]
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (rows, seq_len + 1), 0, vocab))
  batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  meshes = {"1 device": None, f"data {n}": (n, 1), f"fsdp {n}": (1, n)}

  rows_out, failed = [], False
  print(f"{jax.devices()[0].device_kind} x {n}, scale {args.scale}, global batch {rows}x{seq_len}, "
        f"{args.steps} steps, layer loop {'rolled' if args.scan_unroll == 1 else 'unrolled'}, "
        f"jax {jax.__version__}", flush=True)
  header = f"{'method':24s} {'mesh':9s} {'compile s':>9s} {'loss diff':>9s} " \
           f"{'update diff':>11s}  result  losses"
  print(header, flush=True)
  for method in args.methods:
    reference = None
    for mesh_name, mesh_shape in meshes.items():
      row = dict(method=method, mesh=mesh_name)
      try:
        losses, update, compile_s = run(method, args.scale, args.steps, mesh_shape, batch,
                                             args.scan_unroll)
      except Exception as error:  # a compile failure is a finding of this check, not a crash
        row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
        print(f"{method:24s} {mesh_name:9s} FAILED {row['error']}", flush=True)
        failed = True
        rows_out.append(row)
        continue
      row.update(losses=losses, compile_s=compile_s)
      ok = bool(np.all(np.isfinite(losses)))
      if reference is None and mesh_shape is None:
        reference = (losses, update)
        dloss = dparams = 0.0
      elif reference is None:
        ok, dloss, dparams = False, float("nan"), float("nan")
      else:
        dloss = loss_difference(losses, reference[0])
        dparams = relative_distance(update, reference[1])
        ok = ok and dloss <= args.loss_tol and dparams <= args.update_tol
      row.update(ok=ok, loss_diff=dloss, update_diff=dparams)
      failed |= not ok
      rows_out.append(row)
      print(f"{method:24s} {mesh_name:9s} {compile_s:9.1f} {dloss:9.2e} {dparams:11.2e}  "
            f"{'ok' if ok else 'MISMATCH':8s}{' '.join(f'{x:.4f}' for x in losses)}", flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "multi_gpu_check.json"), "w") as handle:
      json.dump(dict(devices=n, device=jax.devices()[0].device_kind, scale=args.scale,
                     rows=rows_out), handle, indent=1)
  print("ALL OK" if not failed else "MISMATCH OR FAILURE: see the rows above", flush=True)
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
