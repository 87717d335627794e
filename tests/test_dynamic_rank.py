"""DoRA dynamic rank (Mao et al. 2024, not weight-decomposed DoRA): schedule against the paper's
formula in exact fractions, scores against brute force, exact zeros after apply_updates (f32 and
bf16), revive vs hard pruning, shrink/DEM against closed forms, no n_in x n_out intermediate in the
jaxpr, sharded == single device, composition with LoRA-Pro, and the heatmap's cells."""
import math
import time
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.extend.core import subjaxprs
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorapro_jax.dynamic_rank import (
    DynamicRankConfig, DynamicRankState, dem_active, dem_penalty, dynamic_rank, dynamic_rank_init,
    dynamic_rank_step, initial_rank, norm_ratio_scores, plot_rank_heatmap, pruning_schedule,
    rank_pattern, sensitivity_scores, shrink)

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


def paper_live(t, total, r_init, r_target, n, warmup=0.15, final=0.5):
  """The issue's formula N - floor(N (r'-r)/r' p^3), p = (t - t_i)/(T - t_f - t_i), exactly."""
  t_i, t_f = Fraction(warmup) * total, Fraction(final) * total
  p = (t - t_i) / (total - t_f - t_i)
  return n - math.floor(n * Fraction(r_init - r_target, r_init) * p ** 3)


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


# ----------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("gated", [True, False])
def test_schedule_events_live_counts_and_final_budget(gated):
  total, r_init, r_target = 600, 3, 2
  params = make_adapters(0, gated=gated)
  n_kernels = len(nodes(params))
  n = n_kernels * r_init
  expected_events = list(range(90, 301, 10))
  assert list(pruning_schedule(total, n, n_kernels * r_target)) == expected_events
  dead_after, masks_after = {}, {}

  def record(step, params, state):
    dr = state[1]
    dead_after[step] = sum(int((~component_alive(node)).sum()) for _, node in nodes(params))
    masks_after[step] = sum(int(np.sum(m)) for m in jax.tree.leaves(dr.mask))
    assert int(dr.count) == step

  # Plain SGD on random gradients: every entry moves every step, so a component is exactly zero
  # after a step iff the transform zeroed it in that step.
  optimizer = optax.chain(optax.sgd(1e-2), dynamic_rank(total, r_target, interval=10))
  run(optimizer, params, total, record=record)
  for step in range(1, total + 1):
    if step in expected_events:
      live = paper_live(step, total, r_init, r_target, n)
      assert masks_after[step] == live, step
      assert dead_after[step] == n - live, step
    elif step < 300:
      # Between events pruned components revive (revive=True): nothing is zero.
      assert dead_after[step] == 0, step
    else:
      assert dead_after[step] == n - n_kernels * r_target, step
      assert masks_after[step] == n_kernels * r_target, step
  # The budget really prunes before the end (not only at the last event).
  assert 0 < n - paper_live(250, total, r_init, r_target, n) < n - n_kernels * r_target


def test_schedule_is_exact_where_floats_round_down():
  # N = 54, r' = 2, r = 1, p = 1/3 and 2/3: N·(r'-r)/r'·p³ is exactly 1 and 8, which floating point
  # evaluates to 0.999... and 7.999... (the reference's int() would prune one component too few).
  assert int(54 * (1 / 2) * (1 / 3) ** 3) == 0
  schedule = pruning_schedule(30, n_components=54, n_target=27, warmup_frac=0.0, final_frac=0.0,
                              interval=10)
  assert schedule == {t: paper_live(t, 30, 2, 1, 54, 0.0, 0.0) for t in (0, 10, 20, 30)}
  assert schedule == {0: 54, 10: 53, 20: 46, 30: 27}
  with pytest.raises(ValueError, match="warmup_frac"):
    DynamicRankConfig(100, 2, warmup_frac=0.6, final_frac=0.5)


def test_ties_are_broken_by_tree_order():
  # All components identical: the global ranking keeps the first ones in the tree's order.
  rng = np.random.default_rng(1)
  column, row = rng.normal(size=(6, 1)), rng.normal(size=(1, 5))
  same = {"lora_a": jnp.asarray(np.tile(column, (1, 3)), jnp.float32),
          "lora_b": jnp.asarray(np.tile(row, (3, 1)), jnp.float32), "lora_c": jnp.ones(3)}
  params = {"encoder": {"layer": {i: {k: dict(same) for k in KINDS} for i in ("0", "1")}}}
  config = DynamicRankConfig(total_steps=20, target_rank=1, warmup_frac=0.0, final_frac=0.0,
                             interval=20)
  state = dynamic_rank_init(params, config)._replace(count=jnp.asarray(19, jnp.int32))
  _, state = jax.jit(lambda p, s: dynamic_rank_step(p, s, config))(params, state)
  masks = np.concatenate([np.asarray(m) for m in jax.tree.leaves(state.mask)])
  assert masks.tolist() == [True] * 4 + [False] * 8
  assert rank_pattern(state) == {"encoder.layer.0.query": 3, "encoder.layer.0.value": 1,
                                 "encoder.layer.1.query": 0, "encoder.layer.1.value": 0}


def test_per_kernel_targets_and_bad_configs():
  params = make_adapters(2, layers=1, rank=3)
  targets = {"encoder.layer.0.query": 3, "encoder.layer.0.value": 1}
  optimizer = optax.chain(optax.sgd(1e-2), dynamic_rank(40, targets))
  _, state = run(optimizer, params, 40)
  assert sum(rank_pattern(state[1]).values()) == 4
  with pytest.raises(ValueError, match="exceeds its adapter rank"):
    dynamic_rank(40, 4).init(params)
  with pytest.raises(ValueError, match="names no adapter"):
    dynamic_rank(40, {**targets, "encoder.layer.9.key": 1}).init(params)
  with pytest.raises(KeyError, match="encoder.layer.0.value"):
    dynamic_rank(40, {"encoder.layer.0.query": 1}).init(params)
  with pytest.raises(ValueError, match="needs the current parameters"):
    dynamic_rank(40, 2).update(params, dynamic_rank(40, 2).init(params))
  with pytest.raises(ValueError, match="score must be one of"):
    dynamic_rank(40, 2, score="magnitude")
  assert initial_rank(8) == 12 and initial_rank(5) == 8


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
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  scores = jax.jit(norm_ratio_scores)              # one compilation per drawn shape
  closed = scores(f32(a), f32(b), f32(c))
  np.testing.assert_allclose(closed, brute, rtol=2e-4, atol=1e-6)
  # Scaling every gate by k, or moving a factor k from A[:, i] into c_i, changes nothing.
  np.testing.assert_allclose(scores(f32(a), f32(b), f32(3.5 * c)), closed, rtol=1e-5,
                             atol=1e-6)
  k = np.ones(rank); k[0] = 4.0
  np.testing.assert_allclose(scores(f32(a / k), f32(b), f32(k * c)), closed, rtol=1e-5,
                             atol=1e-6)
  # Plain form: c = 1.
  np.testing.assert_allclose(scores(f32(a), f32(b)),
                             scores(f32(a), f32(b), jnp.ones(stack + (rank,))))


def test_zeroing_a_gate_equals_deleting_the_component():
  node = nodes(make_adapters(3, n_in=7, n_out=4, rank=4))[0][1]
  a, b, c = (np.asarray(node[k], np.float64) for k in ("lora_a", "lora_b", "lora_c"))
  x = np.random.default_rng(0).normal(size=(5, 7))
  c_zeroed = c.copy(); c_zeroed[2] = 0.0
  keep = [0, 1, 3]
  np.testing.assert_allclose(((x @ a) * c_zeroed) @ b, ((x @ a[:, keep]) * c[keep]) @ b[keep],
                             rtol=1e-12)
  # And its score is exactly zero, while the others are the deleted model's scores.
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  scores = norm_ratio_scores(f32(a), f32(b), f32(c_zeroed))
  assert scores[2] == 0.0
  np.testing.assert_allclose(scores[np.array(keep)],
                             norm_ratio_scores(f32(a[:, keep]), f32(b[keep]), f32(c[keep])),
                             rtol=1e-6)


def test_sensitivity_score_is_the_ema_of_theta_times_grad():
  params = make_adapters(4, layers=1)
  optimizer = optax.chain(optax.sgd(0.1), dynamic_rank(100, 2, score="sensitivity", beta=0.5))
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
  total = 60                                     # events at 9, 19, 29, 30; final mask after 30
  params = make_adapters(5, gated=gated, dtype=dtype)
  config = DynamicRankConfig(total, 2)
  optimizer = optax.chain(optax.adam(5e-2), dynamic_rank(total, 2))
  checked = []

  def record(step, params, state):
    adam, dr = state[0][0], state[1]
    if step >= config.last_event:
      for (path, node), (_, mask) in zip(nodes(params), nodes(dr.final_mask)):
        assert masked_are_zero(node, mask), (step, path)
        assert node["lora_a"].dtype == dtype
      # The optimiser still pushes the pruned entries: its moments there are not zero.
      name = "lora_c" if gated else "lora_b"
      mu = np.concatenate([np.asarray(node[name], np.float32).reshape(-1)
                           for _, node in nodes(adam.mu)])
      dead = np.concatenate([np.broadcast_to(~np.asarray(m)[..., None] if not gated
                                             else ~np.asarray(m), np.asarray(node[name]).shape)
                             .reshape(-1) for (_, m), (_, node) in zip(nodes(dr.final_mask),
                                                                      nodes(params))])
      assert dead.any() and np.all(mu[dead] != 0)
      checked.append(step)

  run(optimizer, params, total, record=record)
  assert checked == list(range(30, total + 1))


@pytest.mark.parametrize("revive", [True, False])
def test_revive_brings_pruned_gates_back_only_when_allowed(revive):
  total = 200                                    # events at 30, 40, ..., 100
  params = make_adapters(6)
  revived = []
  previous = {}

  def record(step, params, state):
    dr = state[1]
    for (path, node), (_, mask) in zip(nodes(params), nodes(dr.mask)):
      was_pruned = previous.get(path)
      if was_pruned is not None and step < 100:
        revived.append(bool(np.any(np.asarray(node["lora_c"])[was_pruned] != 0)))
      if not revive:
        assert masked_are_zero(node, mask), (step, path)
      previous[path] = ~np.asarray(mask)

  optimizer = optax.chain(optax.adam(5e-2), dynamic_rank(total, 2, revive=revive))
  _, state = run(optimizer, params, total, record=record)
  assert any(revived) == revive
  assert sum(rank_pattern(state[1]).values()) == 2 * len(nodes(params))


class FunctionalFormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_functional_step_equals_the_transform(self):
    params = make_adapters(7, gated=False)
    config = DynamicRankConfig(40, 2, revive=False)
    optimizer = optax.chain(optax.adam(1e-2), dynamic_rank(40, 2, revive=False))
    adam = optax.adam(1e-2)
    chain_state, adam_state = optimizer.init(params), adam.init(params)
    dr_state = dynamic_rank_init(params, config)
    step = self.variant(dynamic_rank_step, static_argnums=2)
    chain_update, adam_update = jax.jit(optimizer.update), jax.jit(adam.update)
    mine, theirs = params, params
    for key in jax.random.split(jax.random.key(0), 40):
      updates, chain_state = chain_update(random_grads(mine, key), chain_state, mine)
      mine = optax.apply_updates(mine, updates)
      updates, adam_state = adam_update(random_grads(theirs, key), adam_state, theirs)
      theirs, dr_state = step(optax.apply_updates(theirs, updates), dr_state, config)
    chex.assert_trees_all_close(mine, theirs, rtol=1e-6)
    chex.assert_trees_all_equal(chain_state[1].mask, dr_state.mask)
    chex.assert_trees_all_close(chain_state[1].scores, dr_state.scores, rtol=1e-6)
    assert int(dr_state.count) == 40 and sum(rank_pattern(dr_state).values()) == 8
    for (_, node), (_, mask) in zip(nodes(theirs), nodes(dr_state.mask)):
      assert masked_are_zero(node, mask)


# ------------------------------------------------------------------------------- shrink, DEM


@pytest.mark.parametrize("gated", [True, False])
def test_shrink_preserves_outputs_and_counts(gated):
  params = make_adapters(8, n_in=9, n_out=7, rank=4, gated=gated)
  config = DynamicRankConfig(30, 2, warmup_frac=0.0, final_frac=0.0, interval=30)
  state = dynamic_rank_init(params, config)
  rng = np.random.default_rng(1)
  scores = jax.tree.map(lambda s: jnp.asarray(rng.uniform(size=s.shape), jnp.float32),
                        state.scores)
  state = state._replace(count=jnp.asarray(29, jnp.int32), scores=scores)
  # beta = 0.9: the step's own score counts 10 %; the event keeps the global top 8 of 16.
  pruned, state = dynamic_rank_step(params, state, config)
  pattern = rank_pattern(state)
  assert sum(pattern.values()) == 8 and len(set(pattern.values())) > 1
  small = shrink(pruned, state)
  x = rng.normal(size=(3, 9)).astype(np.float32)
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
  with pytest.raises(ValueError, match="not zero"):
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
  total = 600
  on = [bool(dem_active(step, total)) for step in range(total)]
  assert on == [True] * 300 + [False] * 300
  penalty = [float(dem_active(s, total) * dem_penalty(params)) for s in (0, 299, 300, 599)]
  assert penalty[0] == penalty[1] > 0 and penalty[2] == penalty[3] == 0.0
  assert bool(jax.jit(dem_active, static_argnums=1)(jnp.asarray(299), total))


# ------------------------------------------------------------------ memory, speed, sharding


def _largest_intermediate(closed_jaxpr):
  def walk(jaxpr):
    sizes = [math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
    return max(sizes + [walk(sub) for sub in subjaxprs(jaxpr)], default=0)
  return walk(closed_jaxpr.jaxpr)


@pytest.mark.parametrize("score", ["norm_ratio", "sensitivity"])
def test_no_n_in_by_n_out_intermediate_in_the_jaxpr(score):
  n_in, n_out, rank = 64, 48, 4
  params = make_adapters(11, layers=1, n_in=n_in, n_out=n_out, rank=rank, stack=(2,))
  optimizer = optax.chain(optax.adam(1e-3), dynamic_rank(100, 2, score=score))
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


def test_per_step_overhead_is_reported_and_updates_pass_through():
  """A small CPU model: 6 residual layers of MiniLM-L6-shaped kernels (4 of 384x384, 384x1536,
  1536x384), gated adapters r' = 12 on all 36, batch 64. Timings are printed, not asserted."""
  rng = np.random.default_rng(0)
  shapes = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "out": (384, 384),
            "ffn_in": (384, 1536), "ffn_out": (1536, 384)}
  layers = [str(i) for i in range(6)]
  base = {i: {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
              for k, s in shapes.items()} for i in layers}
  params = {"layer": {i: {k: {"lora_a": jnp.asarray(rng.normal(size=(n, 12)) / 20, jnp.float32),
                              "lora_b": jnp.asarray(rng.normal(size=(12, m)) / 20, jnp.float32),
                              "lora_c": jnp.zeros((12,), jnp.float32)}
                          for k, (n, m) in shapes.items()} for i in layers}}
  x = jnp.asarray(rng.normal(size=(64, 384)), jnp.float32)
  grads = jax.tree.map(lambda leaf: 1e-3 * jnp.ones_like(leaf), params)

  def dense(h, kernel, node):
    return h @ kernel + 2.0 * ((h @ node["lora_a"]) * node["lora_c"]) @ node["lora_b"]

  def loss(p):
    h = x
    for i in layers:
      for k in ("query", "key", "value", "out"):
        h = h + jnp.tanh(dense(h, base[i][k], p["layer"][i][k]))
      h = h + dense(jax.nn.gelu(dense(h, base[i]["ffn_in"], p["layer"][i]["ffn_in"])),
                    base[i]["ffn_out"], p["layer"][i]["ffn_out"])
    return jnp.mean(h ** 2)

  steps, results = {}, {}
  for name, optimizer in [("adamw", optax.adamw(1e-3)),
                          ("adamw+dynamic_rank", optax.chain(optax.adamw(1e-3),
                                                             dynamic_rank(1000, 8)))]:
    state = optimizer.init(params)

    def train_step(p, s, optimizer=optimizer):
      updates, s = optimizer.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, updates), s

    steps[f"{name} step"] = (jax.jit(train_step), (params, state))
    steps[f"{name} update"] = (jax.jit(optimizer.update), (grads, state, params))
    results[name] = jax.block_until_ready(steps[f"{name} step"][0](params, state))[0]
  for fn, args in steps.values():
    jax.block_until_ready(fn(*args))      # compiles
  runs = {name: [] for name in steps}
  for _ in range(10):                     # interleaved: a shared machine's load hits all alike
    for name, (fn, args) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      runs[name].append(1e3 * (time.perf_counter() - start))
  print("\nms on CPU, 10 interleaved runs: " + "; ".join(
      f"{name}: min {min(r):.2f} median {np.median(r):.2f}" for name, r in runs.items()))
  # Step 1 is no event: everything passes through bit for bit.
  chex.assert_trees_all_equal(results["adamw"], results["adamw+dynamic_rank"])


def test_sharded_ranking_and_masks_equal_single_device():
  assert len(jax.devices()) == 8
  params = make_adapters(12, layers=2, n_in=16, n_out=24, rank=4)
  total = 40                                        # events at 6, 16, 20; enforcement after
  optimizer = optax.chain(optax.adam(5e-2), dynamic_rank(total, 2))
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
    final, _ = run(optimizer, start, total,
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
  optimizer = optax.chain(optax.adam(1e-2), dynamic_rank(40, 2))
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

  optimizer = optax.chain(lora_pro(5e-2, scale), dynamic_rank(total, 2))
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
    if step >= 30:
      masks = state[1].final_mask["dense"]
      assert sum(int(m.sum()) for m in masks.values()) == 4      # the global budget M·r
      for path in ("0", "1"):
        assert masked_are_zero(params["dense"][path], masks[path]), (step, path)
  assert losses[-1] < 0.1 * losses[0], losses[::10]


# ------------------------------------------------------------------------------------ heatmap


def test_heatmap_cells_are_layers_by_matrix_types():
  cells = lambda figure: np.asarray(figure.axes[0].images[0].get_array()).tolist()
  ticks = lambda labels: [t.get_text() for t in labels]
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
  state = DynamicRankState(jnp.zeros([], jnp.int32), None,
                           {"layer": {"3": {"q": jnp.array([True, False])}}}, None)
  assert cells(plot_rank_heatmap(state)) == [[1]]
