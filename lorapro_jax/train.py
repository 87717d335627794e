"""A small, readable train/eval loop for adapters: frozen base, trainable tree, optax, jit.

The state is one pytree, :class:`TrainState` = (step, ``trainable`` adapters and modules_to_save,
``opt_state``, ``rng``): everything that changes and is checkpointed. The frozen ``base`` is not
in it: the steps take it as an argument, ``train_step(state, base, batch)``, never donate it (the
same pretrained weights may serve several runs) and never return it. A train step differentiates
the loss with respect to ``trainable`` only (``params = combine(base, trainable)`` inside the
differentiated function, so the base gets no gradient, no optimizer state and no update) and
applies any optax transformation.

* Gradient accumulation: a batch of ``k·m`` rows is cut into ``k`` micro-batches of ``m`` rows,
  scanned, and the mean of their gradients is applied once: the same update as one step on the
  whole batch when the loss is a mean over rows (tested), at the memory of ``m`` rows.
* Mixed precision: floating leaves of both trees are cast to ``compute_dtype`` (bf16) inside the
  differentiated function; the trainable tree and the optimizer state stay float32, the casts'
  transposes bring the gradients back to float32. Store the frozen base in bf16
  (``cast_floating(base, jnp.bfloat16)``) to halve its memory.
* :func:`fit` runs the loop: tqdm bar (loss, lr, examples/s), TensorBoard scalars (tensorboardX,
  no TensorFlow needed), periodic evaluation saved with its metrics to a
  :class:`lorapro_jax.checkpoint.TrainCheckpointer` (which keeps the best), and a JSON results
  file.

>>> import jax, jax.numpy as jnp, numpy as np, optax
>>> base = {"dense": {"kernel": jnp.ones((3, 2))}}
>>> trainable = {"dense": {"lora_a": jnp.full((3, 1), 0.1), "lora_b": jnp.zeros((1, 2))}}
>>> def loss_fn(params, batch, rng):   # params = combine(base, trainable)
...   p = params["dense"]
...   y = batch["x"] @ (p["kernel"] + p["lora_a"] @ p["lora_b"])
...   return jnp.mean((y - batch["y"]) ** 2), None
>>> optimizer = optax.adam(1e-2)
>>> state = TrainState.create(trainable, optimizer, jax.random.key(0))
>>> train_step = make_train_step(loss_fn, optimizer, accum_steps=2)
>>> batch = {"x": np.ones((4, 3), np.float32), "y": np.zeros((4, 2), np.float32)}
>>> state, metrics = train_step(state, base, batch)
>>> int(state.step), float(metrics["loss"])         # the loss before the update: (1+1+1)**2
(1, 9.0)
"""
from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorapro_jax import sharding
from lorapro_jax.checkpoint import TrainCheckpointer
from lorapro_jax.metrics import compute_metrics
from lorapro_jax.trees import combine

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Any]]


def cast_floating(tree: Any, dtype: Any) -> Any:
  """``tree`` with every floating-point leaf cast to ``dtype`` (integers, keys untouched)."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def combine_params(base: Any, trainable: Any) -> Any:
  """The full parameter tree: ``trainable`` alone when there is no frozen base (full fine-tuning),
  otherwise :func:`lorapro_jax.trees.combine`."""
  return trainable if base is None else combine(base, trainable)


def _own_buffers(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; a pytree, so it jits, shards and checkpoints as one. The frozen
  base is not part of it: the steps take it as their own argument."""

  step: jax.Array
  trainable: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, trainable: Any, optimizer: optax.GradientTransformation,
             rng: jax.Array) -> TrainState:
    """A step-0 state.

    The trainable tree and the optimizer state are copied into buffers of their own: the train
    step donates them, which must neither delete the caller's arrays (pretrained weights reused
    by another run) nor meet one buffer twice (an optimizer that puts one zeros array in
    several leaves of its state).
    """
    if not jax.tree.leaves(trainable):
      raise ValueError("the trainable tree has no leaves: nothing to train (check the LoRA "
                       "targets / modules_to_save)")
    trainable = _own_buffers(trainable)
    # Built by a jitted init, every leaf of the optimizer state is a fresh output buffer of its
    # own (no copy: LoRA-Pro full's moments at 7B are 54 GB) and keeps the adapters' shardings.
    return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
               opt_state=jax.jit(optimizer.init)(trainable), rng=rng)


def _split_micro(batch: Mapping[str, Any], accum_steps: int) -> dict[str, jax.Array]:
  def reshape(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum_steps} "
                       "equal micro-batches")
    return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
  return {k: reshape(v) for k, v in batch.items()}


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    accum_steps: int = 1, compute_dtype: Any = None,
                    regularizer: Callable[[Any, jax.Array], jax.Array] | None = None,
                    jit: bool = True, donate: bool = True, state_sharding: Any = None,
                    base_sharding: Any = None, batch_sharding: Any = None,
                    compiler_options: Mapping[str, Any] | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """``step(state, base, batch) -> (state, {"loss", "grad_norm"})``.

  Args:
    loss_fn: ``loss_fn(params, batch, rng) -> (mean loss, aux)``, params the combined tree.
    optimizer: the optax transformation whose state ``state.opt_state`` holds.
    accum_steps: micro-batches per update (the batch's leading axis must divide by it).
    compute_dtype: dtype of the forward/backward pass (None: the parameters' own).
    regularizer: ``regularizer(trainable, step) -> scalar`` added to the loss (e.g. the DEM
      penalty of dynamic rank), differentiated with it, computed in float32.
    jit, donate: jit the step; donate ``state`` (never ``base``) to it.
    state_sharding, base_sharding, batch_sharding: from :mod:`lorapro_jax.sharding`; the jitted
      step keeps the state in its sharding (None: whatever the inputs have).
    compiler_options: XLA options of the jitted step (``jax.jit``'s ``compiler_options``); None:
      :func:`lorapro_jax.sharding.compiler_options` of the batch's mesh when sharded (all-gathers
      combined under fsdp on GPUs), none otherwise; ``{}``: none.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

  def objective(trainable, base, batch, rng, step):
    params = combine_params(cast_floating(base, compute_dtype),
                            cast_floating(trainable, compute_dtype))
    loss, _ = loss_fn(params, batch, rng)
    loss = loss.astype(jnp.float32)
    if regularizer is not None:
      return loss + regularizer(trainable, step), loss
    return loss, loss

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: TrainState, base: Any,
                 batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    if accum_steps == 1:
      (_, loss), grads = grad_fn(state.trainable, base, batch, step_rng, state.step)
    else:
      def accumulate(carry, micro):
        index, micro_batch = micro
        (_, micro_loss), micro_grads = grad_fn(state.trainable, base, micro_batch,
                                               jax.random.fold_in(step_rng, index), state.step)
        return jax.tree.map(jnp.add, carry, (micro_loss, micro_grads)), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.trainable))
      (loss, grads), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(accum_steps), _split_micro(batch, accum_steps)))
      loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                              rng=rng)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  if not jit:
    if compiler_options:
      raise ValueError(f"compiler_options={dict(compiler_options)} need jit=True: an unjitted "
                       "step is not compiled as a whole")
    return train_step
  if (state_sharding is None) != (batch_sharding is None):
    raise ValueError("give both state_sharding and batch_sharding, or neither")
  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options)
  mesh = batch_sharding.mesh
  if compiler_options is None:
    compiler_options = sharding.compiler_options(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(train_step, donate_argnums=(0,) if donate else (),
                   in_shardings=(state_sharding, base_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), compiler_options=compiler_options)

  @functools.wraps(train_step)
  def sharded_step(state, base, batch):
    # The mesh is set while tracing so that models can pin activation layouts to its axes
    # (e.g. the decoder's attention inputs, which cuDNN needs sharded alike).
    with jax.set_mesh(mesh):
      return jitted(state, base, batch)

  def lower(state, base, batch):  # ahead-of-time compilation, as on any jitted function
    with jax.set_mesh(mesh):
      return jitted.lower(state, base, batch)

  sharded_step.lower = lower
  return sharded_step


def make_eval_step(predict_fn: Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]],
                   *, compute_dtype: Any = None, jit: bool = True) -> Callable[..., dict]:
  """``eval_step(state, base, batch) -> predict_fn(params, batch)`` (a dict of per-row outputs)."""

  def eval_step(state: TrainState, base: Any, batch: Mapping[str, Any]) -> dict:
    params = combine_params(cast_floating(base, compute_dtype),
                            cast_floating(state.trainable, compute_dtype))
    return dict(predict_fn(params, batch))

  return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step: Callable[..., dict], state: TrainState, base: Any,
             batches: Iterable[Mapping[str, np.ndarray]], metric_names: Sequence[str], *,
             prediction_key: str = "predictions", label_key: str = "labels",
             score_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], dict] | None = None
             ) -> dict[str, float]:
  """Runs ``eval_step(state, base, batch)`` over all batches and scores the unpadded rows
  (``mask`` == 1).

  The named metrics of :mod:`lorapro_jax.metrics` compare predictions with ``batch[label_key]``;
  ``score_fn(predictions, labels, mask) -> metrics`` replaces them where scoring needs more
  (decoding generated tokens to text, say). Per-row ``loss`` outputs, when ``eval_step`` returns
  them, are averaged into ``"loss"``.
  """
  predictions, labels, masks, losses = [], [], [], []
  for batch in batches:
    outputs = jax.device_get(eval_step(state, base, batch))
    if prediction_key not in outputs:
      raise KeyError(f"eval step returned {sorted(outputs)}, expected a {prediction_key!r} entry")
    predictions.append(np.asarray(outputs[prediction_key]))
    labels.append(np.asarray(batch[label_key]))
    masks.append(np.asarray(batch.get("mask", np.ones(len(batch[label_key])))))
    if "loss" in outputs:
      losses.append(np.asarray(outputs["loss"], np.float64))
  if not predictions:
    raise ValueError("evaluation got no batches")
  mask = np.concatenate(masks)
  score = score_fn or (lambda p, l, m: compute_metrics(metric_names, p, l, m))
  results = dict(score(np.concatenate(predictions), np.concatenate(labels), mask))
  if losses:
    results["loss"] = float(np.sum(np.concatenate(losses) * mask) / np.sum(mask))
  return results


class _NullWriter:
  def add_scalar(self, *args, **kwargs): pass
  def close(self): pass


def _summary_writer(log_dir: str | None):
  if log_dir is None:
    return _NullWriter()
  from tensorboardX import SummaryWriter  # writes event files without TensorFlow
  return SummaryWriter(log_dir)


def fit(state: TrainState, base: Any, train_step: Callable[..., tuple[TrainState, dict]],
        train_batches: Iterable[Mapping[str, np.ndarray]], num_steps: int, *,
        evaluate_fn: Callable[[TrainState], dict[str, float]] | None = None,
        eval_every: int = 0, checkpointer: TrainCheckpointer | None = None,
        data_position: Callable[[], Any] | None = None,
        schedule: optax.Schedule | None = None, log_every: int = 10,
        log_dir: str | None = None, on_step: Callable[[TrainState, dict], None] | None = None,
        results_path: str | None = None, progress: bool = True,
        extra_results: Mapping[str, Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Trains with ``train_step(state, base, batch)`` until ``state.step == num_steps``; returns
  (final state, results).

  Evaluates (``evaluate_fn(state) -> metrics``) every ``eval_every`` steps and at the end. With
  a ``checkpointer`` (:class:`lorapro_jax.checkpoint.TrainCheckpointer`), every evaluated state
  that this call trained is saved with its metrics and ``data_position()`` (e.g. the batch
  iterator's ``state``); the checkpointer keeps the best by its ``best_metric``, and
  ``results["best"]`` is the evaluation of its :meth:`~TrainCheckpointer.best_step` (restore that
  step for the best weights). ``on_step(state, metrics)`` runs after each step (periodic
  checkpoints, say). The results (history of (step, loss, grad_norm, lr), evaluations, best, final,
  wall time, median ms per step) go to ``results_path`` as JSON.
  """
  from tqdm.auto import tqdm
  writer = _summary_writer(log_dir)
  start_step = int(state.step)
  if start_step > num_steps:
    raise ValueError(f"state is at step {start_step}, past num_steps={num_steps}")
  history: list[dict[str, float]] = []
  evaluations: list[dict[str, float]] = []
  iterator = iter(train_batches)
  bar = tqdm(total=num_steps, initial=start_step, disable=not progress, dynamic_ncols=True)
  step_times: list[float] = []
  examples = 0
  last_time = time.perf_counter()
  pending: list[tuple[int, dict]] = []

  def flush():
    nonlocal last_time, examples
    now = time.perf_counter()
    for step, metrics in jax.device_get(pending):
      lr = float(schedule(step - 1)) if schedule is not None else float("nan")
      record = {"step": step, "loss": float(metrics["loss"]),
                "grad_norm": float(metrics["grad_norm"]), "lr": lr}
      history.append(record)
      for name in ("loss", "grad_norm", "lr"):
        writer.add_scalar(f"train/{name}", record[name], step)
    if pending:
      throughput = examples / max(now - last_time, 1e-9)
      writer.add_scalar("train/examples_per_second", throughput, pending[-1][0])
      bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", lr=f"{history[-1]['lr']:.2e}",
                      ex_per_s=f"{throughput:.1f}")
    pending.clear()
    examples, last_time = 0, now

  def run_eval(step: int):
    nonlocal last_time
    flush()
    metrics = {**evaluate_fn(state), "step": step}
    evaluations.append(metrics)
    for name, value in metrics.items():
      if name != "step":
        writer.add_scalar(f"eval/{name}", value, step)
    if checkpointer is not None and step > start_step:  # an untrained state is saved already
      checkpointer.save(state, step=step, metrics=metrics, force=True,
                        data_position=None if data_position is None else data_position())
    last_time = time.perf_counter()  # evaluation time is not training throughput

  wall_start = time.perf_counter()
  for step in range(start_step + 1, num_steps + 1):
    try:
      batch = next(iterator)
    except StopIteration:
      raise ValueError(f"train batches ran out at step {step} of {num_steps}") from None
    tick = time.perf_counter()
    state, metrics = train_step(state, base, batch)
    jax.block_until_ready(metrics["loss"])  # honest per-step timing
    step_times.append(time.perf_counter() - tick)
    if on_step is not None:
      on_step(state, metrics)
    pending.append((step, metrics))
    examples += len(next(iter(batch.values())))
    bar.update(1)
    if step % log_every == 0 or step == num_steps:
      flush()
    if evaluate_fn is not None and eval_every and step % eval_every == 0 and step != num_steps:
      run_eval(step)
  flush()
  if evaluate_fn is not None:
    run_eval(num_steps)
  bar.close()
  writer.close()
  best = None
  if checkpointer is not None and checkpointer.best_metric is not None:
    checkpointer.wait_until_finished()
    best_step = checkpointer.best_step()
    if best_step is not None:
      best = {**checkpointer.read_meta(best_step)["metrics"], "step": best_step}
  # the first steps include compilation: time the rest
  steady = step_times[min(len(step_times) - 1, 2):] if step_times else []
  results: dict[str, Any] = {
      "steps": num_steps, "history": history, "evaluations": evaluations,
      "final": evaluations[-1] if evaluations else None, "best": best,
      "wall_seconds": time.perf_counter() - wall_start,
      "ms_per_step": 1000.0 * float(np.median(steady)) if steady else float("nan"),
      **(extra_results or {}),
  }
  if results_path is not None:
    write_json(results_path, results)
  return state, results


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Writes ``payload`` as indented JSON (numpy scalars converted), creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as handle:
    json.dump(payload, handle, indent=2, default=lambda x: np.asarray(x).tolist())
