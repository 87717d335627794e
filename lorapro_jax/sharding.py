"""Sharding for adapter training with ``jax.sharding``: a (data, fsdp) mesh and the rules.

* Mesh axes ``("data", "fsdp")``. Both are data-parallel (each device sees its own rows of the
  batch: batches are split over ``data × fsdp``); ``fsdp`` also splits the *weights*.
* Frozen base parameters and every optimizer-state leaf (LoRA-Pro's full-rank moments of shape
  ``(n_in, n_out)`` included) are split along ``fsdp`` on their largest axis divisible by the fsdp
  size; leaves smaller than ``min_shard_size`` elements (biases, norms, r×r matrices) stay
  replicated. XLA gathers them where a matmul needs them (ZeRO-3 style).
* Adapters are split like their base kernel: if the kernel is split on an input axis, ``lora_a``
  (``n_in × r``) is split on ``n_in``; if on an output axis, ``lora_b`` (``r × n_out``) on
  ``n_out``. ``lora_c`` and other small leaves stay replicated.
* Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` when the
  environment names a coordinator; every host iterates the same global batches and feeds its
  rows of each (:func:`mesh_batches`: :func:`lorapro_jax.data.batching.host_shard`, then
  :func:`shard_batch` assembles the global batch with ``jax.make_array_from_process_local_data``).

Example (8 devices)::

  mesh = make_mesh(data=2, fsdp=4)
  shardings, base_shardings = state_shardings(state, base, mesh), param_shardings(base, mesh)
  state, base = place(state, shardings), place(base, base_shardings)
  step = make_train_step(loss_fn, optimizer, state_sharding=shardings,
                         base_sharding=base_shardings, batch_sharding=batch_sharding(mesh))
  state, metrics = step(state, base, shard_batch(batch, mesh))
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lorapro_jax.adapters import DEFAULT_KEYS, AdapterKeys, get_path, map_adapters, rebuild
from lorapro_jax.data.batching import host_shard

DATA, FSDP = "data", "fsdp"
# XLA's size limit for combining all-gathers on GPUs under fsdp (see compiler_options)
ALL_GATHER_COMBINE_BYTES = 256 * 2 ** 20


def make_mesh(data: int | None = None, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default all); ``data`` defaults to the rest."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices")
  data = len(devices) // fsdp if data is None else data
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match the "
                     f"{len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_shard_size: int = 2 ** 10) -> P:
  """Splits the largest axis divisible by ``fsdp_size`` along ``fsdp``; small leaves replicate."""
  if fsdp_size == 1 or not shape or math.prod(shape) < min_shard_size:
    return P()
  candidates = [axis for axis in np.argsort(shape, kind="stable")[::-1]
                if shape[axis] % fsdp_size == 0]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[int(candidates[0])] = FSDP
  return P(*spec)


def _named(mesh: Mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)


def param_shardings(tree: Any, mesh: Mesh, min_shard_size: int = 2 ** 10) -> Any:
  """A tree of ``NamedSharding`` (fsdp rule) mirroring ``tree``."""
  fsdp_size = mesh.shape[FSDP]
  return jax.tree.map(lambda x: _named(mesh, fsdp_spec(np.shape(x), fsdp_size, min_shard_size)),
                      tree)


def _input_axes(kernel_shape: Sequence[int], n_stack: int, n_in: int) -> int:
  """How many leading (non-stack) kernel axes multiply to ``n_in``."""
  size = 1
  for count, dim in enumerate(kernel_shape[n_stack:], 1):
    size *= dim
    if size == n_in:
      return count
  raise ValueError(f"kernel shape {tuple(kernel_shape)} has no leading axes of size n_in={n_in}")


def adapter_shardings(trainable: Any, base: Any, mesh: Mesh, *, keys: AdapterKeys = DEFAULT_KEYS,
                      min_shard_size: int = 2 ** 10) -> Any:
  """Shardings of the trainable tree: adapters follow their base kernel's split side; other
  trainable leaves (heads, modules_to_save) take the fsdp rule."""
  fsdp_size = mesh.shape[FSDP]
  replicated = _named(mesh, P())

  def node_shardings(path, node):
    a_shape, b_shape = np.shape(node[keys.a]), np.shape(node[keys.b])
    n_stack = len(a_shape) - 2
    out = {name: replicated for name in node}
    kernel = get_path(base, path).get("kernel") if base is not None else None
    if kernel is None or fsdp_size == 1:
      return out
    spec = fsdp_spec(np.shape(kernel), fsdp_size, min_shard_size)
    if FSDP not in spec:
      return out
    split_axis = list(spec).index(FSDP) - n_stack
    on_input = split_axis < _input_axes(np.shape(kernel), n_stack, a_shape[-2])
    if on_input and a_shape[-2] % fsdp_size == 0:
      out[keys.a] = _named(mesh, P(*([None] * n_stack), FSDP, None))
    elif not on_input and b_shape[-1] % fsdp_size == 0:
      out[keys.b] = _named(mesh, P(*([None] * n_stack), None, FSDP))
    return rebuild(node, out)

  return map_adapters(
      node_shardings, trainable, keys=keys,
      other=lambda path, leaf: _named(mesh, fsdp_spec(np.shape(leaf), fsdp_size, min_shard_size)))


def state_shardings(state: Any, base: Any, mesh: Mesh, *, keys: AdapterKeys = DEFAULT_KEYS,
                    min_shard_size: int = 2 ** 10) -> Any:
  """Shardings of a :class:`lorapro_jax.train.TrainState` (step and rng replicated; adapters
  follow their kernel in the frozen ``base``, whose own are ``param_shardings(base, mesh)``)."""
  replicated = _named(mesh, P())
  return state.replace(
      step=replicated, rng=replicated,
      trainable=adapter_shardings(state.trainable, base, mesh, keys=keys,
                                  min_shard_size=min_shard_size),
      opt_state=param_shardings(state.opt_state, mesh, min_shard_size))


def train_shardings(state: Any, base: Any, mesh: Mesh, **options: Any) -> dict[str, Any]:
  """The keywords of :func:`lorapro_jax.train.make_train_step` for ``mesh``: the state's
  (:func:`state_shardings`), the frozen base's (:func:`param_shardings`) and the batch's.

  ``jax.device_put(x, shardings[...])`` places each of them; ``options`` go to
  :func:`state_shardings` (``keys``, ``min_shard_size``).
  """
  return dict(state_sharding=state_shardings(state, base, mesh, **options),
              base_sharding=param_shardings(base, mesh,
                                            options.get("min_shard_size", 2 ** 10)),
              batch_sharding=batch_sharding(mesh))


def compiler_options(mesh: Mesh) -> dict[str, Any]:
  """The XLA options a train step on ``mesh`` compiles with by default
  (:func:`lorapro_jax.train.make_train_step`'s ``compiler_options=None``).

  On GPUs with an fsdp axis of more than one device:
  ``xla_gpu_all_gather_combine_threshold_bytes`` = :data:`ALL_GATHER_COMBINE_BYTES` (256 MiB).
  fsdp gathers every frozen kernel before its product, one all-gather each (7 a layer, 175 a step
  on the 1b decoder); XLA's default limit leaves them apart, and their fixed cost per collective
  is not hidden behind the layer's compute. Combined up to 256 MiB, a few layers' kernels arrive
  in one gather (1b LoRA step, fsdp 2 on 2 H200s: 99.3 -> 92.7-95.3 ms, 94% of one GPU's step
  instead of 88%, peak memory +0.1 GiB; ``benchmarks/README.md``). Elsewhere (data parallel: one
  combined all-reduce already; CPUs; TPUs, whose compiler schedules its own): no options. A
  value of the same option in ``XLA_FLAGS`` wins (compile options would override it).
  """
  option = "xla_gpu_all_gather_combine_threshold_bytes"
  if (mesh.shape[FSDP] > 1 and mesh.devices.flat[0].platform == "gpu"
      and option not in os.environ.get("XLA_FLAGS", "")):
    return {option: ALL_GATHER_COMBINE_BYTES}
  return {}


def place(tree: Any, shardings: Any) -> Any:
  """``tree`` laid out as ``shardings`` say, on one host or many.

  Every process passes the same full value (computed alike, e.g. from the same seed) and gets
  the global arrays back. ``jax.device_put`` does this on one host, but across processes it
  refuses a typed PRNG key (``TrainState.rng``) for devices of other processes; a jitted
  identity with ``out_shardings`` places every leaf, keys included (checked by
  ``tests/test_multihost.py`` on two processes).
  """
  return jax.jit(lambda leaves: leaves, out_shardings=shardings)(tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over every device (``data × fsdp``), other axes whole."""
  return _named(mesh, P((DATA, FSDP)))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """The global batch from this host's rows (one host: the whole batch)."""
  sharding = batch_sharding(mesh)
  rows = mesh.shape[DATA] * mesh.shape[FSDP]
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % rows:
      raise ValueError(f"batch entry {name!r}: {global_rows} global rows do not split over the "
                       f"{rows} data-parallel devices")
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def check_hosts_can_feed(batch_size: int, has_mesh: bool) -> None:
  """Raises a clear error unless every process (host) of this job can feed its rows of each
  batch through :func:`mesh_batches`: ``batch_size`` must split evenly over the processes, and
  several processes train one model only on the mesh they form together.

  >>> check_hosts_can_feed(32, has_mesh=False)  # one process: anything goes
  """
  hosts = jax.process_count()
  if batch_size % hosts:
    raise ValueError(f"batch size {batch_size} does not split over {hosts} processes (hosts)")
  if hosts > 1 and not has_mesh:
    raise ValueError(f"{hosts} processes train one model: give the mesh they form (--mesh "
                     "data,fsdp)")


def mesh_batches(batches: Iterable[Mapping[str, Any]], mesh: Mesh | None
                 ) -> Iterator[Mapping[str, Any]]:
  """What a train step on ``mesh`` takes from an iterator of *global* batches (every host
  iterates the same stream, e.g. one :class:`~lorapro_jax.data.batching.BatchIterator` with the
  same seed): each host keeps its strided rows of every batch
  (:func:`~lorapro_jax.data.batching.host_shard`) and :func:`shard_batch` assembles them into
  the global arrays. A run thus sees the same batches (their rows in another order within each
  batch) on any number of hosts, and its checkpointed data position is the same on all of them.
  Without a mesh: the batches unchanged (one host)."""
  if mesh is None:
    yield from batches
    return
  index, count = jax.process_index(), jax.process_count()
  for batch in batches:
    yield shard_batch(host_shard(batch, index, count) if count > 1 else batch, mesh)


def initialize_distributed(env: Mapping[str, str] | None = None) -> tuple[int, int]:
  """Starts multi-host JAX when the environment says so; returns (process_index, process_count).

  Reads ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``,
  and optionally ``JAX_LOCAL_DEVICE_IDS`` (comma-separated, e.g. ``"3"``): the GPUs of this host
  that this process drives, for one process per GPU (every GPU stays visible to CUDA, so NCCL
  still connects them peer to peer; ``CUDA_VISIBLE_DEVICES`` would hide them from each other).
  ``LORAPRO_DISTRIBUTED=auto`` lets JAX detect the cluster itself (TPU pods, SLURM, Open MPI).
  Without either, nothing is started (one host).
  """
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
    local_ids = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    try:
      local_device_ids = [int(i) for i in local_ids.split(",")] if local_ids else None
    except ValueError:
      raise ValueError(f"JAX_LOCAL_DEVICE_IDS={local_ids!r}: expected device numbers separated "
                       "by commas, e.g. '0' or '0,1'") from None
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]),
                               local_device_ids=local_device_ids)
  elif env.get("LORAPRO_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  elif env.get("LORAPRO_DISTRIBUTED") not in (None, ""):
    raise ValueError(f"LORAPRO_DISTRIBUTED={env['LORAPRO_DISTRIBUTED']!r}: expected 'auto'")
  return jax.process_index(), jax.process_count()
