"""Shared pieces of the benchmarks: model shapes, FLOP counting, timing statistics, JSON output.

Kept free of jax and torch imports so that each framework's process loads only its own.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

# The scales: issue 9's "1b" (TinyLlama-1.1B's shape) and "base" (a Llama-style decoder at
# T5-base's width and depth: hidden 768, 12 layers, 12 heads, SwiGLU 2048), issue 16's "7b".
SCALES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
               num_heads=32, num_kv_heads=4, batch=8, seq_len=1024),
    "base": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                 num_heads=12, num_kv_heads=12, batch=32, seq_len=128),
    # LLaMA-2-7B's shape (issue 16, must-show 4) at 4 rows of 1024 for every mode: LoRA-Pro full
    # with its float32 moments peaks at 85 GiB of an H200's 139 (LoRA at 37).
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, batch=4, seq_len=1024),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                 num_heads=4, num_kv_heads=2, batch=2, seq_len=32),
}

LORA_RANK = 8
LORA_ALPHA = 16.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def model_shape(scale: str) -> dict:
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
  return {k: v for k, v in SCALES[scale].items() if k not in ("batch", "seq_len")}


def matmul_params(shape: dict) -> int:
  """Parameters in matrix products per token: layers + LM head (not the embedding lookup)."""
  h, f = shape["hidden_size"], shape["intermediate_size"]
  d = h // shape["num_heads"]
  attention = h * d * (2 * shape["num_heads"] + 2 * shape["num_kv_heads"])
  return shape["num_layers"] * (attention + 3 * h * f) + h * shape["vocab_size"]


def flops_per_token(shape: dict, seq_len: int, train_base: bool) -> float:
  """6N (full fine-tuning) or 4N (frozen base) + causal attention forward and backward.

  Same count as ``lorapro_jax.models.decoder.flops_per_token``: attention forward is
  ``2 * 2 * T * hidden / 2`` per layer and token (QK^T and PV, causal half), times 3 for the
  backward pass. Rank-r adapters (< 1% of the work) and remat recomputation are not counted.
  """
  attention = 3 * shape["num_layers"] * 2 * seq_len * shape["hidden_size"]
  return (6 if train_base else 4) * matmul_params(shape) + attention


def device_peak(name: str) -> float | None:
  for key, peak in PEAK_FLOPS.items():
    if key in name:
      return peak
  return None


def summarize(step_seconds: list[float], *, scale: str, train_base: bool, device_name: str,
              peak_bytes: int | None, **extra) -> dict:
  """ms/step (median of timed steps), tokens/s, model FLOP/s and MFU."""
  batch, seq_len = SCALES[scale]["batch"], SCALES[scale]["seq_len"]
  median = statistics.median(step_seconds)
  tokens = batch * seq_len
  flops = flops_per_token(model_shape(scale), seq_len, train_base) * tokens / median
  peak = device_peak(device_name)
  return dict(
      scale=scale, batch=batch, seq_len=seq_len, ms_per_step=1e3 * median,
      ms_min=1e3 * min(step_seconds), ms_max=1e3 * max(step_seconds), timed_steps=len(step_seconds),
      tokens_per_s=tokens / median, model_tflops=flops / 1e12,
      mfu=None if peak is None else flops / peak, peak_flops_assumed=peak,
      peak_gib=None if peak_bytes is None else peak_bytes / 2**30, device=device_name,
      host=platform.node(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **extra)


def write_result(result: dict, out_dir: str | None) -> None:
  line = json.dumps(result)
  print("RESULT " + line, flush=True)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
      f.write(line + "\n")
