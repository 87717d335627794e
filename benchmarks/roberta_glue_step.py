"""A real-size config of the papers on one GPU (issue 6, item 4): RoBERTa-base, GLUE-sized batches.

The DoRA Table 2 recipe's model (``experiments/configs/dora_roberta_glue.py``: RoBERTa-base,
sequence classification, batch 32, SST-2's length 128), built from its config with random weights
(no download), trained on random tokens and labels through the same library path the experiments
use: :func:`lorapro_jax.models.preset` targets and the method's adapters and optimizer chain
from :data:`lorapro_jax.methods.METHODS`, ``make_train_step`` (jitted, state donated, bf16
compute, float32 adapters and optimizer state). One process per method keeps peak memory clean.

Usage: python benchmarks/roberta_glue_step.py --method lora [--steps 20] [--tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorapro_jax.dynamic_rank import DynamicRankConfig
from lorapro_jax.methods import METHODS
from lorapro_jax.models import hf_example_inputs, preset
from lorapro_jax.train import TrainState, make_train_step
from lorapro_jax.trees import count_params

BATCH, LENGTH, RANK = 32, 128, 8


def build(name: str, tiny: bool, batch: int, length: int, total_steps: int):
  """(model, example inputs, frozen base in bf16, trainable, optimizer, regularizer)."""
  from transformers import FlaxRobertaForSequenceClassification, RobertaConfig
  method = METHODS[name]
  sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64) if tiny else {}
  config = RobertaConfig(num_labels=2, max_position_embeddings=length + 4, **sizes)
  hf = FlaxRobertaForSequenceClassification(config, seed=0)
  # pruning from the first step, an event every step: the timed steps prune
  dynamic = (DynamicRankConfig(total_steps=total_steps, target_rank=RANK, warmup_frac=0.0,
                               interval=1) if method.prunes else None)
  lora = method.lora_config(preset("roberta", rank=RANK, alpha=2.0 * RANK,
                                   modules_to_save=("classifier",)), dynamic)
  args, _ = hf_example_inputs(config, batch=batch, seq_len=length)
  model, base, trainable = method.prepare(hf.module, hf.params, lora, jax.random.key(0), *args)
  if base is not None:
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  optimizer = method.optimizer(1e-4, scale=None if lora is None else lora.scales(trainable),
                               dynamic=dynamic)
  return model, args, base, trainable, optimizer, method.regularizer(dynamic)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", required=True, choices=list(METHODS))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="a tiny config, to check on a CPU")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  batch, length = (4, 16) if args.tiny else (BATCH, LENGTH)
  total = args.warmup + args.steps
  model, inputs, base, trainable, optimizer, regularizer = build(
      args.method, args.tiny, batch, length, total_steps=4 * total)

  def loss_fn(params, batch_arrays, rng):
    del rng
    logits = model.apply({"params": params}, *batch_arrays["inputs"]).logits
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch_arrays["labels"])), None

  step = make_train_step(loss_fn, optimizer, compute_dtype=jnp.bfloat16, regularizer=regularizer)
  state = TrainState.create(trainable, optimizer, jax.random.key(1))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 1000, size=(batch, length)).astype(np.int32)
  batch_arrays = {"inputs": (ids,) + tuple(inputs[1:]),
                  "labels": rng.integers(0, 2, size=(batch,)).astype(np.int32)}
  times, losses = [], []
  for index in range(total):
    start = time.perf_counter()
    state, metrics = step(state, base, batch_arrays)
    jax.block_until_ready(state.trainable)
    if index >= args.warmup:
      times.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  median = statistics.median(times)
  result = dict(model="roberta-base" if not args.tiny else "roberta-tiny", method=args.method,
                batch=batch, seq_len=length, ms_per_step=1e3 * median,
                examples_per_s=batch / median, tokens_per_s=batch * length / median,
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                trainable_params=count_params(state.trainable), device=device.device_kind,
                jax=jax.__version__, losses=losses[:3] + losses[-2:],
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  print("RESULT", json.dumps(result))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "roberta_glue.jsonl"), "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
