"""LLaMA-2-7B on the LLM road, from a checkpoint on disk (issue 14, must-show 5).

One process, phases in increasing order of device memory, so that the running peak after each
training phase is that phase's own:

1. **write**: a LLaMA-2-7B-shaped model (vocab 32000, hidden 4096, SwiGLU 11008, 32 layers, 32
   heads, untied head; 6.74e9 parameters) with random bf16 weights, initialised on the device and
   written by :func:`lorapro_jax.models.save_pretrained` in the Hugging Face layout (PyTorch names,
   ``(out, in)`` weights, 5 GB shards + index) to ``--workdir``;
2. **load**: :func:`lorapro_jax.models.load_pretrained` of that directory in bf16 (the files were
   just written, so they come from the page cache: this times parsing, transposes and transfers,
   not the disk);
3. **train**: the fine-tuning road's own step (:func:`lorapro_jax.finetune.causal_lm_loss`,
   :func:`lorapro_jax.train.make_train_step`, bf16 compute, gradient clipping) for ``lora`` and
   ``lora_pro_full`` (r 8, alpha 16 on the seven projections, B perturbed to 1e-3·N(0, 1) so that
   LoRA-Pro does not time its B = 0 special case) at ``--seq`` tokens and ``--batch`` rows
   (halved until it fits): compile time (ahead of time, ``lower().compile()``), median step time
   over ``--steps`` steps after two warm-up steps, tokens/s, peak device memory;
4. **decode**: greedy decoding of ``--decode-batch`` left-padded prompts of up to ``--prompt``
   tokens, ``--new`` new tokens, with the LoRA adapters injected:
   :func:`lorapro_jax.models.generate` (KV cache) against a jitted loop that reruns the whole
   sequence for every token (no cache); both after a first, compiling call.

Prints a table and writes the JSON to ``--out``. ``--tiny`` runs the same at a tiny size (on a
CPU in a few seconds); ``--fsdp N`` spreads base, optimizer state and batch over a ``(data,
fsdp)`` mesh of all devices (batch per device as given).

  python benchmarks/llm_7b.py --out benchmarks/results/llm_7b_h200.json     # one H200, ~6 min
  python benchmarks/llm_7b.py --tiny --out /tmp/llm_tiny.json               # CPU check
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lorapro_jax.finetune import causal_lm_loss  # noqa: E402
from lorapro_jax.methods import METHODS  # noqa: E402
from lorapro_jax.models import (DecoderConfig, DecoderForCausalLM, generate,  # noqa: E402
                                load_pretrained, preset, save_pretrained)
from lorapro_jax.schedules import make_schedule  # noqa: E402
from lorapro_jax.train import TrainState, make_train_step  # noqa: E402
from lorapro_jax.trees import combine, count_params  # noqa: E402

LLAMA2_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
TINY = {**LLAMA2_7B, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}
METHOD_NAMES = ("lora", "lora_pro_full")


def peak_gib() -> float | None:
  """Largest running peak of device memory over the devices (None where unreported: CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()]
  return None if None in peaks else max(peaks) / 2**30


def timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def write_checkpoint(hf_config: dict, directory: str) -> dict:
  model = DecoderForCausalLM(DecoderConfig.from_hf(hf_config))
  start = time.perf_counter()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  jax.block_until_ready(params)
  init_s = time.perf_counter() - start
  start = time.perf_counter()
  save_pretrained(model, params, directory)
  write_s = time.perf_counter() - start
  size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
  return {"params": count_params(params), "init_s": init_s, "write_s": write_s,
          "gib_on_disk": size / 2**30, "files": sorted(os.listdir(directory))}


def perturbed(trainable, key):
  """Adapters with B = 1e-3·N(0, 1) (LoRA's B = 0 is a special case for LoRA-Pro's Grams)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(trainable)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      1e-3 * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == "lora_b" else x
      for (path, x), k in zip(leaves, keys)])


def train_phase(name: str, model, base, batch: int, seq: int, steps: int, mesh):
  """``(result, adapted model, trained adapters)``: ``name``'s step compiled and timed, the batch
  halved until it fits in device memory."""
  method = METHODS[name]
  lora = method.lora_config(preset(model.config.family, rank=8, alpha=16.0))
  adapted, base, trainable = method.prepare(model, base, lora, jax.random.key(1),
                                            jnp.zeros((1, 8), jnp.int32))
  trainable = perturbed(trainable, jax.random.key(2))
  optimizer = method.optimizer(make_schedule("constant", 1e-4, 1000), scale=lora.scales(trainable))
  placement = {}
  if mesh is not None:
    from lorapro_jax.sharding import batch_sharding, param_shardings, state_shardings
    placement = {"state_sharding": state_shardings(
                     TrainState.create(trainable, optimizer, jax.random.key(3)), base, mesh),
                 "base_sharding": param_shardings(base, mesh),
                 "batch_sharding": batch_sharding(mesh)}
  rows_per_batch = batch * (1 if mesh is None else mesh.size)
  step = make_train_step(causal_lm_loss(adapted), optimizer, compute_dtype=jnp.bfloat16,
                         **placement)
  state = None
  while True:
    # a fresh state per attempt (a step that ran out of memory may have consumed the donated
    # one); the old one is dropped first: LoRA-Pro full's moments alone are 52 GB at 7B
    state = None
    gc.collect()
    state = TrainState.create(trainable, optimizer, jax.random.key(3))
    if mesh is not None:
      state = jax.device_put(state, placement["state_sharding"])
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (rows_per_batch, seq))
    data = {"input_ids": tokens.astype(np.int32), "loss_mask": np.ones((rows_per_batch, seq),
                                                                       np.float32)}
    if mesh is not None:
      from lorapro_jax.sharding import shard_batch
      data = shard_batch(data, mesh)
    try:
      start = time.perf_counter()
      compiled = step.lower(state, base, data).compile()
      compile_s = time.perf_counter() - start
      losses = []
      for _ in range(2):
        state, metrics = compiled(state, base, data)
        losses.append(float(metrics["loss"]))
      break
    except Exception as error:  # noqa: BLE001 (XLA raises its runtime error type for OOM)
      if "RESOURCE_EXHAUSTED" not in str(error) or rows_per_batch == 1:
        raise
      print(f"{name}: batch {rows_per_batch} x {seq} does not fit; halving", flush=True)
      rows_per_batch //= 2
      batch = max(batch // 2, 1)
      gc.collect()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, base, data)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"{name}: non-finite loss {losses}")
  median = statistics.median(times)
  memory = compiled.memory_analysis()
  result = {"method": name, "batch": rows_per_batch, "seq": seq, "compile_s": compile_s,
            "ms_per_step": 1e3 * median, "tokens_per_s": rows_per_batch * seq / median,
            "step_ms_all": [1e3 * t for t in times], "losses": losses,
            "trainable_params": count_params(state.trainable),
            "opt_state_gib": sum(x.size * x.dtype.itemsize
                                 for x in jax.tree.leaves(state.opt_state)) / 2**30,
            # the compiled step's own footprint per device: inputs + outputs (less the donated
            # buffers they share) + temporaries; peak_gib also counts TrainState.create's copies
            "step_gib_per_device": None if memory is None else (
                memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 2**30,
            "peak_gib": peak_gib()}
  return result, adapted, state.trainable


def no_cache_greedy(model, params, ids, mask, new: int):
  """Greedy decoding without a cache: every token reruns the whole fixed-size sequence."""
  batch, length = ids.shape
  ids = jnp.concatenate([ids, jnp.zeros((batch, new), ids.dtype)], axis=1)
  mask = jnp.concatenate([mask, jnp.zeros((batch, new), mask.dtype)], axis=1)

  def step(t, carry):
    ids, mask = carry
    logits = model.apply({"params": params}, ids, mask)
    token = jnp.argmax(logits[:, length + t - 1], axis=-1).astype(ids.dtype)
    return ids.at[:, length + t].set(token), mask.at[:, length + t].set(1)

  ids, _ = jax.lax.fori_loop(0, new, step, (ids, mask))
  return ids[:, length:]


def decode_phase(adapted, params, batch: int, prompt: int, new: int) -> dict:
  rng = np.random.default_rng(1)
  lengths = rng.integers(prompt // 2, prompt + 1, batch)
  ids = np.zeros((batch, prompt), np.int32)
  mask = np.zeros((batch, prompt), np.int32)
  for row, length in enumerate(lengths):
    ids[row, prompt - length:] = rng.integers(3, adapted.module.config.vocab_size, length)
    mask[row, prompt - length:] = 1
  # prompt is a multiple of generate's bucket (64) in the real run: both loops see one shape
  cached = functools.partial(generate, adapted, params, attention_mask=mask, max_new_tokens=new,
                             bucket=prompt)
  _, cached_first_s = timed(cached, ids)
  cached_tokens, cached_s = timed(cached, ids)
  loop = jax.jit(functools.partial(no_cache_greedy, adapted), static_argnums=3)
  _, loop_first_s = timed(loop, params, ids, mask, new)
  loop_tokens, loop_s = timed(loop, params, ids, mask, new)
  return {"batch": batch, "prompt": prompt, "new_tokens": new,
          "kv_cache": {"first_call_s": cached_first_s, "s": cached_s,
                       "tokens_per_s": batch * new / cached_s},
          "no_cache": {"first_call_s": loop_first_s, "s": loop_s,
                       "tokens_per_s": batch * new / loop_s},
          "speedup": loop_s / cached_s,
          # bf16 ties can flip an argmax between the two orders of summation
          "same_tokens_fraction": float(np.mean(np.asarray(cached_tokens) ==
                                                np.asarray(loop_tokens))),
          "peak_gib": peak_gib()}


def table(report: dict) -> str:
  lines = [f"device: {report['device']} x{report['device_count']}, jax {report['jax']}",
           f"write: {report['write']['params']:,} params, {report['write']['gib_on_disk']:.2f} "
           f"GiB in {report['write']['write_s']:.1f} s ({len(report['write']['files'])} files); "
           f"load_pretrained: {report['load_s']:.1f} s",
           "", "| method | batch x seq | compile s | ms/step | tokens/s | peak GiB | step GiB |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in report["train"]:
    peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    lines.append(f"| {r['method']} | {r['batch']} x {r['seq']} | {r['compile_s']:.1f} | "
                 f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {peak} | "
                 f"{r['step_gib_per_device']:.1f} |")
  d = report["decode"]
  lines += ["", f"greedy decoding, batch {d['batch']}, prompts <= {d['prompt']}, "
                f"{d['new_tokens']} new tokens (LoRA injected):",
            "| loop | s | new tokens/s | first call s |", "|---|---:|---:|---:|"]
  for name in ("kv_cache", "no_cache"):
    lines.append(f"| {name} | {d[name]['s']:.2f} | {d[name]['tokens_per_s']:,.0f} | "
                 f"{d[name]['first_call_s']:.1f} |")
  lines.append(f"KV cache speed-up {d['speedup']:.1f}x; same tokens "
               f"{100 * d['same_tokens_fraction']:.1f}%")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check)")
  parser.add_argument("--batch", type=int, help="training rows per device (default 4; tiny 2)")
  parser.add_argument("--seq", type=int, help="training tokens per row (default 1024; tiny 32)")
  parser.add_argument("--steps", type=int, default=5, help="timed training steps per method")
  parser.add_argument("--decode-batch", type=int, help="default 32 (tiny 4)")
  parser.add_argument("--prompt", type=int, help="prompt slots (default 128; tiny 16)")
  parser.add_argument("--new", type=int, help="new tokens (default 128; tiny 8)")
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"),
                      help="what the backward pass keeps of each layer (DecoderConfig.remat)")
  parser.add_argument("--fsdp", type=int, default=0, help="(data, fsdp) mesh over all devices")
  parser.add_argument("--workdir", help="where the checkpoint goes (default: a temporary folder, "
                      "removed at the end)")
  parser.add_argument("--out", help="JSON report path")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)  # compile_s: compilation, not a read
  tiny = args.tiny
  batch = args.batch or (2 if tiny else 4)
  seq = args.seq or (32 if tiny else 1024)
  decode_batch = args.decode_batch or (4 if tiny else 32)
  prompt, new = args.prompt or (16 if tiny else 128), args.new or (8 if tiny else 128)
  workdir = args.workdir or tempfile.mkdtemp(prefix="llm_7b_")
  directory = os.path.join(workdir, "llama2-7b-random")
  mesh = None
  if args.fsdp:
    from lorapro_jax.sharding import make_mesh
    mesh = make_mesh(fsdp=args.fsdp)
  device = jax.devices()[0]
  report = {"device": getattr(device, "device_kind", str(device)),
            "device_count": 1 if mesh is None else mesh.size, "jax": jax.__version__,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "shape": "tiny" if tiny else "llama2_7b", "fsdp": args.fsdp, "remat": args.remat}
  try:
    report["write"] = write_checkpoint(TINY if tiny else LLAMA2_7B, directory)
    gc.collect()
    start = time.perf_counter()
    model, base = load_pretrained(directory, mesh=mesh, overrides={"remat": args.remat})
    jax.block_until_ready(base)
    report["load_s"] = time.perf_counter() - start
    report["load_peak_gib"] = peak_gib()
    report["train"] = []
    for name in METHOD_NAMES:
      result, adapted, trainable = train_phase(name, model, base, batch, seq, args.steps, mesh)
      report["train"].append(result)
      print(json.dumps(result), flush=True)
      if name == "lora":
        lora_model, lora_trainable = adapted, trainable
      del adapted, trainable
      gc.collect()
    report["decode"] = decode_phase(lora_model, combine(base, lora_trainable), decode_batch,
                                    prompt, new)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  print(table(report), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
      json.dump(report, handle, indent=2)
  return report


if __name__ == "__main__":
  main()
