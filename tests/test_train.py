"""Train loop: metrics against closed forms / scipy, schedules, accumulation == big batch, mixed
precision keeps float32 state, the frozen base is passed apart (no update, never donated), fit()
logs, evaluates, saves to the checkpointer and reports the best the checkpointer keeps."""
import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from hypothesis import given, settings, strategies as st

from lorapro_jax import metrics
from lorapro_jax.checkpoint import TrainCheckpointer
from lorapro_jax.data.batching import BatchIterator, eval_batches
from lorapro_jax.dynamic_rank import DynamicRankConfig, dem_penalty, dem_regularizer, dynamic_rank
from lorapro_jax.inject import init_adapters, inject
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.schedules import make_schedule
from lorapro_jax.train import (TrainState, cast_floating, evaluate, fit, make_eval_step,
                               make_train_step)
from lorapro_jax.trees import combine, merge, named_leaves

# ---------------------------------------------------------------------------------------- metrics


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=40))
def test_binary_metrics_match_closed_forms(pairs):
  pred, label = np.array(pairs).T
  tp = np.sum((pred == 1) & (label == 1)); tn = np.sum((pred == 0) & (label == 0))
  fp = np.sum((pred == 1) & (label == 0)); fn = np.sum((pred == 0) & (label == 1))
  assert metrics.accuracy(pred, label) == pytest.approx((tp + tn) / len(pred))
  f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
  assert metrics.f1_binary(pred, label) == pytest.approx(f1)
  denominator = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  mcc = (tp * tn - fp * fn) / denominator if denominator else 0.0
  assert metrics.matthews_corrcoef(pred, label) == pytest.approx(mcc, abs=1e-12)


def test_multiclass_mcc_and_macro_f1_by_hand():
  pred, label = np.array([0, 1, 2, 2, 1, 0]), np.array([0, 1, 2, 1, 1, 2])
  # confusion (true rows): [[1,0,0],[0,2,1],[1,0,1]]; t=(1,3,2) p=(2,2,2), c=4, s=6
  expected = (4 * 6 - (2 * 1 + 2 * 3 + 2 * 2)) / math.sqrt((36 - 12) * (36 - 14))
  assert metrics.matthews_corrcoef(pred, label) == pytest.approx(expected)
  f1s = [2 * 1 / (2 + 1 + 0), 2 * 2 / (4 + 0 + 1), 2 * 1 / (2 + 1 + 1)]
  assert metrics.f1_macro(pred, label) == pytest.approx(np.mean(f1s))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 30))
def test_correlations_match_scipy(seed, n):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 5, n).astype(np.float64)  # ties on purpose
  y = x + rng.normal(size=n)
  if np.ptp(x) == 0:
    x[0] += 1
  assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-10)
  assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-10)
  np.testing.assert_allclose(metrics.average_ranks(x), scipy.stats.rankdata(x))


def test_mask_drops_padding_rows_and_exact_match_normalises():
  assert metrics.accuracy([1, 0, 0], [1, 0, 1], mask=[1, 1, 0]) == 1.0
  assert metrics.exact_match(["The answer is 1,000.", " 42"], ["the answer is 1000", "41"]) == 0.5
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.compute_metrics(["bleu"], [1], [1])
  with pytest.raises(ValueError, match="same length"):
    metrics.accuracy([1, 0], [1])


# -------------------------------------------------------------------------------------- schedules


def test_cosine_and_linear_schedules_match_closed_forms():
  peak, total, warm = 1e-3, 100, 10
  cosine = make_schedule("cosine", peak, total, warmup_ratio=0.1)
  linear = make_schedule("linear", peak, total, warmup_steps=warm, end=1e-4)
  for t in [0, 5, 10, 37, 99, 100]:
    if t < warm:
      want_cos = want_lin = peak * t / warm
    else:
      u = (t - warm) / (total - warm)
      want_cos = peak * 0.5 * (1 + math.cos(math.pi * u))
      want_lin = peak + (1e-4 - peak) * u
    assert float(cosine(t)) == pytest.approx(want_cos, rel=1e-5, abs=1e-9)
    assert float(linear(t)) == pytest.approx(want_lin, rel=1e-5, abs=1e-9)
  with pytest.raises(ValueError, match="unknown schedule 'step'"):
    make_schedule("step", peak, total)
  with pytest.raises(ValueError, match="warm-up of 100 steps"):
    make_schedule("cosine", peak, total, warmup_steps=100)


# ----------------------------------------------------------------------------------------- steps


def _linear_loss(params, batch, rng):
  del rng
  logits = batch["x"] @ params["w"] + params["b"]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=1)[:, 0]
  return jnp.mean(nll), logits


def _problem(n=64, d=6, k=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w_true = rng.normal(size=(d, k))
  return {"x": x, "labels": np.argmax(x @ w_true, 1).astype(np.int32)}, {
      "w": jnp.asarray(rng.normal(size=(d, k)) * 0.1, jnp.float32), "b": jnp.zeros(k, jnp.float32)}


class AccumulationTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_accumulated_update_equals_big_batch_update(self):
    data, params = _problem()
    batch = {k: v[:16] for k, v in data.items()}
    optimizer = optax.adamw(1e-2, weight_decay=0.01)
    results = []
    for accum in (1, 4):
      state = TrainState.create(params, optimizer, jax.random.key(0))
      step = self.variant(make_train_step(_linear_loss, optimizer, accum_steps=accum, jit=False))
      for _ in range(3):
        state, out = step(state, None, batch)
      results.append((state.trainable, out["loss"]))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_accumulation_rejects_uneven_micro_batches():
  data, params = _problem()
  optimizer = optax.sgd(0.1)
  step = make_train_step(_linear_loss, optimizer, accum_steps=3)
  state = TrainState.create(params, optimizer, jax.random.key(0))
  with pytest.raises(ValueError, match="3 equal micro-batches"):
    step(state, None, {k: v[:16] for k, v in data.items()})


def test_mixed_precision_keeps_float32_state_and_tracks_float32_run():
  data, params = _problem()
  batch = {k: v[:32] for k, v in data.items()}
  optimizer = optax.adam(1e-2)
  losses = {}
  for dtype in (None, jnp.bfloat16):
    state = TrainState.create(params, optimizer, jax.random.key(0))
    step = make_train_step(_linear_loss, optimizer, compute_dtype=dtype, donate=False)
    for _ in range(5):
      state, out = step(state, None, batch)
    losses[dtype] = float(out["loss"])
    for leaf in jax.tree.leaves((state.trainable, state.opt_state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  assert losses[jnp.bfloat16] == pytest.approx(losses[None], rel=2e-2)
  assert cast_floating({"a": jnp.ones(2), "i": jnp.ones(2, jnp.int32)},
                       jnp.bfloat16)["i"].dtype == jnp.int32


def _predict(p, batch):
  return {"predictions": jnp.argmax(batch["x"] @ p["w"] + p["b"], -1)}


def test_fit_evaluates_saves_and_asks_the_checkpointer_for_the_best(tmp_path):
  data, params = _problem(n=96)
  train = {k: v[:64] for k, v in data.items()}
  dev = {k: v[64:] for k, v in data.items()}
  schedule = make_schedule("cosine", 0.5, 20, warmup_ratio=0.1)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))
  state = TrainState.create(params, optimizer, jax.random.key(0))
  train_step = make_train_step(_linear_loss, optimizer)
  eval_step = make_eval_step(_predict)
  evaluate_fn = lambda s: evaluate(eval_step, s, None, eval_batches(dev, 10), ["accuracy", "mcc"])
  batches = BatchIterator(train, 16, seed=0)
  checkpoints = TrainCheckpointer(tmp_path / "ckpt", None, keep=1, best_metric="accuracy")
  state, results = fit(state, None, train_step, batches, 20, evaluate_fn=evaluate_fn,
                       eval_every=5, checkpointer=checkpoints, data_position=batches.state,
                       schedule=schedule, log_every=5, log_dir=str(tmp_path / "tb"),
                       results_path=str(tmp_path / "results.json"), progress=False)
  assert int(state.step) == 20
  written = json.load(open(tmp_path / "results.json"))
  assert [e["step"] for e in written["evaluations"]] == [5, 10, 15, 20]
  best = max(written["evaluations"], key=lambda e: e["accuracy"])  # the first of equal ones
  assert written["best"] == best and checkpoints.best_step() == best["step"]
  assert [h["step"] for h in written["history"]] == list(range(1, 21))
  assert written["history"][4]["lr"] == pytest.approx(float(schedule(4)))
  assert written["history"][-1]["loss"] < written["history"][0]["loss"]
  # the best step (kept beside the newest) scores the best accuracy again, and knows where the
  # data stream stood
  restored = checkpoints.restore(state, step=best["step"])
  assert evaluate_fn(restored.state)["accuracy"] == best["accuracy"]
  reference, resumed = BatchIterator(train, 16, seed=0), BatchIterator(train, 16, seed=0)
  for _ in range(best["step"]):
    next(reference)
  resumed.restore(restored.data_position)
  np.testing.assert_array_equal(next(resumed)["x"], next(reference)["x"])
  assert checkpoints.all_steps() == sorted({best["step"], 20})
  assert any(name.startswith("events") for name in os.listdir(tmp_path / "tb"))
  # resuming a finished run evaluates again but saves nothing twice
  state, again = fit(state, None, train_step, batches, 20, evaluate_fn=evaluate_fn,
                     checkpointer=checkpoints, progress=False)
  assert again["final"]["accuracy"] == written["final"]["accuracy"] and again["best"] == best
  checkpoints.close()


# ------------------------------------------------------------------- adapters on a frozen base


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))


def _nll(model, params, batch):
  logits = model.apply({"params": params}, batch["x"])
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["labels"][:, None], 1)), logits


def test_lora_step_updates_adapters_only_and_matches_a_hand_written_step():
  data, _ = _problem(d=6, k=3)
  batch = {k: v[:16] for k, v in data.items()}
  base = Net().init(jax.random.key(0), batch["x"])["params"]
  pruning = DynamicRankConfig(total_steps=10, target_rank=1, dem_weight=0.3)
  config = pruning.lora_config(LoRAConfig(rank=1, alpha=4.0, targets=("hidden", "out")))
  model = inject(Net(), config)
  trainable = init_adapters(model, base, jax.random.key(1), batch["x"])
  loss_fn = lambda params, b, rng: _nll(model, params, b)
  optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2),
                          dynamic_rank(pruning))
  state = TrainState.create(trainable, optimizer, jax.random.key(2))
  base_before = jax.tree.map(np.asarray, base)
  old_trainable = state.trainable
  new_state, out = make_train_step(loss_fn, optimizer, regularizer=dem_regularizer(pruning))(
      state, base, batch)

  def objective(t):  # the step's objective, written out by hand
    return loss_fn(combine(base, t), batch, None)[0] + 0.3 * dem_penalty(t)

  grads = jax.grad(objective)(trainable)
  updates, _ = optimizer.update(grads, optimizer.init(trainable), trainable)
  chex.assert_trees_all_close(new_state.trainable, optax.apply_updates(trainable, updates),
                              rtol=1e-6, atol=1e-7)
  names = {path[-1] for path, _ in named_leaves(new_state.trainable)}
  assert names == {"lora_a", "lora_b", "lora_c"}
  assert float(out["loss"]) == pytest.approx(float(loss_fn(combine(base, trainable), batch, None)[0]))
  # the state was donated to the step, the frozen base was not: it is intact and reusable
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old_trainable))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(base))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, base), base_before)
  assert set(TrainState.__dataclass_fields__) == {"step", "trainable", "opt_state", "rng"}


def test_eval_step_sees_base_and_adapters():
  data, _ = _problem(d=6, k=3)
  x = data["x"][:8]
  base = Net().init(jax.random.key(0), x)["params"]
  model = inject(Net(), LoRAConfig(rank=2, alpha=2.0, targets=("hidden",), init="gaussian"))
  trainable = init_adapters(model, base, jax.random.key(1), x)
  trainable = jax.tree.map(lambda t: t + 0.5, trainable)  # B != 0: the adapters change outputs
  state = TrainState.create(trainable, optax.sgd(0.1), jax.random.key(2))
  eval_step = make_eval_step(lambda p, b: {"logits": model.apply({"params": p}, b["x"])})
  want = Net().apply({"params": merge(combine(base, trainable), LoRAConfig(
      rank=2, alpha=2.0, targets=("hidden",)))}, x)
  np.testing.assert_allclose(eval_step(state, base, {"x": x})["logits"], want, rtol=1e-5,
                             atol=1e-6)
