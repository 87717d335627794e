"""DoRA dynamic rank (Mao et al. 2024, not weight-decomposed DoRA): the schedule against a literal
transcription of the official code for every T in 20..1000, live counts in exact fractions, scores
against brute force and a float64 reference where components nearly cancel, exact zeros after
apply_updates (f32 and bf16), revive vs hard pruning, misordered chains detected, shrink/DEM
against closed forms, no n_in x n_out intermediate in the jaxpr, sharded == single device,
composition with LoRA-Pro, one config driving transform, DEM, shrink and a PEFT export that
PyTorch loads (one kernel pruned to rank 0), and the heatmap's cells."""
import math
import os
import sys
import warnings
from fractions import Fraction

os.environ.setdefault("USE_TF", "0")  # transformers must not import TensorFlow here

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from jax.extend.core import subjaxprs  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from lorapro_jax.adapters import map_adapters  # noqa: E402
from lorapro_jax.dynamic_rank import (  # noqa: E402
    DynamicRankConfig, DynamicRankState, dem_penalty, dem_regularizer, dynamic_rank,
    norm_ratio_scores, plot_rank_heatmap, pruning_events, rank_pattern, sensitivity_scores, shrink)
from lorapro_jax.lora import LoRAConfig  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import dynamic_rank_cpu_overhead  # noqa: E402

# ------------------------------------------------------------------------------------ helpers

KINDS = ("query", "value")


def make_adapters(seed, *, layers=2, n_in=6, n_out=5, rank=3, gated=True, dtype=jnp.float32,
                  stack=()):
  """{"encoder": {"layer": {"i": {kind: {"lora_a", "lora_b"(, "lora_c")}}}}} with random factors."""
  rng = np.random.default_rng(seed)
  tree = {}
  for layer in range(layers):
    for kind in KINDS:
      node = {"lora_a": jnp.asarray(rng.normal(size=stack + (n_in, rank)), dtype),
              "lora_b": jnp.asarray(rng.normal(size=stack + (rank, n_out)), dtype)}
      if gated:
        node["lora_c"] = jnp.asarray(rng.normal(size=stack + (rank,)), dtype)
      tree.setdefault(str(layer), {})[kind] = node
  return {"encoder": {"layer": tree}}


def nodes(tree):
  return [(f"{i}.{k}", tree["encoder"]["layer"][i][k])
          for i in tree["encoder"]["layer"] for k in tree["encoder"]["layer"][i]]


def random_grads(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  # Drawn in float32: a bfloat16 draw is exactly 0 about once in 256.
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape).astype(x.dtype)
                                      for k, x in zip(keys, leaves)])


def component_alive(node):
  """Components that still contribute (non-zero gate / non-zero A column and B row)."""
  if "lora_c" in node:
    return np.asarray(node["lora_c"]) != 0
  return (np.any(np.asarray(node["lora_a"]) != 0, axis=-2)
          & np.any(np.asarray(node["lora_b"]) != 0, axis=-1))


def masked_are_zero(node, mask):
  """True iff every masked component's parameters are exactly zero."""
  dead = ~np.asarray(mask)
  if "lora_c" in node:
    return bool(np.all(np.asarray(node["lora_c"], np.float32)[dead] == 0))
  a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
  return bool(np.all(np.swapaxes(a, -1, -2)[dead] == 0) and np.all(b[dead] == 0))


def f64(x):
  return np.asarray(x, np.float64)


def product64(node):
  """A·diag(c)·B in float64."""
  a = f64(node["lora_a"])
  c = f64(node["lora_c"]) if "lora_c" in node else np.ones(a.shape[:-2] + a.shape[-1:])
  return (a * np.expand_dims(c, -2)) @ f64(node["lora_b"])


def run(optimizer, params, steps, grad_key=0, record=None):
  """Trains on random gradients; ``record(step, params, state)`` after each step."""
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for step, key in enumerate(jax.random.split(jax.random.key(grad_key), steps), start=1):
    updates, state = update(random_grads(params, key), state, params)
    params = optax.apply_updates(params, updates)
    if record is not None:
      record(step, params, state)
  return params, state


def event_step(params, config, count):
  """The transform's update at step ``count + 1`` with zero updates (the params stay), after
  ``count`` steps of other history: returns (params after, the transform's state)."""
  transform = dynamic_rank(config)
  state = transform.init(params)._replace(count=jnp.asarray(count, jnp.int32))
  updates, state = jax.jit(transform.update)(jax.tree.map(jnp.zeros_like, params), state, params)
  return optax.apply_updates(params, updates), state


# ------------------------------------------------------------------ schedule vs the reference


def reference_schedule(max_step, interval, start_ratio=0.15, end_ratio=0.5):
  """A literal transcription of the official code (MIkumikumi0116/DoRA,
  Src/Finetune_And_Benchmark/Finetune_Utils.py, Adaptive_Lora_Model_Wrapper) driven by the loop
  of Finetune_And_Benchmark.py (``step_num += 1``, regularization_loss(step_num), backward,
  optimizer.step(), prune_lora_scaler(step_num)). Returns the steps whose pruning branch runs,
  with (current_prune_step, max_prune_step), the steps that update the EMA and the steps whose
  loss includes the DEM term."""
  def get_prune_step(current_step):
    current_prune_step = int(current_step - max_step * start_ratio)
    max_prune_step = int(max_step * (1 - start_ratio - end_ratio))
    return current_prune_step, max_prune_step

  prunes, ema, dem = {}, [], []
  for step_num in range(1, max_step + 1):
    current_prune_step, max_prune_step = get_prune_step(step_num)       # regularization_loss
    if not current_prune_step > max_prune_step:
      dem.append(step_num)
    current_prune_step, max_prune_step = get_prune_step(step_num)       # prune_lora_scaler
    if current_prune_step > max_prune_step:
      continue
    ema.append(step_num)                                                # update_importance_score
    if current_prune_step < 0:
      continue
    if not (current_prune_step % interval == 0 or current_prune_step == max_prune_step):
      continue
    prunes[step_num] = (current_prune_step, max_prune_step)
  return prunes, ema, dem


def reference_pruned(n_components, start_rank, end_rank, current_prune_step, max_prune_step):
  """The reference's count at a pruning call: ``max(int(numel·rate), 1)`` (kthvalue's k)."""
  prune_rank_rate = ((start_rank - end_rank) / start_rank) * (
      (current_prune_step / max_prune_step) ** 3)
  prune_rank_num = int(n_components * prune_rank_rate)
  return max(prune_rank_num, 1)


@pytest.mark.parametrize("interval", [10, 1, 7, 50])
def test_events_and_cutoffs_equal_the_reference_for_every_total_steps(interval):
  for total in range(20, 1001):
    config = DynamicRankConfig(total, 2, interval=interval)
    prunes, ema, dem = reference_schedule(total, interval)
    # Our events are the reference's pruning calls with k > 0, with the same k...
    assert config.events == {t: k for t, (k, _) in prunes.items() if k > 0}, total
    # ...and the calls we leave out are exactly its p = 0 calls, where only max(., 1) prunes.
    assert {t for t, (k, _) in prunes.items() if k == 0} == {
        t for t in range(1, total + 1) if int(t - total * 0.15) == 0}, total
    # EMA, DEM and the final mask all switch at the last event.
    assert ema == dem == list(range(1, config.last_event + 1)), total
    assert config.events[config.last_event] == int(total * (1 - 0.15 - 0.5)), total
  assert list(pruning_events(201)) == list(range(41, 102, 10))
  # T = 180: 180·0.35 is 62.99999999999999 in floating point, so K = 62 (last event at 89).
  assert pruning_events(180) == {27 + k: k for k in (10, 20, 30, 40, 50, 60, 62)}


def test_live_counts_are_exact_and_differ_from_the_reference_only_where_documented():
  fewer, at_least_one = 0, 0
  for n_kernels, r_init, r_target in [(4, 3, 2), (7, 12, 8), (27, 2, 1), (12, 3, 1)]:
    n, budget = n_kernels * r_init, n_kernels * r_target
    for total in range(20, 1001, 7):
      config = DynamicRankConfig(total, r_target, initial_rank_factor=r_init / r_target)
      last = config.events[config.last_event]
      for t, live in config.live_counts(n, budget).items():
        k = config.events[t]
        exact = math.floor(n * Fraction(r_init - r_target, r_init) * Fraction(k, last) ** 3)
        assert n - live == exact, (total, t)
        theirs = reference_pruned(n, r_init, r_target, k, last)
        if theirs == n - live:
          continue
        if exact == 0 and theirs == 1:           # max(int(.), 1) at an early event
          at_least_one += 1
        else:                                    # float int() one below the exact integer
          assert theirs == exact - 1, (total, t, theirs, exact)
          fewer += 1
      assert config.live_counts(n, budget)[config.last_event] == budget
  assert fewer > 0 and at_least_one > 0
  # The documented example: N = 54, r' = 2, r = 1, k/K = 1/3.
  assert int(54 * (1 / 2) * (1 / 3) ** 3) == 0 and math.floor(54 * Fraction(1, 2) / 27) == 1


@pytest.mark.parametrize("gated", [True, False])
def test_schedule_events_live_counts_and_final_budget(gated):
  total, r_init, r_target = 600, 3, 2
  config = DynamicRankConfig(total, r_target, gated=gated)
  params = make_adapters(0, gated=gated)
  n_kernels = len(nodes(params))
  n, budget = n_kernels * r_init, n_kernels * r_target
  assert list(config.events) == list(range(100, 301, 10)) and config.last_event == 300
  live_counts = config.live_counts(n, budget)
  dead_after, masks_after = {}, {}

  def record(step, params, state):
    dr = state[1]
    dead_after[step] = sum(int((~component_alive(node)).sum()) for _, node in nodes(params))
    masks_after[step] = sum(int(np.sum(m)) for m in jax.tree.leaves(dr.mask))
    assert int(dr.count) == step

  # Plain SGD on random gradients: every entry moves every step, so a component is exactly zero
  # after a step iff the transform zeroed it in that step.
  run(optax.chain(optax.sgd(1e-2), dynamic_rank(config)), params, total, record=record)
  for step in range(1, total + 1):
    if step in live_counts:
      assert masks_after[step] == live_counts[step], step
      assert dead_after[step] == n - live_counts[step], step
    elif step < 300:
      # Between events pruned components revive (hard=False): nothing is zero.
      assert dead_after[step] == 0, step
    else:
      assert dead_after[step] == n - budget and masks_after[step] == budget, step
  # The budget really prunes before the end (not only at the last event).
  assert 0 < n - live_counts[250] < n - budget


def test_ties_are_broken_by_tree_order():
  # All components identical: the global ranking keeps the first ones in the tree's order.
  rng = np.random.default_rng(1)
  column, row = rng.normal(size=(6, 1)), rng.normal(size=(1, 5))
  same = {"lora_a": jnp.asarray(np.tile(column, (1, 3)), jnp.float32),
          "lora_b": jnp.asarray(np.tile(row, (3, 1)), jnp.float32), "lora_c": jnp.ones(3)}
  params = {"encoder": {"layer": {i: {k: dict(same) for k in KINDS} for i in ("0", "1")}}}
  config = DynamicRankConfig(20, 1, initial_rank_factor=3.0, warmup_frac=0.0, final_frac=0.0,
                             interval=20)
  assert config.events == {20: 20}
  _, state = event_step(params, config, 19)
  masks = np.concatenate([np.asarray(m) for m in jax.tree.leaves(state.mask)])
  assert masks.tolist() == [True] * 4 + [False] * 8
  assert rank_pattern(state) == {"encoder.layer.0.query": 3, "encoder.layer.0.value": 1,
                                 "encoder.layer.1.query": 0, "encoder.layer.1.value": 0}


def test_per_kernel_targets():
  params = make_adapters(2, layers=1, rank=3)
  params["encoder"]["layer"]["0"]["value"] = make_adapters(3, layers=1, rank=2)[
      "encoder"]["layer"]["0"]["value"]
  targets = {"encoder.layer.0.query": 2, "encoder.layer.0.value": 1}   # r' = 3 and 2
  config = DynamicRankConfig(40, targets)
  lora = config.lora_config(LoRAConfig(rank=2, alpha=4.0, targets=KINDS))
  assert lora.gated and lora.rank_pattern == {"encoder.layer.0.query": 3,
                                              "encoder.layer.0.value": 2}
  assert [lora.rank_for(tuple(p.split("."))) for p in targets] == [3, 2]
  _, state = run(optax.chain(optax.sgd(1e-2), dynamic_rank(config)), params, 40)
  assert sum(rank_pattern(state).values()) == 3
  with pytest.raises(ValueError, match="names no adapter at .*encoder.layer.9.key"):
    dynamic_rank(DynamicRankConfig(40, {**targets, "encoder.layer.9.key": 1})).init(params)
  with pytest.raises(ValueError, match="no entry for adapter 'encoder.layer.0.value'"):
    dynamic_rank(DynamicRankConfig(40, {"encoder.layer.0.query": 2})).init(params)


@pytest.mark.parametrize("fields,match", [
    (dict(target_rank=0), "target_rank must be an int >= 1"),
    (dict(target_rank={"a.q": 0}), "target_rank must be an int >= 1"),
    (dict(target_rank={}), "target_rank must be"),
    (dict(target_rank=2.0), "target_rank must be"),
    (dict(total_steps=0), "total_steps must be an int >= 1"),
    (dict(total_steps=2), "no pruning event in 2 steps"),
    (dict(warmup_frac=0.6), "warmup_frac \\+ final_frac < 1"),
    (dict(final_frac=-0.1), "final_frac >= 0"),
    (dict(interval=0), "interval must be an int >= 1"),
    (dict(beta=1.0), "beta must be in"),
    (dict(initial_rank_factor=0.5), "initial_rank_factor must be a number >= 1"),
    (dict(dem_weight=-1.0), "dem_weight must be a finite number >= 0"),
    (dict(hard="yes"), "hard must be True or False"),
    (dict(score="magnitude"), "score must be one of"),
])
def test_bad_configs_raise_clear_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    DynamicRankConfig(**{"total_steps": 100, "target_rank": 2, **fields})


def test_inconsistent_adapters_and_misuse_raise():
  config = DynamicRankConfig(40, 2)                           # expects gated adapters of rank 3
  with pytest.raises(ValueError, match=r"adapter 'encoder.layer.0.query' has rank 4, expected "
                                       r"r' = ceil\(1.5·2\) = 3"):
    dynamic_rank(config).init(make_adapters(0, rank=4))
  with pytest.raises(ValueError, match="'encoder.layer.0.query' has no gates 'lora_c'.*gated=True"):
    dynamic_rank(config).init(make_adapters(0, gated=False))
  with pytest.raises(ValueError, match="has gates 'lora_c'.*gated=False"):
    dynamic_rank(DynamicRankConfig(40, 2, gated=False)).init(make_adapters(0))
  broken = make_adapters(0)
  broken["encoder"]["layer"]["1"]["value"]["lora_c"] = jnp.ones(2)
  with pytest.raises(ValueError, match="encoder.layer.1.value.*lora_c of shape"):
    dynamic_rank(config).init(broken)
  with pytest.raises(ValueError, match="found no adapter nodes"):
    dynamic_rank(config).init({"dense": {"kernel": jnp.ones((2, 2))}})
  with pytest.raises(ValueError, match="ranks come from DynamicRankConfig.target_rank"):
    config.lora_config(LoRAConfig(rank=2, targets="query", rank_pattern={"query": 1}))
  with pytest.raises(TypeError, match="takes a DynamicRankConfig"):
    dynamic_rank(40)
  with pytest.raises(TypeError, match="takes a DynamicRankConfig"):
    dem_regularizer(0.1)
  params = make_adapters(0)
  with pytest.raises(ValueError, match="needs the current parameters"):
    dynamic_rank(config).update(params, dynamic_rank(config).init(params))


# ------------------------------------------------------------- finding the state, chain order


def test_rank_pattern_finds_the_state_in_any_optax_state():
  params = make_adapters(4, layers=1)
  config = DynamicRankConfig(40, 2)
  nested = optax.chain(optax.chain(optax.clip_by_global_norm(1.0),
                                   optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)),
                       optax.chain(optax.identity(), dynamic_rank(config)))
  for optimizer in (nested, optax.MultiSteps(nested, every_k_schedule=1),
                    optax.chain(optax.masked(optax.sgd(1e-2), {"encoder": True}),
                                dynamic_rank(config))):
    _, state = run(optimizer, params, 40)
    found = [leaf for leaf in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, DynamicRankState))
             if isinstance(leaf, DynamicRankState)]
    assert len(found) == 1 and rank_pattern(state) == rank_pattern(found[0].mask)
    assert sum(rank_pattern(state).values()) == 4
  twice = optax.chain(optax.sgd(1e-2), dynamic_rank(config), dynamic_rank(config))
  with pytest.raises(ValueError, match="holds 2 DynamicRankStates"):
    rank_pattern(twice.init(params))
  with pytest.raises(ValueError, match="DynamicRankState .* or a tree of boolean masks"):
    rank_pattern(optax.adam(1e-2).init(params))
  with pytest.raises(ValueError, match="DynamicRankState .* or a tree of boolean masks"):
    shrink(params, {})


@pytest.mark.parametrize("hard", [False, True])
def test_dynamic_rank_not_last_in_the_chain_is_detected(hard):
  params = make_adapters(5)
  config = DynamicRankConfig(40, 2, hard=hard)
  good = optax.chain(optax.adam(1e-2), dynamic_rank(config))
  final, state = run(good, params, 40)
  assert int(state[1].misordered) == 0 and sum(rank_pattern(state).values()) == 8
  shrink(final, state)
  # First in the chain: Adam turns its "-param" updates into something else, the gates stay.
  bad = optax.chain(dynamic_rank(config), optax.adam(1e-2))
  steps = []
  final, state = run(bad, params, 40,
                     record=lambda step, p, s: steps.append((step, int(s[0].misordered))))
  first = min(step for step, count in steps if count)
  assert first == min(config.events) + 1     # the step after the first zeroing
  for call in (lambda: rank_pattern(state), lambda: shrink(final, state)):
    with pytest.raises(ValueError, match="not the last transform of the optimizer chain"):
      call()


# ------------------------------------------------------------------------------------- scores


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 7), st.sampled_from([(), (2,)]),
       st.integers(0, 2 ** 31 - 1))
def test_norm_ratio_equals_brute_force_and_invariances(rank, n_in, n_out, stack, seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=stack + (n_in, rank))
  b = rng.normal(size=stack + (rank, n_out))
  c = rng.normal(size=stack + (rank,))
  components = np.einsum("...ni,...i,...io->...ino", a, c, b)        # the r x n_in x n_out tensor
  total = np.linalg.norm(components.sum(-3), axis=(-2, -1))
  brute = np.linalg.norm(components, axis=(-2, -1)) / (total[..., None] + 1e-8)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  scores = jax.jit(norm_ratio_scores)              # one compilation per drawn shape
  closed = scores(f32(a), f32(b), f32(c))
  np.testing.assert_allclose(closed, brute, rtol=2e-4, atol=1e-6)
  # Scaling every gate by k, or moving a factor k from A[:, i] into c_i, changes nothing.
  np.testing.assert_allclose(scores(f32(a), f32(b), f32(3.5 * c)), closed, rtol=1e-5,
                             atol=1e-6)
  k = np.ones(rank)
  k[0] = 4.0
  np.testing.assert_allclose(scores(f32(a / k), f32(b), f32(k * c)), closed, rtol=1e-5,
                             atol=1e-6)
  # Plain form: c = 1.
  np.testing.assert_allclose(scores(f32(a), f32(b)),
                             scores(f32(a), f32(b), jnp.ones(stack + (rank,))), rtol=1e-6)


def test_norm_ratio_keeps_float32_accuracy_when_components_nearly_cancel():
  rng = np.random.default_rng(0)
  a, n, a3 = rng.normal(size=(3, 64))
  b, m, b3 = rng.normal(size=(3, 48))
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  A, B = f32(np.stack([a, a + 1e-4 * n, a3], 1)), f32(np.stack([b, b + 1e-4 * m, b3], 0))
  c = f32([1.0, -1.0, 3e-5])
  # float64 reference from the very float32 inputs, through the n_in x n_out product
  delta = (f64(A) * f64(c)) @ f64(B)
  exact = (np.abs(f64(c)) * np.linalg.norm(f64(A), axis=0) * np.linalg.norm(f64(B), axis=1)
           / (np.linalg.norm(delta) + 1e-8))
  assert 0.15 < exact[2] < 0.2                     # the small third component: a real share
  ours = np.asarray(norm_ratio_scores(jnp.asarray(A), jnp.asarray(B), jnp.asarray(c)))
  np.testing.assert_allclose(ours, exact, rtol=1e-3)
  # The Gram expansion c^T((A^T A) o (B B^T))c in float32 (the former closed form) is far off:
  # the test can tell the two apart.
  gram = np.sqrt(max(c @ ((A.T @ A) * (B @ B.T)) @ c, 0.0))
  third = abs(c[2]) * np.linalg.norm(A[:, 2]) * np.linalg.norm(B[2]) / (gram + 1e-8)
  assert abs(third / exact[2] - 1) > 0.5


def test_zeroing_a_gate_equals_deleting_the_component():
  node = nodes(make_adapters(3, n_in=7, n_out=4, rank=4))[0][1]
  a, b, c = (np.asarray(node[k], np.float64) for k in ("lora_a", "lora_b", "lora_c"))
  x = np.random.default_rng(0).normal(size=(5, 7))
  c_zeroed = c.copy()
  c_zeroed[2] = 0.0
  keep = [0, 1, 3]
  np.testing.assert_allclose(((x @ a) * c_zeroed) @ b, ((x @ a[:, keep]) * c[keep]) @ b[keep],
                             rtol=1e-12)
  # And its score is exactly zero, while the others are the deleted model's scores.
  f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
  scores = norm_ratio_scores(f32(a), f32(b), f32(c_zeroed))
  assert scores[2] == 0.0
  np.testing.assert_allclose(scores[np.array(keep)],
                             norm_ratio_scores(f32(a[:, keep]), f32(b[keep]), f32(c[keep])),
                             rtol=1e-5)


def test_sensitivity_score_is_the_ema_of_theta_times_grad():
  params = make_adapters(4, layers=1)
  optimizer = optax.chain(optax.sgd(0.1), dynamic_rank(
      DynamicRankConfig(100, 2, score="sensitivity", beta=0.5)))
  state = optimizer.init(params)
  grads = random_grads(params, jax.random.key(1))
  with pytest.raises(ValueError, match="grads=grads"):
    optimizer.update(grads, state, params)
  updates, state = jax.jit(optimizer.update)(grads, state, params, grads=grads)
  new = optax.apply_updates(params, updates)
  for (path, node), (_, grad) in zip(nodes(new), nodes(grads)):
    theta_g = {k: np.abs(np.asarray(node[k]) * np.asarray(grad[k])) for k in node}
    expected = 0.5 * (theta_g["lora_a"].sum(0) + theta_g["lora_b"].sum(1) + theta_g["lora_c"])
    layer, kind = path.split(".")
    np.testing.assert_allclose(state[1].scores["encoder"]["layer"][layer][kind], expected,
                               rtol=1e-6)
  np.testing.assert_allclose(sensitivity_scores(nodes(new)[0][1], nodes(grads)[0][1]),
                             np.asarray(state[1].scores["encoder"]["layer"]["0"]["query"]) / 0.5,
                             rtol=1e-6)


# ---------------------------------------------------------------------- exact zeros, permanence


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_components_stay_exactly_zero_with_live_moments(gated, dtype):
  config = DynamicRankConfig(60, 2, gated=gated)      # events at 19, 29, 30; final mask after
  params = make_adapters(5, gated=gated, dtype=dtype)
  checked = []

  def record(step, params, state):
    adam, dr = state[0][0], state[1]
    if step >= config.last_event:
      for (path, node), (_, mask) in zip(nodes(params), nodes(dr.mask)):
        assert masked_are_zero(node, mask), (step, path)
        assert node["lora_a"].dtype == dtype
      # The optimiser still pushes the pruned entries: its moments there are not zero.
      name = "lora_c" if gated else "lora_b"
      mu = np.concatenate([np.asarray(node[name], np.float32).reshape(-1)
                           for _, node in nodes(adam.mu)])
      dead = np.concatenate([np.broadcast_to(~np.asarray(m)[..., None] if not gated
                                             else ~np.asarray(m), np.asarray(node[name]).shape)
                             .reshape(-1) for (_, m), (_, node) in zip(nodes(dr.mask),
                                                                      nodes(params))])
      assert dead.any() and np.all(mu[dead] != 0)
      checked.append(step)

  run(optax.chain(optax.adam(5e-2), dynamic_rank(config)), params, 60, record=record)
  assert checked == list(range(30, 61))


@pytest.mark.parametrize("hard", [False, True])
def test_revive_brings_pruned_gates_back_only_when_not_hard(hard):
  config = DynamicRankConfig(200, 2, hard=hard)       # events at 40, 50, ..., 100
  params = make_adapters(6)
  revived = []
  previous = {}

  def record(step, params, state):
    dr = state[1]
    for (path, node), (_, mask) in zip(nodes(params), nodes(dr.mask)):
      was_pruned = previous.get(path)
      if was_pruned is not None and step < config.last_event:
        revived.append(bool(np.any(np.asarray(node["lora_c"])[was_pruned] != 0)))
      if hard:
        assert masked_are_zero(node, mask), (step, path)
      previous[path] = ~np.asarray(mask)

  _, state = run(optax.chain(optax.adam(5e-2), dynamic_rank(config)), params, 200,
                 record=record)
  assert any(revived) != hard
  assert sum(rank_pattern(state).values()) == 2 * len(nodes(params))


# ------------------------------------------------------------------------------- shrink, DEM


@pytest.mark.parametrize("gated", [True, False])
def test_shrink_preserves_outputs_and_counts(gated):
  params = make_adapters(8, n_in=9, n_out=7, rank=4, gated=gated)
  config = DynamicRankConfig(30, 2, initial_rank_factor=2.0, warmup_frac=0.0, final_frac=0.0,
                             interval=30, gated=gated, beta=0.0)
  # beta = 0: the event ranks this step's scores alone; it keeps the global top 8 of 16.
  pruned, state = event_step(params, config, 29)
  pattern = rank_pattern(state)
  assert sum(pattern.values()) == 8 and len(set(pattern.values())) > 1
  small = shrink(pruned, state)
  x = np.random.default_rng(1).normal(size=(3, 9)).astype(np.float32)
  count = 0
  for (path, node), (_, new) in zip(nodes(pruned), nodes(small)):
    # Folding c into B rounds c·B once to float32: outputs agree to rtol 1e-6 of their scale.
    expected = f64(x) @ product64(node)
    np.testing.assert_allclose(f64(x) @ f64(new["lora_a"]) @ f64(new["lora_b"]), expected,
                               rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert set(new) == {"lora_a", "lora_b"}
    assert new["lora_a"].shape == (9, pattern["encoder.layer." + path])
    count += sum(v.size for v in new.values())
  assert count == sum(pattern.values()) * (9 + 7)
  # A masked component that still contributes cannot be dropped silently.
  with pytest.raises(ValueError, match="not zero: shrink after the last pruning event"):
    shrink(params, state)


def test_shrink_of_stacked_nodes_pads_to_the_largest_slice():
  params = make_adapters(9, layers=1, rank=3, stack=(2,))
  query = jnp.array([[True, False, True], [False, False, True]])
  mask = {"encoder": {"layer": {"0": {"query": query,
                                      "value": jnp.array([[True] * 3, [False] * 3])}}}}
  params["encoder"]["layer"]["0"]["query"]["lora_c"] *= mask["encoder"]["layer"]["0"]["query"]
  params["encoder"]["layer"]["0"]["value"]["lora_c"] *= mask["encoder"]["layer"]["0"]["value"]
  assert rank_pattern(mask) == {"encoder.layer.0.query": [2, 1], "encoder.layer.0.value": [3, 0]}
  small = shrink(params, mask)
  for (_, node), (_, new) in zip(nodes(params), nodes(small)):
    expected = product64(node)
    np.testing.assert_allclose(f64(new["lora_a"]) @ f64(new["lora_b"]), expected, rtol=1e-6,
                               atol=1e-6 * np.abs(expected).max())
  assert small["encoder"]["layer"]["0"]["query"]["lora_a"].shape == (2, 6, 2)


def test_dem_equals_its_closed_form_and_switches_off_after_pruning():
  params = make_adapters(10, layers=2, n_in=6, n_out=5, rank=3, stack=(2,))
  variances = []
  for _, node in nodes(params):
    a, b = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_b"], np.float64)
    for s in range(2):
      for i in range(3):
        variances += [np.var(a[s, :, i], ddof=1), np.var(b[s, i, :], ddof=1)]
  np.testing.assert_allclose(jax.jit(dem_penalty)(params), np.mean(variances), rtol=1e-6)
  # And it is differentiable: d/dA of var is 2(a - mean)/(n - 1) / (2·Σr').
  grad = jax.grad(dem_penalty)(params)["encoder"]["layer"]["0"]["query"]["lora_a"]
  a = np.asarray(params["encoder"]["layer"]["0"]["query"]["lora_a"])
  expected = 2 * (a - a.mean(-2, keepdims=True)) / 5 / len(variances)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)
  config = DynamicRankConfig(600, 2, dem_weight=0.3)
  regularizer = jax.jit(dem_regularizer(config))
  values = [float(regularizer(params, jnp.asarray(step))) for step in range(600)]
  # Step index s computes the loss of the reference's step t = s + 1: DEM while t <= t_e = 300.
  on = [v != 0 for v in values]
  assert on == [True] * 300 + [False] * 300
  np.testing.assert_allclose(values[0], 0.3 * np.mean(variances), rtol=1e-6)
  assert float(dem_regularizer(DynamicRankConfig(600, 2))(params, 0)) == 0.0   # weight 0: off


# ------------------------------------------------------------------ memory, speed, sharding


def _largest_intermediate(closed_jaxpr):
  def walk(jaxpr):
    sizes = [math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
    return max(sizes + [walk(sub) for sub in subjaxprs(jaxpr)], default=0)
  return walk(closed_jaxpr.jaxpr)


@pytest.mark.parametrize("score", ["norm_ratio", "sensitivity"])
def test_no_n_in_by_n_out_intermediate_in_the_jaxpr(score):
  n_in, n_out, rank = 64, 48, 3
  params = make_adapters(11, layers=1, n_in=n_in, n_out=n_out, rank=rank, stack=(2,))
  optimizer = optax.chain(optax.adam(1e-3), dynamic_rank(DynamicRankConfig(100, 2, score=score)))
  state = optimizer.init(params)
  grads = random_grads(params, jax.random.key(0))
  jaxpr = jax.make_jaxpr(lambda g, s, p: optimizer.update(g, s, p, grads=g))(grads, state, params)
  assert _largest_intermediate(jaxpr) < n_in * n_out
  # The checker does see a product-sized tensor when one is built.
  node = nodes(params)[0][1]
  brute = jax.make_jaxpr(lambda a, b: jnp.linalg.norm(a[..., :, None, :] * b.mT[..., None, :, :],
                                                      axis=(-3, -2)))(node["lora_a"],
                                                                      node["lora_b"])
  assert _largest_intermediate(brute) >= n_in * n_out


def test_a_step_without_an_event_passes_every_update_through():
  """On one layer of the model of benchmarks/dynamic_rank_cpu_overhead.py (which times the same
  two steps on six)."""
  params, loss, _ = dynamic_rank_cpu_overhead.problem(num_layers=1)
  results = {name: dynamic_rank_cpu_overhead.train_step(loss, optimizer)(
      params, optimizer.init(params))[0]
      for name, optimizer in dynamic_rank_cpu_overhead.optimizers().items()}
  chex.assert_trees_all_equal(results["adamw"], results["adamw+dynamic_rank"])


def test_sharded_ranking_and_masks_equal_single_device():
  assert len(jax.devices()) == 8
  params = make_adapters(12, layers=2, n_in=16, n_out=24, rank=4)
  optimizer = optax.chain(optax.adam(5e-2), dynamic_rank(
      DynamicRankConfig(40, 2, initial_rank_factor=2.0)))   # events at 16, 20; enforced after
  mesh = Mesh(np.array(jax.devices()), ("model",))

  def shard(path, leaf):
    name = path[-1].key
    spec = {"lora_a": PartitionSpec("model", None), "lora_b": PartitionSpec(None, "model"),
            "lora_c": PartitionSpec()}[name]
    return jax.device_put(leaf, NamedSharding(mesh, spec))

  sharded = jax.tree_util.tree_map_with_path(shard, params)
  assert nodes(sharded)[0][1]["lora_a"].sharding.spec == PartitionSpec("model", None)
  masks = {}
  for name, start in [("single", params), ("sharded", sharded)]:
    history = []
    final, _ = run(optimizer, start, 40,
                   record=lambda step, p, s: history.append((s[1].mask, s[1].scores)))
    masks[name] = history
  # The sharded run stayed sharded (jit propagates the input shardings).
  assert not nodes(final)[0][1]["lora_a"].sharding.is_fully_replicated
  for (mask_1, scores_1), (mask_8, scores_8) in zip(masks["single"], masks["sharded"]):
    chex.assert_trees_all_equal(mask_1, mask_8)
    chex.assert_trees_all_close(scores_1, scores_8, rtol=1e-5)


def test_state_round_trips_through_orbax(tmp_path):
  import orbax.checkpoint as ocp

  params = make_adapters(14, layers=1)
  params["head"] = jnp.ones((3,))                    # a non-adapter leaf: MaskedNode in the state
  optimizer = optax.chain(optax.adam(1e-2), dynamic_rank(DynamicRankConfig(40, 2)))
  _, state = run(optimizer, params, 25)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state",
                                  jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert isinstance(restored[1], DynamicRankState)
  chex.assert_trees_all_equal(restored, state)
  assert not all(bool(m.all()) for m in jax.tree.leaves(restored[1].mask))


# ----------------------------------------------------------------------------- with LoRA-Pro


def test_composes_with_lora_pro_in_the_plain_form():
  from lorapro_jax.lora_pro import lora_pro

  rng = np.random.default_rng(13)
  n_in = n_out = 8
  rank, scale, total = 3, 2.0, 60
  x = jnp.asarray(rng.normal(size=(32, n_in)), jnp.float32)
  # A rank-2 change of the identity map: reachable once every adapter is pruned to rank 2.
  low_rank = rng.normal(size=(n_in, 2)) @ rng.normal(size=(2, n_out)) / 2
  target = x + x @ jnp.asarray(low_rank, jnp.float32)
  params = {"dense": {str(i): {"lora_a": jnp.asarray(rng.normal(size=(n_in, rank)) / 3,
                                                     jnp.float32),
                               "lora_b": jnp.zeros((rank, n_out), jnp.float32)}
                      for i in range(2)}}

  def loss(p):
    h = x
    for i in range(2):
      h = h + scale * (h @ p["dense"][str(i)]["lora_a"]) @ p["dense"][str(i)]["lora_b"]
    return jnp.mean((h - target) ** 2)

  config = DynamicRankConfig(total, 2, gated=False)
  optimizer = optax.chain(lora_pro(5e-2, scale), dynamic_rank(config))
  state = optimizer.init(params)

  @jax.jit
  def train_step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  losses = []
  for step in range(1, total + 1):
    params, state, value = train_step(params, state)
    losses.append(float(value))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))
    if step >= config.last_event:
      masks = state[1].mask["dense"]
      assert sum(int(m.sum()) for m in masks.values()) == 4      # the global budget M·r
      for path in ("0", "1"):
        assert masked_are_zero(params["dense"][path], masks[path]), (step, path)
  assert losses[-1] < 0.1 * losses[0], losses[::10]


# ------------------------------------------- one config end to end: a tiny BERT, PEFT, PyTorch


def test_one_config_drives_transform_dem_shrink_and_a_peft_export_with_a_rank_0_kernel(tmp_path):
  """Configured once: the adapters come from ``config.lora_config``, the chain from
  ``dynamic_rank(config)``, the loss term from ``dem_regularizer(config)``. One kernel gets no
  gradient (``optax.masked``), so its gates stay 0 and the global budget prunes it to rank 0;
  shrink + export_peft drop its module, and PyTorch PEFT gives the Flax model's outputs."""
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model

  from lorapro_jax.inject import init_adapters, inject
  from lorapro_jax.peft_format import export_peft
  from lorapro_jax.trees import combine

  hf_config = transformers.BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=20,
                                      max_position_embeddings=16)
  flax_model = transformers.FlaxBertModel(hf_config, seed=0)
  flax_model.save_pretrained(tmp_path / "base")
  ids = np.random.default_rng(0).integers(3, 40, (2, 7)).astype(np.int32)
  ones = np.ones_like(ids)
  args = (ids, ones, np.zeros_like(ids), np.broadcast_to(np.arange(7, dtype=np.int32), ids.shape),
          np.ones((2, 2), np.int32))

  config = DynamicRankConfig(40, 2, interval=5, dem_weight=0.1)       # events at 11, 16, 20
  lora = config.lora_config(LoRAConfig(rank=2, alpha=4.0, targets=("query", "value")))
  assert (lora.rank, lora.gated) == (3, True)
  model = inject(flax_model.module, lora)
  trainable = init_adapters(model, flax_model.params, jax.random.key(1), *args)
  # An inconsistent combination is refused by the transform's init, naming the adapter.
  at_target = LoRAConfig(rank=2, targets=("query", "value"), gated=True)  # not at r' = 3
  wrong = init_adapters(inject(flax_model.module, at_target), flax_model.params,
                        jax.random.key(1), *args)
  with pytest.raises(ValueError, match="adapter 'encoder.layer.0.attention.self.query' has rank 2, "
                                       "expected r' = ceil"):
    dynamic_rank(config).init(wrong)

  frozen = ("encoder", "layer", "1", "attention", "self", "value")
  no_gradient = map_adapters(lambda path, node: {k: path == frozen for k in node}, trainable)
  optimizer = optax.chain(optax.masked(optax.set_to_zero(), no_gradient), optax.adam(3e-2),
                          dynamic_rank(config))
  regularizer = dem_regularizer(config)
  target = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 12)), jnp.float32)

  def task_loss(t):
    out = model.apply({"params": combine(flax_model.params, t)}, *args)[0]
    return jnp.mean((out - target) ** 2)

  @jax.jit
  def train_step(t, opt_state, step):
    dem = regularizer(t, step)
    grads = jax.grad(lambda t: task_loss(t) + regularizer(t, step))(t)
    updates, opt_state = optimizer.update(grads, opt_state, t)
    return optax.apply_updates(t, updates), opt_state, dem, dem_penalty(t)

  opt_state = optimizer.init(trainable)
  scores = []
  for step in range(config.total_steps):
    trainable, opt_state, dem, penalty = train_step(trainable, opt_state, jnp.asarray(step))
    # DEM is on exactly while the transform still scores: through the last event.
    expected = 0.1 * penalty if step + 1 <= config.last_event else 0.0
    np.testing.assert_allclose(dem, expected, rtol=1e-6)
    scores.append(jax.tree.leaves(opt_state[-1].scores))
  moved = lambda i: any(bool(jnp.any(a != b)) for a, b in zip(scores[i - 1], scores[i]))  # noqa
  assert moved(config.last_event - 1) and not any(moved(i) for i in range(config.last_event, 40))

  pattern = rank_pattern(opt_state)
  assert sum(pattern.values()) == 4 * 2 and pattern["encoder.layer.1.attention.self.value"] == 0
  shrunk = shrink(trainable, opt_state)
  for path, rank in pattern.items():
    node = shrunk
    for key in path.split("."):
      node = node[key]
    assert node["lora_a"].shape == (12, rank) and node["lora_b"].shape == (rank, 12)
  written = export_peft(shrunk, lora, tmp_path / "adapter", family="bert")
  assert written["exclude_modules"] == ["encoder.layer.1.attention.self.value"]

  ours = np.asarray(model.apply({"params": combine(flax_model.params, trainable)}, *args)[0])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    base = load_flax_checkpoint_in_pytorch_model(transformers.BertModel(hf_config),
                                                 str(tmp_path / "base" / "flax_model.msgpack"))
    loaded = peft.PeftModel.from_pretrained(base.eval(), str(tmp_path / "adapter"))
  adapted = {name.removeprefix("base_model.model."): module
             for name, module in loaded.named_modules()
             if isinstance(module, peft.tuners.lora.LoraLayer)}
  assert {name: module.r["default"] for name, module in adapted.items()} == {
      path: rank for path, rank in pattern.items() if rank}
  for name, module in adapted.items():    # the trained scale s = alpha / r' for every rank
    assert module.scaling["default"] == pytest.approx(lora.scale_for(tuple(name.split("."))),
                                                      rel=1e-12)
  with torch.no_grad():
    theirs = loaded(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(ones, dtype=torch.long))[0].numpy()
  base_out = np.asarray(flax_model.module.apply({"params": flax_model.params}, *args)[0])
  assert np.abs(ours - base_out).max() > 1e-2        # the adapters matter for the comparison
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ heatmap


def test_heatmap_cells_are_layers_by_matrix_types():
  cells = lambda figure: np.asarray(figure.axes[0].images[0].get_array()).tolist()  # noqa: E731
  ticks = lambda labels: [t.get_text() for t in labels]  # noqa: E731
  pattern = {"encoder.layer.0.attention.self.query": 3, "encoder.layer.0.attention.self.value": 1,
             "encoder.layer.1.attention.self.query": 2, "encoder.layer.1.attention.self.value": 0}
  figure = plot_rank_heatmap(pattern)
  assert cells(figure) == [[3, 2], [1, 0]]
  assert ticks(figure.axes[0].get_yticklabels()) == ["query", "value"]
  assert ticks(figure.axes[0].get_xticklabels()) == ["0", "1"]
  # BERT's three "dense" layers get the shortest suffixes that tell them apart.
  bert = {f"encoder.layer.{i}.{m}": i + 1 for i in (0, 2, 10)
          for m in ("attention.output.dense", "intermediate.dense", "output.dense")}
  figure = plot_rank_heatmap(bert)
  assert ticks(figure.axes[0].get_yticklabels()) == ["attention.output.dense",
                                                    "intermediate.dense", "output.dense"]
  assert ticks(figure.axes[0].get_xticklabels()) == ["0", "2", "10"]
  assert cells(figure) == [[1, 3, 11]] * 3
  # Stacked (scanned) entries: the position in the list is the layer.
  assert cells(plot_rank_heatmap({"model.layers.q_proj": [4, 2, 1]})) == [[4, 2, 1]]
  # Encoder and decoder blocks with the same number are different columns.
  t5 = plot_rank_heatmap({"encoder.block.0.layer.0.SelfAttention.q": 1,
                          "decoder.block.0.layer.0.SelfAttention.q": 2,
                          "decoder.block.0.layer.1.EncDecAttention.q": 3})
  assert ticks(t5.axes[0].get_xticklabels()) == ["encoder.block.0", "decoder.block.0"]
  assert ticks(t5.axes[0].get_yticklabels()) == ["SelfAttention.q", "EncDecAttention.q"]
  assert t5.axes[0].images[0].get_array().filled(-1).tolist() == [[1, 2], [-1, 3]]
  with pytest.raises(ValueError, match="pass cell="):
    plot_rank_heatmap({"a.0.q": 1, "b.0.q": 2}, cell=lambda path: (0, "q"))
  with pytest.raises(ValueError, match="no integer layer index"):
    plot_rank_heatmap({"head.q": 1})
  # An optimizer state works as well (the DynamicRankState is found inside it).
  state = (optax.EmptyState(), DynamicRankState(jnp.zeros([], jnp.int32), None,
                                                {"layer": {"3": {"q": jnp.array([True, False])}}},
                                                jnp.zeros([], jnp.int32)))
  assert cells(plot_rank_heatmap(state)) == [[1]]
