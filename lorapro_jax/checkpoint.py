"""Train-state checkpoints with Orbax: exact resume, keep-N and best-by-metric, one writer.

:class:`TrainCheckpointer` is a thin layer over ``orbax.checkpoint.CheckpointManager``, whose own
machinery keeps the steps: atomic writes (a step is written to a temporary directory and renamed
when complete), the newest ``keep`` plus the ``keep_best`` best steps (``LatestN`` ∪ ``BestN``),
``save_interval_steps``, asynchronous saves, restores into any sharding. A step holds ``state``
(the :class:`lorapro_jax.train.TrainState` pytree, typed rng key included; the frozen base is not
in it) and ``meta`` (JSON: LoRA config, data-iterator position, metrics, format version).

What this module adds:

* **Nothing loads on a mismatch**: the stored LoRA config and every stored leaf's path, shape and
  dtype are compared with the running ones before any array is read
  (:class:`CheckpointMismatchError`); unreadable steps raise :class:`CheckpointCorruptError`.
* **One writer per directory**: the first :meth:`~TrainCheckpointer.save` takes an exclusive
  ``flock`` on ``<directory>/writer.lock`` until :meth:`~TrainCheckpointer.close`; another writer,
  in this process or another, gets :class:`CheckpointLockedError` and writes nothing. The lock
  dies with its process, so a crashed run's directory is taken over by resuming in it.
* **No save dropped silently**: a step that is not newer than every step on disk raises.

Only Orbax (tensorstore) and JSON files are read, nothing is unpickled; files get the umask's
permissions.

>>> import tempfile, jax, jax.numpy as jnp, optax
>>> from lorapro_jax.train import TrainState
>>> trainable = {"dense": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}}
>>> state = TrainState.create(trainable, optax.adamw(1e-3), jax.random.key(0))
>>> directory = tempfile.mkdtemp()
>>> with TrainCheckpointer(directory, {"rank": 2}, keep=2, best_metric="accuracy") as checkpoints:
...   checkpoints.save(state, step=10, data_position={"batch": 10}, metrics={"accuracy": 0.5})
...   checkpoints.wait_until_finished()
...   restored = checkpoints.restore(state)     # the target gives structure, dtypes, shardings
True
>>> restored.step, restored.data_position, restored.metrics
(10, {'batch': 10}, {'accuracy': 0.5})
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from lorapro_jax.trees import layout_differences, named_leaves

FORMAT = "lorapro_jax.train_state"
FORMAT_VERSION = 1
LOCK_FILE = "writer.lock"


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the running configuration or the restore target."""


class CheckpointCorruptError(RuntimeError):
  """A checkpoint step exists but cannot be read (truncated or damaged)."""


class CheckpointLockedError(RuntimeError):
  """Another :class:`TrainCheckpointer` is writing to the directory."""


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


def _is_key(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _stored_layout_of(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of a leaf as Orbax stores it: a typed key as its raw ``key_data``."""
  if _is_key(leaf):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(np.shape(leaf)), np.dtype(leaf.dtype if hasattr(leaf, "dtype") else
                                         np.asarray(leaf).dtype)


def _restore_target(leaf: Any, sharding: Any) -> Any:
  """What ``StandardRestore`` reads a leaf into: arrays (typed keys too) as a
  ``ShapeDtypeStruct`` with their sharding, host values as numpy."""
  if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
    return np.asarray(leaf)
  sharding = sharding or getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
      jax.devices()[0])
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


class TrainCheckpointer:
  """Saves and restores train states in ``directory`` (one sub-directory per step).

  Args:
    directory: where the steps go (created by the first save).
    config: the running ``LoRAConfig`` (or its ``to_dict()``, or ``None`` without adapters); it is
      stored with every step and must match on restore.
    keep: the newest ``keep`` steps are kept (for resuming).
    best_metric: if set, the ``keep_best`` steps with the best value of this metric (passed to
      :meth:`save`) are kept as well, and :meth:`best_step` names the best one: the one place
      that tracks the best checkpoint (:func:`lorapro_jax.train.fit` asks it).
    best_mode: ``"max"`` or ``"min"``: which direction of ``best_metric`` is better.
    async_save: write in a background thread (the arrays are copied to the host before
      :meth:`save` returns); :meth:`wait_until_finished` / :meth:`close` wait for it.
    save_interval_steps: :meth:`save` writes only at multiples of this (``force=True`` always).
  """

  def __init__(self, directory: str | os.PathLike, config: Any, *, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "max", keep_best: int = 1,
               async_save: bool = True, save_interval_steps: int = 1):
    for name, value in (("keep", keep), ("keep_best", keep_best),
                        ("save_interval_steps", save_interval_steps)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}"
                         + (" (the newest step is needed to resume)" if name == "keep" else ""))
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise NotADirectoryError(f"checkpoint directory {self.directory} is a file")
    self.config = config_dict(config)
    self.best_metric = best_metric
    policies: list[Any] = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
      policies.append(checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                                n=keep_best,
                                                keep_checkpoints_without_metrics=False))
    self._options = dict(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save)
    self._lock = None
    # Whether this process has opened the manager for writing. Not ``self._lock``: on many hosts
    # only process 0 holds the flock, and the others must still open the writing manager once,
    # like process 0 (its constructor is a barrier across all processes).
    self._writing = False
    self._manager = self._open(writing=False)

  def _open(self, *, writing: bool) -> ocp.CheckpointManager:
    # A reader creates nothing and leaves temporary directories alone (another process may be
    # writing them); the writer, holding the lock, removes those a crashed run left behind.
    options = ocp.CheckpointManagerOptions(**self._options, create=writing,
                                           cleanup_tmp_directories=writing)
    return ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def _take_lock(self) -> None:
    """Becomes the directory's one writer, and reads the steps on disk afresh."""
    os.makedirs(self.directory, exist_ok=True)
    if jax.process_index() == 0:  # the primary host speaks for the others
      handle = open(os.path.join(self.directory, LOCK_FILE), "a+", encoding="utf-8")
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown holder"
        handle.close()
        raise CheckpointLockedError(
            f"{self.directory} is being written by another checkpointer ({holder}); nothing was "
            "written. Give each run its own directory; to take this one over, stop (or kill) "
            "its writer: the lock dies with it, then a new TrainCheckpointer resumes here.") from None
      handle.truncate(0)
      handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
      handle.flush()
      self._lock = handle
    self._manager.close()
    self._manager = self._open(writing=True)
    self._writing = True

  # -- saving ----------------------------------------------------------------------------------

  def save(self, state: Any, *, step: int | None = None, data_position: Any = None,
           metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
    """Starts writing ``state`` as ``step`` (default: ``int(state.step)`` / ``state["step"]``).

    Returns whether a checkpoint was started (``save_interval_steps`` may skip it). Raises
    :class:`CheckpointLockedError` if another checkpointer writes to the directory,
    ``FileExistsError`` if the step exists (a saved step is never replaced) and ``ValueError`` if
    it is older than the newest step on disk (it would never be the one resumed from).
    """
    if step is None:
      step = int(state["step"] if isinstance(state, Mapping) else state.step)
    if (isinstance(step, bool) or np.ndim(step) != 0
        or not np.issubdtype(np.asarray(step).dtype, np.integer) or int(step) < 0):
      raise ValueError(f"step must be an int >= 0, got {step!r}")
    step = int(step)
    if metrics is not None:
      try:
        metrics = {name: float(value) for name, value in metrics.items()}
      except (TypeError, ValueError):
        raise ValueError(f"metrics must map names to numbers, got {metrics!r}") from None
    if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
      raise KeyError(f"best_metric {self.best_metric!r} is not among the metrics {sorted(metrics)}")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
            "lora_config": self.config, "data_position": data_position, "metrics": metrics}
    try:
      json.dumps(meta)  # a non-JSON data_position fails here, before anything is written
    except TypeError as error:
      raise ValueError(f"data_position must be JSON data (numbers, strings, lists, dicts), got "
                       f"{data_position!r}: {error}") from None
    if not self._writing:
      self._take_lock()
    steps = self._manager.all_steps()
    if step in steps:
      raise FileExistsError(f"step {step} already exists in {self.directory}; refusing to "
                            "overwrite a saved checkpoint")
    if steps and step < max(steps):
      raise ValueError(f"step {step} is older than the newest step {max(steps)} in "
                       f"{self.directory}: it would never be resumed from (another run's "
                       "directory? give this run its own)")
    return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)),
                              metrics=metrics, force=force)

  def wait_until_finished(self) -> None:
    """Blocks until the background writes are committed (call before the process exits)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes, releases the manager and the directory's lock."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._lock is not None:
      self._lock.close()  # closing the file releases the flock
      self._lock = None
    self._writing = False

  def __enter__(self) -> TrainCheckpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # -- steps -----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (Orbax lists no step whose write did not finish)."""
    if not self._writing:  # a reader looks again; the writer's own view is the current one
      self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The committed step with the best ``best_metric`` (requires ``best_metric``)."""
    if self.best_metric is None:
      raise ValueError("best_step needs a TrainCheckpointer created with best_metric=...")
    self.all_steps()
    return self._manager.best_step()

  # -- restoring -------------------------------------------------------------------------------

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of ``step`` (config, data position, metrics)."""
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (committed steps: "
                              f"{steps})")
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

  def restore(self, target: Any, *, step: int | None = None, shardings: Any = None) -> Restored:
    """Restores ``step`` (default: the newest committed one) into the structure of ``target``.

    Args:
      target: a state of the same structure: concrete arrays or ``jax.ShapeDtypeStruct``
        leaves; each array is placed with the target leaf's sharding.
      step: which step (default: the newest committed one).
      shardings: optional pytree of shardings mirroring ``target``, used instead of the target
        leaves' own (restore onto another mesh).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
    meta = self.read_meta(int(step))
    differences = config_differences(meta.get("lora_config"), self.config)
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} was written with a different LoRA config; "
          "nothing was loaded. Differences: " + "; ".join(differences))
    wanted = {path: _stored_layout_of(leaf) for path, leaf in named_leaves(target)}
    problems = layout_differences(self.stored_layout(step), wanted, got_name="checkpoint",
                                  expected_name="target")
    if problems:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not fit the restore target; nothing "
          f"was loaded ({len(problems)} differences): " + "; ".join(problems[:20]))
    if shardings is None:
      abstract = jax.tree.map(lambda leaf: _restore_target(leaf, None), target)
    else:
      try:
        abstract = jax.tree.map(_restore_target, target, shardings)
      except (ValueError, TypeError) as error:
        raise ValueError(f"shardings must mirror the target: {error}") from error
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as error:  # tensorstore / orbax errors on damaged files
      raise CheckpointCorruptError(f"cannot read the arrays of checkpoint step {step} in "
                                   f"{self.directory}: {error}") from error
    return Restored(state=state, step=int(step), data_position=meta.get("data_position"),
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
