"""Train-state checkpoints with Orbax: exact resume, keep-N and best-by-metric, sharded restore.

:class:`TrainCheckpointer` wraps an ``orbax.checkpoint.CheckpointManager``. One checkpoint step
holds two items:

* ``state`` — the train-state pytree (adapters / trainable tree, optimizer state with LoRA-Pro
  moments and dynamic-rank scores and masks, step, rng key) as Orbax arrays, saved shard by shard.
  A dataclass field called ``base`` (the frozen base of :class:`lorapro_jax.train.TrainState`) is
  never written: the base is rebuilt from the pretrained weights, and a restore puts the target's
  own ``base`` back. Typed PRNG keys are stored as their raw ``jax.random.key_data`` and wrapped
  again (``jax.random.wrap_key_data``, with the target key's implementation) on restore.
* ``meta`` — JSON: the LoRA configuration (``LoRAConfig.to_dict()``), the data-iterator position
  (any small JSON value, e.g. ``{"epoch": 1, "batch": 37}``), the step's metrics, a format version.

Guarantees:

* **Exact resume.** Restoring the latest step and continuing gives bit-identical adapters and
  optimizer state to a run that was never interrupted (``tests/test_checkpoint.py`` kills a
  training subprocess with SIGKILL at random points, during and between asynchronous saves).
* **Atomic steps.** Orbax writes a step into a temporary directory and renames it after writing
  ``commit_success.txt`` and the commit timestamp; a step without them is never restored
  (:func:`committed_steps`), a resume falls back to the newest committed step and says so.
* **Nothing loads on a mismatch.** Before any array is read, the stored LoRA configuration is
  compared with the running one and every stored leaf's name, shape and dtype with the target's;
  a difference raises :class:`CheckpointMismatchError` naming each differing field or leaf.
  Unreadable (truncated, corrupt) steps raise :class:`CheckpointCorruptError`. Restoring never
  writes, saving never replaces an existing step.
* **Any mesh.** ``restore`` places every array with the target's sharding (a concrete state or
  ``jax.ShapeDtypeStruct`` leaves with ``sharding``), whatever mesh the checkpoint was saved from.
* Only Orbax (tensorstore), JSON and — for :func:`save_adapters` — safetensors are read; nothing
  is unpickled.

Example::

  import jax, jax.numpy as jnp, optax
  from lorapro_jax.checkpoint import TrainCheckpointer

  trainable = {"dense": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}}
  optimizer = optax.adamw(1e-3)
  state = {"step": jnp.int32(0), "trainable": trainable, "opt_state": optimizer.init(trainable),
           "rng": jax.random.key(0)}
  with TrainCheckpointer("/tmp/run", config=None, keep=2, best_metric="accuracy") as checkpoints:
    checkpoints.save(state, step=10, data_position={"batch": 10}, metrics={"accuracy": 0.5})
    checkpoints.wait_until_finished()
    restored = checkpoints.restore(state)       # the target gives structure, dtypes, shardings
  restored.state, restored.step, restored.data_position   # ..., 10, {"batch": 10}
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

FORMAT = "lorapro_jax.train_state"
FORMAT_VERSION = 1
_COMMIT_FILE = "commit_success.txt"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_ADAPTER_FILE = "adapters.safetensors"
_ADAPTER_CONFIG_FILE = "lora_config.json"


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the running configuration or the restore target."""


class CheckpointCorruptError(RuntimeError):
  """A checkpoint step exists but cannot be read (truncated, uncommitted, or damaged)."""


class Restored(NamedTuple):
  """What :meth:`TrainCheckpointer.restore` returns."""

  state: Any
  step: int
  data_position: Any
  metrics: dict[str, float] | None


def config_dict(config: Any) -> dict[str, Any] | None:
  """The JSON form of a LoRA configuration (``None`` for full fine-tuning / no adapters)."""
  if config is None:
    return None
  if isinstance(config, Mapping):
    return json.loads(json.dumps(dict(config)))
  if not hasattr(config, "to_dict"):
    raise TypeError(f"config must be a LoRAConfig (with .to_dict()), a dict or None, "
                    f"got {type(config).__name__}")
  return json.loads(json.dumps(config.to_dict()))


def config_differences(stored: Mapping[str, Any] | None,
                       running: Mapping[str, Any] | None) -> list[str]:
  """Human-readable ``field: stored vs running`` lines, empty when the two agree."""
  if stored is None or running is None:
    return [] if stored == running else [f"LoRA config: checkpoint has {stored!r}, "
                                         f"running {running!r}"]
  return [f"{name}: checkpoint {stored.get(name, '<absent>')!r} vs running "
          f"{running.get(name, '<absent>')!r}"
          for name in sorted(set(stored) | set(running)) if stored.get(name) != running.get(name)]


# ---------------------------------------------------------------------------------------------
# The train state as a tree of named arrays (no base, raw key data).


def _key_name(entry: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  raise TypeError(f"unsupported pytree key {entry!r}")


def named_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """``(path, leaf)`` for every leaf; a path is the tuple of its keys as strings (dict keys,
  dataclass / NamedTuple field names, sequence indices): the names checkpoints store."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(_key_name(e) for e in path), leaf) for path, leaf in leaves]


def _is_key(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _without_base(state: Any) -> Any:
  if dataclasses.is_dataclass(state) and hasattr(state, "base") and hasattr(state, "replace"):
    return state.replace(base=None)
  return state


def _nest(named: list[tuple[tuple[str, ...], Any]]) -> dict:
  root: dict = {}
  for path, value in named:
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return root


def _stored_form(leaf: Any) -> Any:
  if _is_key(leaf):
    return jax.random.key_data(leaf)
  if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
    return leaf
  return np.asarray(leaf)


def _abstract(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of a leaf as stored (typed keys as their raw data)."""
  if _is_key(leaf):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(np.shape(leaf)), np.dtype(leaf.dtype if hasattr(leaf, "dtype") else
                                         np.asarray(leaf).dtype)


def _restore_args(leaf: Any, sharding: Any) -> ocp.RestoreArgs:
  if _is_key(leaf) or not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
    return ocp.RestoreArgs(restore_type=np.ndarray)
  sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)


def _rebuilt_leaf(target: Any, value: Any, sharding: Any) -> Any:
  if _is_key(target):
    impl = jax.random.key_impl(target) if isinstance(target, jax.Array) else target.dtype._impl
    key = jax.random.wrap_key_data(np.asarray(value), impl=impl)
    sharding = sharding if sharding is not None else getattr(target, "sharding", None)
    return key if sharding is None else jax.device_put(key, sharding)
  if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
    return value
  if isinstance(target, np.ndarray):
    return np.asarray(value, target.dtype)
  return type(target)(np.asarray(value).item())


# ---------------------------------------------------------------------------------------------


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Steps in ``directory`` whose save finished (commit marker and commit timestamp present)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and _commit_problem(os.path.join(directory, name)) is None)


def _commit_problem(step_dir: str) -> str | None:
  if not os.path.isfile(os.path.join(step_dir, _COMMIT_FILE)):
    return f"missing commit marker {_COMMIT_FILE}"
  metadata_path = os.path.join(step_dir, _STEP_METADATA_FILE)
  try:
    with open(metadata_path, encoding="utf-8") as handle:
      metadata = json.load(handle)
  except (OSError, ValueError) as error:
    return f"unreadable {_STEP_METADATA_FILE} ({error})"
  if not metadata.get("commit_timestamp_nsecs"):
    return f"{_STEP_METADATA_FILE} has no commit timestamp"
  return None


class TrainCheckpointer:
  """Saves and restores train states in ``directory`` (one sub-directory per step).

  Args:
    directory: where the steps go (created if missing).
    config: the running ``LoRAConfig`` (or its ``to_dict()``, or ``None`` without adapters); it is
      stored with every step and must match on restore.
    keep: the newest ``keep`` steps are kept (for resuming).
    best_metric: if set, the ``keep_best`` steps with the best value of this metric (passed to
      :meth:`save`) are kept as well, and :meth:`best_step` names the best one.
    best_mode: ``"max"`` or ``"min"``: which direction of ``best_metric`` is better.
    async_save: write in a background thread (the arrays are copied to the host before
      :meth:`save` returns); :meth:`wait_until_finished` / :meth:`close` wait for it.
    save_interval_steps: :meth:`save` writes only at multiples of this (``force=True`` always).
  """

  def __init__(self, directory: str | os.PathLike, config: Any, *, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "max", keep_best: int = 1,
               async_save: bool = True, save_interval_steps: int = 1):
    if keep < 1:
      raise ValueError(f"keep must be >= 1 (the newest step is needed to resume), got {keep}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep_best < 1:
      raise ValueError(f"keep_best must be >= 1, got {keep_best}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.config = config_dict(config)
    self.best_metric = best_metric
    policies: list[Any] = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
      policies.append(checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                                n=keep_best,
                                                keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  # -- saving ----------------------------------------------------------------------------------

  def save(self, state: Any, *, step: int | None = None, data_position: Any = None,
           metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
    """Starts writing ``state`` as ``step`` (default: ``int(state.step)`` / ``state["step"]``).

    Returns whether a checkpoint was started (``save_interval_steps`` may skip it). Raises if
    the step already exists: a saved step is never replaced.
    """
    if step is None:
      step = int(state["step"] if isinstance(state, Mapping) else state.step)
    step = int(step)
    if metrics is not None:
      metrics = {name: float(value) for name, value in metrics.items()}
    if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
      raise KeyError(f"best_metric {self.best_metric!r} is not among the metrics {sorted(metrics)}")
    if step in self._manager.all_steps():
      raise FileExistsError(f"step {step} already exists in {self.directory}; refusing to "
                            "overwrite a saved checkpoint")
    arrays = _nest([(path, _stored_form(leaf))
                    for path, leaf in named_leaves(_without_base(state))])
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
            "lora_config": self.config, "data_position": data_position, "metrics": metrics}
    json.dumps(meta)  # a non-JSON data_position fails here, before anything is written
    return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(arrays),
                                                            meta=ocp.args.JsonSave(meta)),
                              metrics=metrics, force=force)

  def wait_until_finished(self) -> None:
    """Blocks until the background writes are committed (call before the process exits)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> TrainCheckpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # -- steps -----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    self._manager.reload()
    return [step for step in committed_steps(self.directory) if step in self._manager.all_steps()]

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The committed step with the best ``best_metric`` (requires ``best_metric``)."""
    if self.best_metric is None:
      raise ValueError("best_step needs a TrainCheckpointer created with best_metric=...")
    self._manager.reload()
    return self._manager.best_step()

  # -- restoring -------------------------------------------------------------------------------

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of ``step`` (config, data position, metrics), checked for commit."""
    step_dir = os.path.join(self.directory, str(step))
    if not os.path.isdir(step_dir):
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                              f"(committed steps: {committed_steps(self.directory)})")
    problem = _commit_problem(step_dir)
    if problem is not None:
      raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} was never "
                                   f"committed: {problem}")
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as error:  # orbax / json raise many types; all mean the same here
      raise CheckpointCorruptError(f"cannot read the metadata of checkpoint step {step} in "
                                   f"{self.directory}: {error}") from error
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
      raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is not a "
                                   f"{FORMAT} checkpoint (metadata: {meta!r})")
    if meta.get("version") != FORMAT_VERSION:
      raise CheckpointMismatchError(f"checkpoint step {step} has format version "
                                    f"{meta.get('version')!r}, this library reads {FORMAT_VERSION}")
    return dict(meta)

  def _resolve_step(self, step: int | None) -> int:
    if step is not None:
      return int(step)
    on_disk = sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())
    committed = committed_steps(self.directory)
    if not committed:
      raise FileNotFoundError(f"no committed checkpoint in {self.directory}"
                              + (f" (uncommitted steps {on_disk})" if on_disk else ""))
    newer = [s for s in on_disk if s > committed[-1]]
    if newer:
      warnings.warn(f"skipping uncommitted checkpoint steps {newer} in {self.directory}; "
                    f"restoring step {committed[-1]}", stacklevel=3)
    return committed[-1]

  def restore(self, target: Any, *, step: int | None = None, shardings: Any = None) -> Restored:
    """Restores ``step`` (default: the newest committed one) into the structure of ``target``.

    Args:
      target: a state of the same structure — concrete arrays or ``jax.ShapeDtypeStruct``
        leaves; each array is placed with the target leaf's sharding. A ``base`` field is not
        read from the checkpoint: the target's own base is put back.
      step: which step (default: the newest committed one).
      shardings: optional pytree of shardings mirroring ``target`` (without ``base``), used
        instead of the target leaves' own (restore onto another mesh).
    """
    step = self._resolve_step(step)
    meta = self.read_meta(step)
    differences = config_differences(meta.get("lora_config"), self.config)
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} was written with a different LoRA config; "
          "nothing was loaded. Differences: " + "; ".join(differences))

    stateful = _without_base(target)
    named = named_leaves(stateful)
    if shardings is None:
      sharding_leaves = [None] * len(named)
    else:
      try:
        sharding_leaves = jax.tree.structure(stateful).flatten_up_to(shardings)
      except (ValueError, TypeError) as error:
        raise ValueError(f"shardings must mirror the target (without base): {error}") from error
    self._check_layout(step, named)

    restore_args = _nest([(path, _restore_args(leaf, sharding))
                          for (path, leaf), sharding in zip(named, sharding_leaves)])
    try:
      loaded = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(restore_args=restore_args)))["state"]
    except Exception as error:  # tensorstore / orbax errors on damaged files
      raise CheckpointCorruptError(f"cannot read the arrays of checkpoint step {step} in "
                                   f"{self.directory}: {error}") from error
    values = []
    for (path, leaf), sharding in zip(named, sharding_leaves):
      node = loaded
      for key in path:
        node = node[key]
      values.append(_rebuilt_leaf(leaf, node, sharding))
    state = jax.tree.unflatten(jax.tree.structure(stateful), values)
    if stateful is not target:  # the frozen base is never stored: put the target's back
      state = state.replace(base=target.base)
    return Restored(state=state, step=step, data_position=meta.get("data_position"),
                    metrics=meta.get("metrics"))

  def stored_layout(self, step: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """``{leaf path: (shape, dtype)}`` of the arrays stored at ``step`` (reads no array)."""
    try:
      stored_tree = self._manager.item_metadata(step)["state"].tree
    except Exception as error:  # orbax / tensorstore raise many types on damaged metadata
      raise CheckpointCorruptError(f"cannot read the array metadata of checkpoint step {step} in "
                                   f"{self.directory}: {error}") from error
    return {path: (tuple(meta.shape), np.dtype(meta.dtype))
            for path, meta in named_leaves(stored_tree)}

  def _check_layout(self, step: int, named: list[tuple[tuple[str, ...], Any]]) -> None:
    stored = self.stored_layout(step)
    wanted = {path: _abstract(leaf) for path, leaf in named}
    problems = [f"{'/'.join(path)}: missing from the checkpoint" for path in wanted
                if path not in stored]
    problems += [f"{'/'.join(path)}: in the checkpoint but not in the target" for path in stored
                 if path not in wanted]
    problems += [f"{'/'.join(path)}: checkpoint {stored[path][0]} {stored[path][1]} vs target "
                 f"{wanted[path][0]} {wanted[path][1]}"
                 for path in wanted if path in stored and stored[path] != wanted[path]]
    if problems:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not fit the restore target; nothing "
          f"was loaded ({len(problems)} differences): " + "; ".join(problems[:20]))


# ---------------------------------------------------------------------------------------------
# Adapter-only files: the trainable tree alone, in safetensors, apart from any base.


def save_adapters(directory: str | os.PathLike, adapters: Any, config: Any) -> None:
  """Writes the trainable tree as ``adapters.safetensors`` (keys = ``/``-joined paths) and the
  config as ``lora_config.json``. Refuses to overwrite existing files."""
  from safetensors.numpy import save_file
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  for name in (_ADAPTER_FILE, _ADAPTER_CONFIG_FILE):
    if os.path.exists(os.path.join(directory, name)):
      raise FileExistsError(f"{os.path.join(directory, name)} exists; refusing to overwrite it")
  tensors = {}
  for path, leaf in named_leaves(adapters):
    if any("/" in key for key in path):
      raise ValueError(f"adapter path {path} has a key containing '/'")
    tensors["/".join(path)] = np.ascontiguousarray(jax.device_get(leaf))
  save_file(tensors, os.path.join(directory, _ADAPTER_FILE))
  with open(os.path.join(directory, _ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as handle:
    json.dump({"format": "lorapro_jax.adapters", "version": FORMAT_VERSION,
               "lora_config": config_dict(config)}, handle, indent=2)


def load_adapters(directory: str | os.PathLike, config: Any = None) -> tuple[dict, dict | None]:
  """Reads what :func:`save_adapters` wrote: ``(nested dict of numpy arrays, config dict)``.

  With ``config``, the stored config must equal it (else :class:`CheckpointMismatchError`).
  """
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  directory = os.fspath(directory)
  config_path = os.path.join(directory, _ADAPTER_CONFIG_FILE)
  try:
    with open(config_path, encoding="utf-8") as handle:
      stored = json.load(handle)
  except ValueError as error:
    raise CheckpointCorruptError(f"{config_path} is not valid JSON: {error}") from error
  if config is not None:
    differences = config_differences(stored.get("lora_config"), config_dict(config))
    if differences:
      raise CheckpointMismatchError(f"adapters in {directory} were saved with a different LoRA "
                                    "config; nothing was loaded. Differences: "
                                    + "; ".join(differences))
  try:
    tensors = load_file(os.path.join(directory, _ADAPTER_FILE))
  except (SafetensorError, OSError) as error:
    raise CheckpointCorruptError(f"cannot read {os.path.join(directory, _ADAPTER_FILE)}: "
                                 f"{error}") from error
  return _nest([(tuple(name.split("/")), value) for name, value in tensors.items()]), \
      stored.get("lora_config")
