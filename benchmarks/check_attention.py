"""On the GPU: the model with cuDNN flash attention against the XLA attention and a float32 run.

Prints the relative errors of the bf16 logits (cuDNN, XLA) against float32 XLA logits on random
weights and tokens; exits non-zero above 2e-2 (bf16 operands land between 1e-3 and 1e-2).
"""
import sys

import jax
import jax.numpy as jnp

from lorapro_jax.models.decoder import DecoderConfig, DecoderForCausalLM

shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
             num_kv_heads=2)
tokens = jax.random.randint(jax.random.key(0), (2, 256), 0, shape["vocab_size"])
params = DecoderForCausalLM(DecoderConfig(**shape)).init(jax.random.key(1), tokens)["params"]
reference = DecoderForCausalLM(DecoderConfig(**shape, dtype=jnp.float32, attention="xla")).apply(
    {"params": params}, tokens)
worst = 0.0
for impl in ("cudnn", "xla"):
  logits = DecoderForCausalLM(DecoderConfig(**shape, attention=impl)).apply({"params": params},
                                                                             tokens)
  err = float(jnp.linalg.norm(logits.astype(jnp.float32) - reference) / jnp.linalg.norm(reference))
  worst = max(worst, err)
  print(f"attention={impl}: relative error of bf16 logits vs float32 = {err:.2e}")
sys.exit(0 if worst < 2e-2 else 1)
