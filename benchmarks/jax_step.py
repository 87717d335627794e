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
  gates) that dynamic rank starts from, to separate the transform's cost from the larger rank's;
* control ``norms_only``: the LoRA step without its adapters. The same frozen bf16 base and the
  same backward pass through every layer (every activation gradient, ``4 N`` FLOPs), but only the
  RMSNorm scales train (AdamW, float32). ``lora`` minus this row is what the adapters cost; this
  row is what the model's forward and activation backward cost with XLA's kernels.

Usage: python benchmarks/jax_step.py --scale 1b --mode lora [--steps 10] [--out DIR] [--breakdown]
       [--fsdp N]
``--fsdp N`` trains on a (data, fsdp) mesh over all devices (:mod:`lorapro_jax.sharding`: base
and full-rank optimizer state split along fsdp, adapters like their kernels, rows along both
axes) with the scale's batch per device (weak scaling); the numbers stay per device, and
``global_tokens_per_s`` and the largest per-device peak memory are added.
One process per GPU (as on a cluster): start one process per device with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAX_LOCAL_DEVICE_IDS`` set
(:func:`lorapro_jax.sharding.initialize_distributed`; ``gpu_rows.sh`` does this for its
``_procs`` rows) and ``--fsdp N``; the mesh then spans the processes, every process computes the
same global batch and keeps its own rows, and process 0 writes the result (``processes``, and
the largest peak memory of all devices).
``--breakdown`` also times the gradient alone (loss + backward, no optimizer), so that the
optimizer's share of the step is the difference.

Start-up is reported next to the timed median: ``compile_s``, the XLA compilation of the train
step alone (compiled ahead of time, ``step.lower(...).compile()``; ``lower_s`` is the tracing and
lowering before it, ``backend_compile_s`` jax's own timing of the XLA compile inside it from
``jax.monitoring``, ``compile_cache_hit`` whether a persistent compilation cache answered), and
``first_step_s``, the seconds from the top of this script (before jax is imported) to the first
finished step, blocked: imports, model build, tracing, compilation and one step; ``setup_s`` is
its part before the train step is traced (imports, parameter init, optimizer state, placement).
The steps then run the compiled executable itself, so the compile is paid once;
``compiles_in_steps`` counts the XLA compilations seen during the steps (0 expected).
``ms_per_step`` is the median of steps timed one by one (blocked after each);
``ms_per_step_pipelined`` times as many steps dispatched back to back and blocked once, as a loop
that does not read the loss every step runs them. ``xla_memory_gib`` is XLA's memory analysis of
the compiled step on one device (arguments, outputs, scratch), next to the runtime ``peak_gib``.
"""
from __future__ import annotations

import time

# Taken before jax (or anything heavy) is imported: first_step_s counts the imports too.
PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

if os.environ.get("JAX_COORDINATOR_ADDRESS"):
  # several processes on CPUs (the tests) exchange through gloo; chosen before the backend starts
  jax.config.update("jax_cpu_collectives_implementation", "gloo")

from lorapro_jax.dynamic_rank import DynamicRankConfig  # noqa: E402
from lorapro_jax.lora import LoRAConfig  # noqa: E402
from lorapro_jax.methods import METHODS, Method  # noqa: E402
from lorapro_jax.models.decoder import DecoderConfig, DecoderForCausalLM  # noqa: E402

# control -> gated: method "lora" on the adapters that dynamic rank starts from
CONTROLS = {"lora_r12": False, "lora_r12_gated": True}
NORMS_ONLY = "norms_only"
NORMS = ("input_layernorm", "post_attention_layernorm", "model.norm")  # every RMSNorm's scale
MODES = tuple(METHODS) + tuple(CONTROLS) + (NORMS_ONLY,)
LEARNING_RATE = 1e-4
# Dynamic-rank schedule: T steps, pruning between 0.15 T and 0.5 T; the benchmark starts its timed
# steps inside the pruning phase so that scores, masks and events are all live (both timings of
# up to 13 steps each stay inside it).
DYNAMIC = DynamicRankConfig(total_steps=80, target_rank=common.LORA_RANK, dem_weight=0.1)
DYNRANK_START_STEP = 13
# What jax records for every XLA (backend) compilation, and for a compile answered by the
# persistent compilation cache instead (when one is configured).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
  """Counts XLA compilations and persistent-cache hits while ``active`` (``jax.monitoring``).

  Tells whether the ahead-of-time compile was a real one (not a cache hit), and checks that the
  warm-up and timed steps run the compiled executable without compiling the step again.
  """

  def __init__(self):
    self.compiles = 0
    self.compile_seconds = 0.0
    self.cache_hits = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if self.active and event == BACKEND_COMPILE_EVENT:
      self.compiles += 1
      self.compile_seconds += duration

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if self.active and event == CACHE_HIT_EVENT:
      self.cache_hits += 1

  def reset(self) -> None:
    self.compiles, self.compile_seconds, self.cache_hits = 0, 0.0, 0

  def close(self) -> None:
    self.active = False
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)


class Setup(NamedTuple):
  method: Method  # of the table ("lora" for the controls)
  model: Any
  base: Any
  trainable: Any
  optimizer: optax.GradientTransformation
  regularizer: Any  # the train step's regularizer (dynamic rank's DEM) or None
  config: DecoderConfig
  rank: int | None  # adapter rank (None: full fine-tuning, norms_only)


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


def build(scale: str, mode: str, remat: str, base_dtype, scan_unroll: int = 0,
          copy_layer_weights: bool = True) -> Setup:
  shape = common.model_shape(scale)
  config = DecoderConfig(**shape, remat=remat, scan_unroll=scan_unroll or None,
                         copy_layer_weights=copy_layer_weights)
  model = DecoderForCausalLM(config)
  batch, seq_len = common.SCALES[scale]["batch"], common.SCALES[scale]["seq_len"]
  example = jnp.zeros((batch, seq_len), jnp.int32)
  key = jax.random.key(0)
  method = METHODS["lora" if mode in CONTROLS or mode == NORMS_ONLY else mode]
  from lorapro_jax.inject import inject
  from lorapro_jax.trees import split

  def init_split(model, lora):
    """(frozen base in base_dtype, trainable): ``model``'s parameters split by ``lora``."""
    @jax.jit
    def init(key):
      base, trainable = split(model.init(key, example)["params"], lora)
      return jax.tree.map(lambda x: x.astype(base_dtype), base), trainable
    return init(key)

  if mode == NORMS_ONLY:
    base, trainable = init_split(model, LoRAConfig(modules_to_save=NORMS))
    optimizer = METHODS["full"].optimizer(LEARNING_RATE, clip_norm=None)
    return Setup(method, model, base, trainable, optimizer, None, config, None)
  if not method.adapters:
    params = jax.jit(model.init)(key, example)["params"]
    return Setup(method, model, None, params, method.optimizer(LEARNING_RATE, clip_norm=None),
                 None, config, None)

  dynamic = DYNAMIC if method.prunes else None
  lora = LoRAConfig(rank=common.LORA_RANK, alpha=common.LORA_ALPHA, targets=common.TARGETS)
  if mode in CONTROLS:
    lora = dataclasses.replace(DYNAMIC.lora_config(lora), gated=CONTROLS[mode])
  else:
    lora = method.lora_config(lora, dynamic)
  lora_model = inject(model, lora)
  base, trainable = init_split(lora_model, lora)
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
  parser.add_argument("--no-layer-weight-copies", dest="copy_layer_weights", action="store_false",
                      help="DecoderConfig.copy_layer_weights=False: each unrolled layer's GEMMs "
                           "fuse their own weight slice (longer compile, less memory)")
  parser.add_argument("--base-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--breakdown", action="store_true")
  parser.add_argument("--out", default=None)
  parser.add_argument("--fsdp", type=int, default=0,
                      help="shard over all devices on a (data, fsdp) mesh with this fsdp size "
                           "(0: one device)")
  args = parser.parse_args(argv)
  # the first warm-up step is the one first_step_s ends with; the median needs a timed step
  if args.warmup < 1:
    parser.error(f"--warmup must be >= 1 (the first step is a warm-up step), got {args.warmup}")
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")

  from lorapro_jax.sharding import initialize_distributed, place
  from lorapro_jax.train import TrainState, make_train_step
  from lorapro_jax.trees import count_params
  _, processes = initialize_distributed()
  if processes > 1 and not args.fsdp:
    parser.error(f"{processes} processes train one mesh: give --fsdp (1 for data parallel)")
  setup = build(args.scale, args.mode, args.remat, jnp.dtype(args.base_dtype), args.scan_unroll,
                args.copy_layer_weights)
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
    # jax.device_put cannot place onto other processes' devices; place() can (every process
    # holds the same full values, computed from the same seeds)
    put = place if processes > 1 else jax.device_put
    state = put(state, shardings["state_sharding"])
    base = put(base, shardings["base_sharding"])
    data = put(data, shardings["batch_sharding"])
  jitted_step = make_train_step(loss_fn, optimizer, regularizer=setup.regularizer, **shardings)

  # Ahead of time, so that the XLA compile is timed alone (the sharded step's .lower sets the mesh
  # for tracing); the steps below call the compiled executable, which never compiles again.
  compiles = CompileCounter()
  setup_s = time.perf_counter() - PROCESS_START
  start = time.perf_counter()
  lowered = jitted_step.lower(state, base, data)
  lower_s = time.perf_counter() - start
  compiles.active = True
  start = time.perf_counter()
  train_step = lowered.compile()
  compile_s = time.perf_counter() - start
  # a persistent compilation cache (if one is configured) would make compile_s a cache read
  compile_cache_hit = compiles.cache_hits > 0
  backend_compile_s = compiles.compile_seconds  # jax's own timing of the XLA compile inside it
  compiles.reset()
  # XLA's own account of one device's memory for the step (arguments + outputs not aliased to
  # them + scratch): a second opinion on the runtime peak, and the only one for one process per
  # GPU, where memory_stats() gave nonsense on H200s (1.9 GiB for a 15.8 GiB step, even < 0)
  memory = train_step.memory_analysis()
  xla_memory_gib = None if memory is None else (
      memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes) / 2**30

  losses = []
  warmup = args.warmup
  if setup.method.prunes:  # time inside the pruning phase
    warmup = max(warmup, DYNRANK_START_STEP)
  state, metrics = train_step(state, base, data)
  jax.block_until_ready((state, metrics))
  first_step_s = time.perf_counter() - PROCESS_START
  losses.append(float(metrics["loss"]))
  for _ in range(warmup - 1):
    state, metrics = train_step(state, base, data)
    losses.append(float(metrics["loss"]))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = train_step(state, base, data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  # The same number of steps dispatched back to back and blocked once, as a training loop that
  # does not read the loss every step runs them: each launch overlaps the step before it.
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = train_step(state, base, data)
  jax.block_until_ready((state, metrics))
  pipelined_ms = 1e3 * (time.perf_counter() - start) / args.steps
  losses.append(float(metrics["loss"]))
  compiles.close()
  compiles_in_steps = compiles.compiles + compiles.cache_hits
  if compiles_in_steps:
    print(f"WARNING: {compiles_in_steps} compilation(s) during the steps; expected none after "
          "the ahead-of-time compile", flush=True)
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"non-finite loss in {args.mode}: {losses}")

  extra = {"ms_per_step_pipelined": pipelined_ms, "xla_memory_gib": xla_memory_gib}
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

  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if args.fsdp:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
    if processes > 1:
      from jax.experimental import multihost_utils
      peaks = multihost_utils.process_allgather(np.asarray(max(peaks))).tolist()
      extra.update(processes=processes)
    stats = {"peak_bytes_in_use": max(peaks)}
    extra.update(devices=devices, mesh=dict(mesh.shape))
  trainable_count = count_params(state.trainable)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  result = common.summarize(
      times, scale=args.scale, train_base=not setup.method.adapters,
      device_name=getattr(device, "device_kind", str(device)),
      peak_bytes=stats.get("peak_bytes_in_use"), framework="jax", mode=args.mode,
      remat=args.remat, scan_unroll=config.scan_unroll,
      copy_layer_weights=config.copy_layer_weights, xla_flags=os.environ.get("XLA_FLAGS", ""),
      base_dtype=args.base_dtype if setup.method.adapters else "float32",
      rank=setup.rank, trainable_params=trainable_count,
      opt_state_gib=opt_bytes / 2**30, losses=losses, first_step_s=first_step_s, setup_s=setup_s,
      compile_s=compile_s, backend_compile_s=backend_compile_s, lower_s=lower_s,
      compile_cache_hit=compile_cache_hit,
      compiles_in_steps=compiles_in_steps,
      versions=dict(jax=jax.__version__), **extra)
  if args.fsdp:
    result["global_tokens_per_s"] = result["tokens_per_s"] * devices
  if jax.process_index() == 0:
    common.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()
