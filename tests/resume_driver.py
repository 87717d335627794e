"""A tiny LoRA training run that checkpoints every few steps and resumes from the newest
committed step: the subprocess that ``tests/test_checkpoint.py`` kills with SIGKILL.

Model: two frozen kernels (the base, passed to the step apart from the state) with gated LoRA
pairs, a squared loss on a deterministic stream of batches (batch t is drawn from
``default_rng(t)``), input dropout drawn from the state's rng key, so that the step, the key, the
data position and every moment must come back exactly. Optimizer: LoRA-Pro's full-rank AdamW
(``lora_pro_full``) followed by dynamic rank (EMA scores, masks). Train step:
``lorapro_jax.train.make_train_step`` (jit, donated state).

Prints one line per event (``step t``, ``save t``, ``done``) so the parent can kill it (or stop
it) at chosen points. ``--kill-after-save t`` makes the process SIGKILL itself after the
asynchronous save of step t was started, as soon as Orbax's temporary directory for it appears
(mid-write). At the end the final state is written to ``--out`` (safetensors, keys = leaf paths).
"""
import argparse
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorapro_jax.adapters import dotted
from lorapro_jax.checkpoint import TrainCheckpointer
from lorapro_jax.dynamic_rank import DynamicRankConfig, dynamic_rank
from lorapro_jax.lora_pro import lora_pro_full
from lorapro_jax.train import TrainState, make_train_step
from lorapro_jax.trees import named_leaves

N_IN, HIDDEN, N_OUT, RANK, TARGET_RANK, BATCH = 12, 10, 6, 3, 2, 8
CONFIG = {"rank": RANK, "alpha": 6.0, "note": "resume driver"}
SCALE = CONFIG["alpha"] / RANK


def frozen_base():
  rng = np.random.default_rng(1234)
  return {"w1": {"kernel": jnp.asarray(rng.normal(size=(N_IN, HIDDEN)) / np.sqrt(N_IN),
                                       jnp.float32)},
          "w2": {"kernel": jnp.asarray(rng.normal(size=(HIDDEN, N_OUT)) / np.sqrt(HIDDEN),
                                       jnp.float32)}}


def initial_adapters():
  rng = np.random.default_rng(99)
  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)
  return {"w1": {"lora_a": normal(N_IN, RANK), "lora_b": normal(RANK, HIDDEN),
                 "lora_c": normal(RANK)},
          "w2": {"lora_a": normal(HIDDEN, RANK), "lora_b": normal(RANK, N_OUT),
                 "lora_c": normal(RANK)}}


def batch_at(index):
  rng = np.random.default_rng(index)
  x = rng.normal(size=(BATCH, N_IN)).astype(np.float32)
  return {"x": x, "y": np.tanh(x[:, :N_OUT] * 2.0 + 0.5).astype(np.float32)}


def kernel(node):
  return node["kernel"] + SCALE * (node["lora_a"] * node["lora_c"]) @ node["lora_b"]


def loss_fn(params, batch, rng):
  keep = jax.random.bernoulli(rng, 0.9, batch["x"].shape)
  x = jnp.where(keep, batch["x"] / 0.9, 0.0)
  prediction = jnp.tanh(x @ kernel(params["w1"])) @ kernel(params["w2"])
  return jnp.mean((prediction - batch["y"]) ** 2), None


def make_optimizer(total_steps):
  optimizer = lora_pro_full(optax.cosine_decay_schedule(3e-2, total_steps), SCALE,
                            weight_decay=0.01)
  pruning = DynamicRankConfig(total_steps=total_steps, target_rank=TARGET_RANK, interval=2)
  return optax.chain(optimizer, dynamic_rank(pruning))


def _kill_once_writing(directory, step):
  """SIGKILLs this process as soon as Orbax's temporary directory of ``step`` exists, i.e. in
  the middle of the asynchronous write (the rename that commits it comes last)."""
  for _ in range(20000):
    if any(name.startswith(f"{step}.") for name in os.listdir(directory)):
      break
    time.sleep(0.0001)
  os.kill(os.getpid(), signal.SIGKILL)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--save-every", type=int, default=3)
  parser.add_argument("--kill-after-save", type=int, default=-1)
  args = parser.parse_args()

  optimizer = make_optimizer(args.steps)
  train_step = make_train_step(loss_fn, optimizer, donate=True)
  base = frozen_base()
  state = TrainState.create(initial_adapters(), optimizer, jax.random.key(7))
  position = 0
  checkpoints = TrainCheckpointer(args.dir, CONFIG, keep=2, async_save=True,
                                  save_interval_steps=args.save_every)
  if checkpoints.latest_step() is not None:
    restored = checkpoints.restore(state)
    state, position = restored.state, restored.data_position["next_batch"]
    print(f"resumed {restored.step}", flush=True)
  while int(state.step) < args.steps:
    state, _ = train_step(state, base, batch_at(position))
    position += 1
    step = int(state.step)
    print(f"step {step}", flush=True)
    if checkpoints.save(state, data_position={"next_batch": position}):
      print(f"save {step}", flush=True)
      if step == args.kill_after_save:
        _kill_once_writing(args.dir, step)
  checkpoints.close()

  from safetensors.numpy import save_file
  final = {dotted(path): np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.prng_key) else leaf) for path, leaf in named_leaves(state)}
  save_file(final, args.out)
  print("done", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
