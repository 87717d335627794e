"""A LoRA step against a full fine-tuning step of a small BERT on the CPU (docs/foundation.md).

Random BERT (hidden 512, 2 layers, 8 heads, intermediate 2048), batch 8 x 128 tokens,
``optax.adamw``, the BERT preset at r = 8, both steps jitted; the median of ``--steps`` steps
after ``--warmup``, the two steps interleaved so that load from other processes hits both alike.
Also prints XLA's FLOP count of each compiled step (the kernel gradients ``xᵀ·dy`` are what LoRA
drops; the adapters' own products are rank-8 thin).

Usage: python benchmarks/lora_vs_full_cpu.py [--steps 10] [--warmup 2]   (pin with taskset -c 1
for the single-core row)
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

from lorapro_jax import combine, init_adapters, inject
from lorapro_jax.models import hf_example_inputs, preset


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  args = parser.parse_args(argv)
  hf = transformers.FlaxBertModel(transformers.BertConfig(
      vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=8, intermediate_size=4 * args.hidden), seed=0)
  inputs, _ = hf_example_inputs(hf.config, batch=args.batch, seq_len=args.seq_len)
  model = inject(hf.module, preset("bert", rank=8))
  base = hf.params
  trainable = init_adapters(model, base, jax.random.key(0), *inputs)
  opt = optax.adamw(1e-4)

  @jax.jit
  def full_step(params, state):
    grads = jax.grad(lambda p: jnp.mean(hf.module.apply({"params": p}, *inputs)[0] ** 2))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def lora_step(trainable, state, base):
    grads = jax.grad(lambda t: jnp.mean(
        model.apply({"params": combine(base, t)}, *inputs)[0] ** 2))(trainable)
    updates, state = opt.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state

  full_args, lora_args = (base, opt.init(base)), (trainable, opt.init(trainable), base)
  flops = {name: step.lower(*step_args).compile().cost_analysis()["flops"]
           for name, step, step_args in (("full", full_step, full_args),
                                         ("lora", lora_step, lora_args))}
  times = {"full": [], "lora": []}
  for _ in range(args.warmup + args.steps):
    start = time.perf_counter()
    full_args = jax.block_until_ready(full_step(*full_args))
    times["full"].append(time.perf_counter() - start)
    start = time.perf_counter()
    lora_args = (*jax.block_until_ready(lora_step(*lora_args)), base)
    times["lora"].append(time.perf_counter() - start)
  ms = {name: 1e3 * float(np.median(t[args.warmup:])) for name, t in times.items()}
  print(f"full fine-tuning {ms['full']:.0f} ms, LoRA {ms['lora']:.0f} ms a step: LoRA / full "
        f"{ms['lora'] / ms['full']:.2f}; XLA FLOPs {flops['full']:.3g} against {flops['lora']:.3g}")
  return dict(ms=ms, flops=flops)


if __name__ == "__main__":
  main()
