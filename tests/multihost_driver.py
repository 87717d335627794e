"""One process of a multi-host training run on CPU: what a TPU-pod script does, on localhost.

``tests/test_multihost.py`` starts this script twice (two processes, two fake CPU devices each,
gloo collectives, one global mesh of four devices) and once alone (one process, four fake
devices), then compares what they write. Every process:

1. joins the cluster with :func:`lorapro_jax.sharding.initialize_distributed` (the environment
   names the coordinator; without it, the script runs as one host);
2. for each run of ``--runs`` (``method:data x fsdp``, e.g. ``lora_pro_full:1x4``), builds a small
   LoRA-injected MLP, places the train state and the frozen base on the global mesh
   (:func:`lorapro_jax.sharding.train_shardings`), and feeds only its own rows of each global batch
   (:func:`lorapro_jax.sharding.mesh_batches`: ``host_shard`` then ``shard_batch``);
3. trains ``STEPS`` steps, saving a :class:`lorapro_jax.checkpoint.TrainCheckpointer` checkpoint
   after step ``SAVE_AT`` and after the last step (every process takes part in each save, as Orbax
   requires on many hosts);
4. restores step ``SAVE_AT`` into a freshly created state and reruns the remaining steps, which
   must give the same losses and the same final adapters bit for bit (checked here, on every
   process);
5. writes ``<out>/process_<i>.json``: the cluster's shape, the losses, the final adapters
   (gathered from all processes) and how much of each LoRA-Pro full-rank moment this process's
   first device holds.

Environment: ``JAX_PLATFORMS=cpu``, ``XLA_FLAGS=--xla_force_host_platform_device_count=<n>``;
for multi-process runs also ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax

# Cross-process collectives on CPU go through gloo (TCP); it must be chosen before the backend
# starts, i.e. before jax.distributed.initialize creates the CPU client.
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import flax.linen as nn  # noqa: E402  (after the configuration above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from lorapro_jax.adapters import dotted  # noqa: E402
from lorapro_jax.checkpoint import TrainCheckpointer  # noqa: E402
from lorapro_jax.inject import init_adapters, inject  # noqa: E402
from lorapro_jax.lora import LoRAConfig  # noqa: E402
from lorapro_jax.lora_pro import LoRAProFullState  # noqa: E402
from lorapro_jax.methods import METHODS  # noqa: E402
from lorapro_jax.models import load_pretrained  # noqa: E402
from lorapro_jax.sharding import (initialize_distributed, make_mesh, mesh_batches, place,  # noqa: E402
                                  train_shardings)
from lorapro_jax.train import TrainState, make_train_step  # noqa: E402
from lorapro_jax.trees import named_leaves  # noqa: E402

STEPS, SAVE_AT, GLOBAL_BATCH, N_FEATURES, N_CLASSES = 5, 3, 16, 8, 4
MIN_SHARD = 64  # small enough that every toy kernel and full-rank moment is split along fsdp
CONFIG = LoRAConfig(rank=2, alpha=4.0, targets=("up", "mid", "down"), init="gaussian")


class MLP(nn.Module):
  """Kernels (8, 32), (32, 16), (16, 4): split on their output, input and input axis."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.gelu(nn.Dense(32, name="up")(x))
    return nn.Dense(N_CLASSES, name="down")(nn.Dense(16, name="mid")(hidden))


def global_batch(index: int) -> dict[str, np.ndarray]:
  """Global batch ``index``: the same on every process, drawn from ``default_rng(index)``."""
  x = np.random.default_rng(index).normal(size=(GLOBAL_BATCH, N_FEATURES)).astype(np.float32)
  return {"x": x, "y": ((x.sum(-1) > 0) + 2 * (x[:, 0] > 0)).astype(np.int32)}


def make_loss(model: nn.Module):
  def loss_fn(params, batch, rng):
    del rng
    log_probs = jax.nn.log_softmax(model.apply({"params": params}, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], 1)), None
  return loss_fn


def parse_runs(text: str) -> list[tuple[str, int, int]]:
  """``"lora:2x2,lora_pro_full:1x4"`` -> ``[("lora", 2, 2), ("lora_pro_full", 1, 4)]``."""
  runs = []
  for item in text.split(","):
    try:
      method, mesh = item.split(":")
      data, fsdp = (int(size) for size in mesh.split("x"))
    except ValueError:
      raise ValueError(f"--runs item {item!r}: expected 'method:DATAxFSDP', e.g. "
                       "'lora_pro_full:1x4'") from None
    METHODS[method]  # noqa: B018  (a KeyError naming the known methods)
    runs.append((method, data, fsdp))
  return runs


def full_rank_moment_fractions(opt_state) -> list[float]:
  """For each 2-D array of LoRA-Pro's full-rank Adam moments, the fraction of its elements that
  this process's first device holds (1 / fsdp when the moment is split along fsdp)."""
  full_states = [leaf for leaf in jax.tree.leaves(
      opt_state, is_leaf=lambda node: isinstance(node, LoRAProFullState))
      if isinstance(leaf, LoRAProFullState)]
  moments = [leaf for state in full_states for leaf in jax.tree.leaves(state.inner)
             if leaf.ndim == 2]
  return [moment.addressable_shards[0].data.size / moment.size for moment in moments]


def host_copy(tree) -> dict[str, list]:
  """Every leaf of a (possibly cross-process) sharded tree as a nested list, by dotted path."""
  gathered = multihost_utils.process_allgather(tree, tiled=True)
  return {dotted(path): np.asarray(leaf).tolist() for path, leaf in named_leaves(gathered)}


def train_run(method_name: str, data: int, fsdp: int, checkpoint_dir: str) -> dict:
  """Trains, checkpoints, restores and retrains one method on a ``data x fsdp`` global mesh."""
  method = METHODS[method_name]
  mesh = make_mesh(data=data, fsdp=fsdp)
  example = global_batch(0)["x"]
  module = MLP()
  params = module.init(jax.random.key(0), example)["params"]
  lora = method.lora_config(CONFIG)
  model, base, trainable = method.prepare(module, params, lora, jax.random.key(1), example)
  # Every factor perturbed, B too (LoRA starts it at zero, where the first updates degenerate).
  trainable = jax.tree.map(lambda t: t + 0.1 * jax.random.normal(jax.random.key(2), t.shape),
                           trainable)
  optimizer = method.optimizer(1e-2, scale=lora.scales(trainable), weight_decay=0.01)

  def fresh_state() -> TrainState:
    return TrainState.create(trainable, optimizer, jax.random.key(3))

  shardings = train_shardings(fresh_state(), base, mesh, min_shard_size=MIN_SHARD)
  base = jax.device_put(base, shardings["base_sharding"])
  train_step = make_train_step(make_loss(model), optimizer, **shardings)

  def run_steps(state: TrainState, first: int, last: int, checkpoints=None):
    """Steps ``first..last`` (1-based; step t eats global batch t); saves after SAVE_AT/last."""
    losses = []
    global_batches = (global_batch(step) for step in range(first, last + 1))
    for step, batch in zip(range(first, last + 1), mesh_batches(global_batches, mesh)):
      state, metrics = train_step(state, base, batch)
      losses.append(float(metrics["loss"]))
      if checkpoints is not None and step in (SAVE_AT, last):
        checkpoints.save(state, data_position={"next_batch": step + 1})
    return state, losses

  state = place(fresh_state(), shardings["state_sharding"])
  moment_fractions = full_rank_moment_fractions(state.opt_state)
  with TrainCheckpointer(checkpoint_dir, lora, keep=2) as checkpoints:
    state, losses = run_steps(state, 1, STEPS, checkpoints)
    final = host_copy(state.trainable)
    checkpoints.wait_until_finished()
    saved_steps = checkpoints.all_steps()

  # Resume as a restarted job would: a new checkpointer, a fresh state as the restore target.
  with TrainCheckpointer(checkpoint_dir, lora, keep=2) as checkpoints:
    target = place(fresh_state(), shardings["state_sharding"])
    restored = checkpoints.restore(target, step=SAVE_AT)
  if int(restored.state.step) != SAVE_AT or restored.data_position != {"next_batch": SAVE_AT + 1}:
    raise AssertionError(f"restored step {int(restored.state.step)} / position "
                         f"{restored.data_position}, expected step {SAVE_AT}")
  resumed_state, resumed_losses = run_steps(restored.state, SAVE_AT + 1, STEPS)
  resumed_final = host_copy(resumed_state.trainable)
  # The same program on the same data and state: identical to the last bit on CPU.
  if resumed_losses != losses[SAVE_AT:]:
    raise AssertionError(f"{method_name}: losses after the restore {resumed_losses} differ from "
                         f"the uninterrupted run's {losses[SAVE_AT:]}")
  if resumed_final != final:
    raise AssertionError(f"{method_name}: adapters after the restore differ from the "
                         "uninterrupted run's")
  return {"method": method_name, "mesh": [data, fsdp], "losses": losses,
          "resumed_losses": resumed_losses, "saved_steps": saved_steps, "final_trainable": final,
          "full_rank_moment_fractions": moment_fractions,
          "mesh_processes": [int(device.process_index) for device in mesh.devices.flat]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for process_<i>.json")
  parser.add_argument("--checkpoints", required=True,
                      help="checkpoint root shared by all processes (one sub-directory per run)")
  parser.add_argument("--runs", default="lora:2x2,lora_pro_full:1x4",
                      help="comma-separated method:DATAxFSDP")
  parser.add_argument("--pretrained", default=None,
                      help="a Hugging Face checkpoint directory to load onto a (1, all) mesh")
  args = parser.parse_args(argv)
  runs = parse_runs(args.runs)

  process_index, process_count = initialize_distributed()
  results = {"process_index": process_index, "process_count": process_count,
             "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
             "runs": []}
  for method_name, data, fsdp in runs:
    directory = os.path.join(args.checkpoints, f"{method_name}_{data}x{fsdp}")
    results["runs"].append(train_run(method_name, data, fsdp, directory))
  if args.pretrained:
    # every process reads the file and places its own shards (on its own CPU first)
    _, params = load_pretrained(args.pretrained, mesh=make_mesh(data=1, fsdp=jax.device_count()))
    # each shard's sum in numpy (a jnp.sum of a global array compiles once per shape)
    results["pretrained_shards"] = {
        dotted(path): [[str(shard.index), float(np.sum(np.asarray(shard.data, np.float32)))]
                       for shard in leaf.addressable_shards]
        for path, leaf in named_leaves(params)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"process_{process_index}.json"), "w",
            encoding="utf-8") as handle:
    json.dump(results, handle)
  # Nobody leaves before everyone has written: the coordinator (process 0) must outlive the rest.
  multihost_utils.sync_global_devices("multihost_driver done")
  return 0


if __name__ == "__main__":
  sys.exit(main())
