"""LoRA-Pro: parity with the float64 reference vectors, the optax transforms, state, sharding,
optax composition (inject_hyperparams, apply_if_finite), and the PyTorch port lora-pro-adamw."""
import os
import re
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lorapro_jax.adapters import AdapterKeys
from lorapro_jax.lora_pro import (
    equivalent_gradient, lora_pro, lora_pro_adjust, lora_pro_full, lora_pro_project)

# Jitted once per module: eager dispatch of the many small ops dominates otherwise.
adjust = jax.jit(lora_pro_adjust, static_argnames=("y", "ridge"))
jit_equivalent = jax.jit(equivalent_gradient, static_argnames=("ridge",))
OPTIMIZERS = {"efficient": lora_pro, "full": lora_pro_full}


def sylvester_y(a, b, grad_a, grad_b, s, ridge=1e-8):
  """The Y that ``y="sylvester"`` used, read off the library's own output: the two choices of Y
  differ in gA by exactly ``A·Y``, so ``Y = pinv(A)·(gA_sylvester − gA_zero)``."""
  sylvester = lora_pro_adjust(a, b, grad_a, grad_b, s, ridge=ridge)[0]
  zero = lora_pro_adjust(a, b, grad_a, grad_b, s, y="zero", ridge=ridge)[0]
  return jnp.linalg.pinv(a) @ (sylvester - zero)


jit_sylvester_y = jax.jit(sylvester_y, static_argnames=("ridge",))

DATA = os.path.join(os.path.dirname(__file__), "data", "lorapro_v1.npz")
TOLERANCE = {True: (1e-7, 1e-7), False: (2e-4, 2e-3)}  # x64: (single step, trajectories)


@pytest.fixture(scope="module")
def ref():
  with np.load(DATA) as data:
    return {key: data[key] for key in data.files}


def case_names():
  with np.load(DATA) as data:
    return [str(name) for name in data["meta/case_names"]]


def assert_close(got, expected, rtol, what=""):
  """Norm-wise ``‖got − exp‖ / ‖exp‖ <= rtol``; an all-zero expectation must be matched exactly."""
  got = np.asarray(got, np.float64)
  assert got.shape == expected.shape, (what, got.shape, expected.shape)
  norm = np.linalg.norm(expected)
  if norm == 0:
    np.testing.assert_array_equal(got, 0.0, err_msg=what)
  else:
    error = np.linalg.norm(got - expected) / norm
    assert error <= rtol, f"{what}: relative error {error:.3e} > {rtol:.1e}"


def hparams(ref):
  return {str(name): float(value) for name, value in zip(ref["meta/hparam_names"],
                                                          ref["traj/hparams"])}


# ---------------------------------------------------------------------------------------------
# Single-step closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("case", case_names())
def test_single_step_parity(ref, case, x64):
  rtol = TOLERANCE[x64][0]
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    a, b, grad_a, grad_b, s = (jnp.asarray(ref[f"{case}/{k}"], dtype)
                               for k in ("A", "B", "gA_l", "gB_l", "s"))
    for y in ("zero", "sylvester"):
      new_a, new_b = adjust(a, b, grad_a, grad_b, s, y=y, ridge=float(ref["meta/delta"]))
      assert new_a.dtype == dtype
      assert_close(new_a, ref[f"{case}/expected_gA_{y}"], rtol, f"{case} gA {y}")
      assert_close(new_b, ref[f"{case}/expected_gB_{y}"], rtol, f"{case} gB {y}")
    assert_close(jit_sylvester_y(a, b, grad_a, grad_b, s), ref[f"{case}/expected_Y_sylvester"], rtol,
                 f"{case} Y")
    assert_close(jit_equivalent(a, b, grad_a, grad_b, s), ref[f"{case}/expected_g_eq"], rtol,
                 f"{case} g_eq")


def test_stacked_case_is_vmapped_pairs(ref):
  """Every slice of a stacked pair is independent: stacked call == vmap == per-slice calls."""
  stacked = [k for k in case_names() if ref[f"{k}/A"].ndim == 3]
  assert stacked, "the reference holds a stacked case"
  for case in stacked:
    a, b, grad_a, grad_b = (jnp.asarray(ref[f"{case}/{k}"], jnp.float32)
                            for k in ("A", "B", "gA_l", "gB_l"))
    s = float(ref[f"{case}/s"])
    together = adjust(a, b, grad_a, grad_b, s)
    mapped = jax.jit(jax.vmap(lambda *p: lora_pro_adjust(*p, s)))(a, b, grad_a, grad_b)
    for i in range(a.shape[0]):
      alone = adjust(a[i], b[i], grad_a[i], grad_b[i], s)
      for got_t, got_m, one in zip(together, mapped, alone):
        np.testing.assert_allclose(got_t[i], one, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_m[i], one, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 15-step trajectories
# ---------------------------------------------------------------------------------------------


def _trajectory_problem(ref, dtype):
  hp = hparams(ref)
  x, y, k0, a0 = (jnp.asarray(ref[f"traj/{k}"], dtype) for k in ("x", "y", "K0", "A0"))
  s = hp["s"]

  def loss_of_kernel(kernel):
    return 0.5 * jnp.mean(jnp.sum((x @ kernel - y) ** 2, axis=-1))

  def loss(params):
    pair = params["layer"]
    return loss_of_kernel(k0 + s * pair["lora_a"] @ pair["lora_b"])

  params = {"layer": {"lora_a": a0, "lora_b": jnp.zeros((int(hp["r"]), int(hp["n_out"])), dtype)}}
  return hp, params, loss, loss_of_kernel


def _run(optimizer, params, loss, steps, record=None):
  state = optimizer.init(params)
  history = [params]
  losses = [loss(params)]
  records = []

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, (record(grads, params) if record else 0)

  for _ in range(steps):
    params, state, extra = step(params, state)
    history.append(params)
    losses.append(loss(params))
    records.append(extra)
  stack = lambda key: np.stack([np.asarray(p["layer"][key]) for p in history])
  return stack("lora_a"), stack("lora_b"), np.asarray(losses), records


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("mode", ["efficient", "full", "sgd"])
def test_trajectory_parity(ref, mode, x64):
  rtol = TOLERANCE[x64][1]
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    hp, params, loss, _ = _trajectory_problem(ref, dtype)
    steps, s, ridge = int(hp["n_steps"]), hp["s"], hp["delta"]
    if mode == "sgd":
      optimizer = optax.chain(lora_pro_project(s, ridge=ridge), optax.sgd(hp["sgd_lr"]))
    else:
      optimizer = OPTIMIZERS[mode](hp["lr"], s, b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                                   weight_decay=hp["weight_decay"], ridge=ridge)

    def record(grads, params):
      pair, raw = params["layer"], grads["layer"]
      direction = lora_pro_adjust(pair["lora_a"], pair["lora_b"], raw["lora_a"], raw["lora_b"], s,
                                  ridge=ridge)
      y = sylvester_y(pair["lora_a"], pair["lora_b"], raw["lora_a"], raw["lora_b"], s, ridge=ridge)
      g_eq = equivalent_gradient(pair["lora_a"], pair["lora_b"], raw["lora_a"], raw["lora_b"], s,
                                 ridge=ridge)
      return direction, y, g_eq

    a, b, losses, records = _run(optimizer, params, loss, steps, record)
    assert_close(a, ref[f"traj/{mode}/A"], rtol, f"{mode} A")
    assert_close(b, ref[f"traj/{mode}/B"], rtol, f"{mode} B")
    assert_close(losses, ref[f"traj/{mode}/loss"], rtol, f"{mode} loss")
    for t in range(steps):
      assert_close(a[t + 1], ref[f"traj/{mode}/A"][t + 1], rtol, f"{mode} A step {t + 1}")
      assert_close(b[t + 1], ref[f"traj/{mode}/B"][t + 1], rtol, f"{mode} B step {t + 1}")
    if mode == "full":
      assert_close(np.stack([r[2] for r in records]), ref["traj/full/g_eq"], rtol, "full g_eq")
    else:  # the closed-form direction and Y actually used at every step
      assert_close(np.stack([r[0][0] for r in records]), ref[f"traj/{mode}/dA"], rtol, "dA")
      assert_close(np.stack([r[0][1] for r in records]), ref[f"traj/{mode}/dB"], rtol, "dB")
      assert_close(np.stack([r[1] for r in records]), ref[f"traj/{mode}/Y"], rtol, "Y")
    # Exact zeros: B_0 = 0 gives a zero A-direction and Y at step 1.
    np.testing.assert_array_equal(ref[f"traj/{mode}/dA"][0], 0.0)
    np.testing.assert_array_equal(np.asarray(records[0][0][0]), 0.0)
    np.testing.assert_array_equal(np.asarray(records[0][1]), 0.0)
    if mode == "efficient":
      assert_close(a[1], (1 - hp["lr"] * hp["weight_decay"]) * ref["traj/A0"], rtol, "A_1")


@pytest.mark.parametrize("x64", [True, False])
def test_trajectory_baselines_match_optax_adamw(ref, x64):
  """The harness itself (gradients, loss) reproduces plain LoRA and full fine-tuning."""
  rtol = TOLERANCE[x64][1]
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    hp, params, loss, loss_of_kernel = _trajectory_problem(ref, dtype)
    adamw = optax.adamw(hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                        weight_decay=hp["weight_decay"])
    a, b, losses, _ = _run(adamw, params, loss, int(hp["n_steps"]))
    assert_close(a, ref["traj/lora_adamw/A"], rtol, "lora A")
    assert_close(b, ref["traj/lora_adamw/B"], rtol, "lora B")
    assert_close(losses, ref["traj/lora_adamw/loss"], rtol, "lora loss")
    kernel = jnp.asarray(ref["traj/K0"], dtype)
    state = adamw.init(kernel)
    kernels = [kernel]
    update = jax.jit(lambda k, st: adamw.update(jax.grad(loss_of_kernel)(k), st, k))
    for _ in range(int(hp["n_steps"])):
      updates, state = update(kernel, state)
      kernel = optax.apply_updates(kernel, updates)
      kernels.append(kernel)
    assert_close(np.stack(kernels), ref["traj/full_ft/K"], rtol, "full_ft K")


# ---------------------------------------------------------------------------------------------
# Transforms on trees
# ---------------------------------------------------------------------------------------------


def _random_tree(seed, dtype=jnp.float32):
  """Two pairs of different ranks (one stacked), a gated pair and a non-LoRA head."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 32))
  normal = lambda shape: jax.random.normal(next(keys), shape, dtype)
  params = {
      "encoder": {
          "query": {"lora_a": normal((12, 4)), "lora_b": normal((4, 10))},
          "mlp": {"lora_a": normal((3, 10, 2)), "lora_b": normal((3, 2, 14))},
      },
      "gated": {"lora_a": normal((8, 4)), "lora_b": normal((4, 6)),
                "lora_c": jnp.array([0.5, 0.0, -1.5, 2.0], dtype)},
      "head": {"kernel": normal((10, 3)), "bias": normal((3,))},
  }
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, dtype), params)
  return params, grads


SCALES = {"encoder": {"query": 2.0, "mlp": 0.5}, "gated": 4.0}


def test_project_batches_pairs_like_single_calls():
  params, grads = _random_tree(0)
  out, _ = jax.jit(lora_pro_project(SCALES).update)(grads, optax.EmptyState(), params)
  for path in (("encoder", "query"), ("encoder", "mlp")):
    node, raw, got = (t[path[0]][path[1]] for t in (params, grads, out))
    expected = adjust(node["lora_a"], node["lora_b"], raw["lora_a"], raw["lora_b"],
                               SCALES[path[0]][path[1]])
    np.testing.assert_allclose(got["lora_a"], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["lora_b"], expected[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])
  np.testing.assert_array_equal(out["gated"]["lora_c"], grads["gated"]["lora_c"])


def test_one_batched_eigh_per_rank_group():
  """The r x r algebra is batched: one eigh for the rank-4 pairs, one for the rank-2 pair."""
  params, grads = _random_tree(0)
  jaxpr = jax.make_jaxpr(lambda g, p: lora_pro_project(SCALES).update(g, optax.EmptyState(), p))(
      grads, params)

  def equations(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)
        if hasattr(inner, "eqns"):
          yield from equations(inner)

  eighs = [eqn for eqn in equations(jaxpr.jaxpr) if eqn.primitive.name == "eigh"]
  shapes = sorted(tuple(eqn.invars[0].aval.shape) for eqn in eighs)
  # rank 4: query + gated, A- and B-Grams -> 4 matrices; rank 2: the stacked pair (3) x 2 -> 6.
  assert shapes == [(4, 4, 4), (6, 2, 2)], shapes


def test_gated_pair_is_the_pair_with_gates_folded_in():
  """LoRA-Pro on (A, B, c) adjusts A and B as the pair (A·diag(c), diag(c)·B); c passes through.

  Checked against the tangent projection of the true kernel gradient of a gated layer, and zero
  gates give exactly zero gradients for their components.
  """
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    x, target = (jax.random.normal(k, shape, jnp.float64)
                 for k, shape in zip(keys[:2], [(20, 8), (20, 6)]))
    params, _ = _random_tree(1, jnp.float64)
    node = params["gated"]
    s = SCALES["gated"]
    kernel_loss = lambda k: jnp.mean((x @ k - target) ** 2)
    merged = lambda n: n["lora_a"] @ jnp.diag(n["lora_c"]) @ n["lora_b"] * s
    grads = jax.grad(lambda n: kernel_loss(merged(n)))(node)
    out, _ = jax.jit(lora_pro_project(s).update)({"gated": grads}, optax.EmptyState(),
                                                 {"gated": node})
    out = out["gated"]
    np.testing.assert_array_equal(out["lora_c"], grads["lora_c"])
    c = node["lora_c"]
    a_eff, b_eff = node["lora_a"] * c, c[:, None] * node["lora_b"]
    g = jax.grad(kernel_loss)(merged(node))
    g_eq = s * (out["lora_a"] @ b_eff + a_eff @ out["lora_b"])
    live = np.asarray(c) != 0
    a_live, b_live = np.asarray(a_eff)[:, live], np.asarray(b_eff)[live]
    p_a = a_live @ np.linalg.inv(a_live.T @ a_live) @ a_live.T
    p_b = b_live.T @ np.linalg.inv(b_live @ b_live.T) @ b_live
    g = np.asarray(g)
    assert_close(g_eq, p_a @ g + g @ p_b - p_a @ g @ p_b, 1e-6, "gated g_eq")
    np.testing.assert_array_equal(np.asarray(out["lora_a"])[:, ~live], 0.0)
    np.testing.assert_array_equal(np.asarray(out["lora_b"])[~live], 0.0)


def test_custom_keys_and_scale_tree():
  params, grads = _random_tree(2)
  rename = lambda t: {"q": {"kernel_lora_a": t["encoder"]["query"]["lora_a"],
                            "kernel_lora_b": t["encoder"]["query"]["lora_b"]}}
  keys = AdapterKeys(a="kernel_lora_a", b="kernel_lora_b")
  out, _ = jax.jit(lora_pro_project({"q": 3.0}, keys=keys).update)(
      rename(grads), optax.EmptyState(), rename(params))
  node, raw = params["encoder"]["query"], grads["encoder"]["query"]
  expected = adjust(node["lora_a"], node["lora_b"], raw["lora_a"], raw["lora_b"], 3.0)
  np.testing.assert_allclose(out["q"]["kernel_lora_a"], expected[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["q"]["kernel_lora_b"], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_non_lora_leaves_get_plain_adamw(mode):
  params, grads = _random_tree(4)
  hyper = dict(b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1)
  ours = OPTIMIZERS[mode](1e-2, SCALES, **hyper)
  reference = optax.adamw(1e-2, **hyper)
  others = lambda t: {"head": t["head"], "c": t["gated"]["lora_c"]}
  state, ref_state = ours.init(params), reference.init(others(params))
  update = jax.jit(ours.update)
  for step in range(3):
    step_grads = jax.tree.map(lambda g: g * (step + 1.0), grads)
    updates, state = update(step_grads, state, params)
    expected, ref_state = reference.update(others(step_grads), ref_state, others(params))
    chex.assert_trees_all_close(others(updates), expected, rtol=1e-6, atol=1e-7)
    params = optax.apply_updates(params, updates)


def test_full_mode_with_identity_inner_is_the_adjusted_gradient():
  """g_eq lies in the tangent space and has the raw gradients of G: projecting it back gives
  LoRA-Pro's adjusted gradients again (Sylvester Y), so full mode with an identity inner and no
  decay steps by exactly −lr·(gA, gB)."""
  with jax.enable_x64(True):
    params, grads = _random_tree(5, jnp.float64)
    pairs = {"encoder": params["encoder"]}
    raw = {"encoder": grads["encoder"]}
    scales = {"encoder": SCALES["encoder"]}
    optimizer = lora_pro_full(0.1, scales, inner=optax.identity())
    updates, _ = jax.jit(optimizer.update)(raw, optimizer.init(pairs), pairs)
    adjusted, _ = jax.jit(lora_pro_project(scales).update)(raw, optax.EmptyState(), pairs)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.1 * g, adjusted), rtol=1e-6)


def test_full_mode_inner_adam_equals_default():
  params, grads = _random_tree(6)
  hyper = dict(b1=0.85, b2=0.95, eps=1e-7, weight_decay=0.05)
  default = lora_pro_full(3e-3, SCALES, **hyper)
  explicit = lora_pro_full(3e-3, SCALES, inner=optax.scale_by_adam(0.85, 0.95, 1e-7), **hyper)
  states = [default.init(params), explicit.init(params)]
  updates = [jax.jit(default.update), jax.jit(explicit.update)]
  for step in range(3):
    step_grads = jax.tree.map(lambda g: jnp.sin(g + step), grads)
    (u1, states[0]), (u2, states[1]) = (update(step_grads, st, params)
                                        for update, st in zip(updates, states))
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-8)
    params = optax.apply_updates(params, u1)
  # the full-rank moments have the kernel's shape, stack axes kept
  mu = states[0][0].inner.mu
  assert mu["encoder"]["mlp"].shape == (3, 10, 14)
  assert mu["gated"].shape == (8, 6)


def test_full_mode_with_factored_inner():
  """A factored second moment (Adafactor's) as ``inner``: state O(n_in + n_out) per pair, and the
  step is that transform's direction on g_eq, projected back with the Sylvester closed form."""
  params, grads = (t["encoder"]["query"] for t in _random_tree(12))
  params, grads = {"layer": params}, {"layer": grads}
  inner = optax.scale_by_factored_rms(min_dim_size_to_factor=4)
  optimizer = lora_pro_full(1e-2, 2.0, inner=inner)
  state = optimizer.init(params)
  updates, state = jax.jit(optimizer.update)(grads, state, params)
  factored = state[0].inner
  assert {factored.v_row["layer"].shape, factored.v_col["layer"].shape} == {(12,), (10,)}
  node, raw = params["layer"], grads["layer"]
  g_eq = jit_equivalent(node["lora_a"], node["lora_b"], raw["lora_a"], raw["lora_b"], 2.0)
  u, _ = inner.update(g_eq, inner.init(g_eq), 2.0 * node["lora_a"] @ node["lora_b"])
  expected = adjust(node["lora_a"], node["lora_b"], 2.0 * u @ node["lora_b"].T,
                    2.0 * node["lora_a"].T @ u, 2.0)
  np.testing.assert_allclose(updates["layer"]["lora_a"], -1e-2 * expected[0], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(updates["layer"]["lora_b"], -1e-2 * expected[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_learning_rate_schedule(mode):
  """Updates are linear in the learning rate: a schedule gives schedule(t) x the unit-lr update."""
  params, grads = _random_tree(7)
  schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=4)
  scheduled = OPTIMIZERS[mode](schedule, SCALES, weight_decay=0.1)
  unit = OPTIMIZERS[mode](1.0, SCALES, weight_decay=0.1)
  s1, s2 = scheduled.init(params), unit.init(params)
  update_scheduled, update_unit = jax.jit(scheduled.update), jax.jit(unit.update)
  for step in range(4):
    step_grads = jax.tree.map(lambda g: g + step, grads)
    u1, s1 = update_scheduled(step_grads, s1, params)
    u2, s2 = update_unit(step_grads, s2, params)
    chex.assert_trees_all_close(u1, jax.tree.map(lambda u: schedule(step) * u, u2), rtol=1e-5,
                                atol=1e-9)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_state_round_trips_through_orbax(tmp_path, mode):
  params, grads = _random_tree(8)
  optimizer = OPTIMIZERS[mode](1e-2, SCALES)
  update = jax.jit(optimizer.update)
  _, state = update(grads, optimizer.init(params), params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, state)
  next_grads = jax.tree.map(lambda g: -g, grads)
  chex.assert_trees_all_equal(update(next_grads, restored, params),
                              update(next_grads, state, params))


class TestJit(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_transform_reproduces_reference_case(self):
    with np.load(DATA) as ref:
      case = "case1"
      node = {"lora_a": jnp.asarray(ref[f"{case}/A"], jnp.float32),
              "lora_b": jnp.asarray(ref[f"{case}/B"], jnp.float32)}
      raw = {"lora_a": jnp.asarray(ref[f"{case}/gA_l"], jnp.float32),
             "lora_b": jnp.asarray(ref[f"{case}/gB_l"], jnp.float32)}
      expected = [ref[f"{case}/expected_g{k}_sylvester"] for k in "AB"]
      s = float(ref[f"{case}/s"])
    transform = lora_pro_project(s)
    update = self.variant(lambda g, p: transform.update(g, optax.EmptyState(), p)[0])
    out = update({"layer": raw}, {"layer": node})["layer"]
    assert_close(out["lora_a"], expected[0], 2e-4)
    assert_close(out["lora_b"], expected[1], 2e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_full_mode_step(self):
    params, grads = (t["encoder"]["query"] for t in _random_tree(9))
    params, grads = {"encoder": {"query": params}}, {"encoder": {"query": grads}}
    optimizer = lora_pro_full(1e-2, {"encoder": {"query": 2.0}}, weight_decay=0.1)
    update = self.variant(optimizer.update)
    updates, _ = update(grads, optimizer.init(params), params)
    # one Adam step from zero moments is lr·sign(g_eq) per entry in the full-rank space
    node, raw = params["encoder"]["query"], grads["encoder"]["query"]
    g_eq = equivalent_gradient(node["lora_a"], node["lora_b"], raw["lora_a"], raw["lora_b"], 2.0)
    u = jnp.sign(g_eq) * (jnp.abs(g_eq) / (jnp.abs(g_eq) + 1e-8))
    direction = adjust(node["lora_a"], node["lora_b"], 2.0 * u @ node["lora_b"].T,
                                2.0 * node["lora_a"].T @ u, 2.0)
    for key, d in zip(("lora_a", "lora_b"), direction):
      np.testing.assert_allclose(updates["encoder"]["query"][key], -1e-2 * (d + 0.1 * node[key]),
                                 rtol=1e-4, atol=1e-6)


def test_bad_input_raises_clear_errors():
  params, grads = _random_tree(10)
  with pytest.raises(ValueError, match=r"y must be one of \('sylvester', 'zero'\), got 'svd'"):
    lora_pro_project(2.0, y="svd")
  with pytest.raises(ValueError, match="ridge must be a number >= 0, got -1.0"):
    lora_pro_adjust(jnp.ones((3, 2)), jnp.ones((2, 3)), jnp.ones((3, 2)), jnp.ones((2, 3)), 1.0,
                    ridge=-1.0)
  with pytest.raises(ValueError, match="must be a finite number > 0"):
    lora_pro(1e-3, 0.0).init(params)
  with pytest.raises(KeyError, match="mlp"):
    lora_pro_project({"encoder": {"query": 2.0}}).update(grads, optax.EmptyState(), params)
  with pytest.raises(ValueError, match="params"):
    lora_pro_project(2.0).update(grads, optax.EmptyState())
  with pytest.raises(ValueError, match=r"\(4, 10\) and \(3, 10\)"):
    lora_pro_adjust(jnp.ones((4, 10)), jnp.ones((3, 10)), jnp.ones((4, 10)), jnp.ones((3, 10)), 1.0)
  with pytest.raises(ValueError, match="do not match"):
    lora_pro_adjust(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.ones((2, 3)), 1.0)
  with pytest.raises(ValueError, match=r"gated: expected lora_c of shape \(\*stack, r\) = \(4,\)"):
    bad_gates = {**params, "gated": {**params["gated"], "lora_c": jnp.ones(3)}}
    lora_pro_project(SCALES).update(grads, optax.EmptyState(), bad_gates)


@pytest.mark.parametrize("factory", [lora_pro_project, lora_pro, lora_pro_full])
def test_tree_without_pairs_raises_instead_of_plain_adamw(factory):
  """PEFT's names (lora_A/lora_B) or a wrong ``keys`` find no pair: without the error LoRA-Pro
  would silently be AdamW on every leaf."""
  build = (lambda **kw: factory(2.0, **kw)) if factory is lora_pro_project else (
      lambda **kw: factory(1e-3, 2.0, **kw))
  peft_style = {"q": {"lora_A": jnp.ones((2, 4)), "lora_B": jnp.ones((3, 2))}, "head": jnp.ones(3)}
  with pytest.raises(ValueError,
                     match=r"no LoRA pair.*'lora_a' and 'lora_b'.*q\.lora_A, q\.lora_B"):
    build().init(peft_style)
  params, grads = _random_tree(18)
  with pytest.raises(ValueError, match="no LoRA pair.*'down' and 'up'"):
    build(keys=AdapterKeys(a="down", b="up")).init(params)
  # update() checks too (a state made for another tree)
  state = build().init(params)
  with pytest.raises(ValueError, match="no LoRA pair"):
    build().update({"head": grads["head"]}, state, {"head": params["head"]})


def test_scale_tree_with_entries_that_are_no_pair_raises():
  params, _ = _random_tree(19)
  for extra in ({"decoder": {"query": 1.0}}, {"head": 2.0}):
    with pytest.raises(ValueError,
                       match=r"no adapter pair of the tree: \['(decoder\.query|head)'\]"):
      lora_pro(1e-3, {**SCALES, **extra}).init(params)
    with pytest.raises(ValueError, match="no adapter pair"):
      lora_pro_full(1e-3, {**SCALES, **extra}).init(params)


# ---------------------------------------------------------------------------------------------
# Composition with optax: inject_hyperparams, apply_if_finite
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_inject_hyperparams(mode):
  """Every numeric option becomes an injectable hyperparameter (ridge included); a learning rate
  and weight decay changed in the state between steps give the step of an optimizer built with
  them, from the same moments. (float64: in float32 the differently compiled r x r algebra
  differs at the 1e-6 level.)"""
  factory = OPTIMIZERS[mode]
  with jax.enable_x64(True):
    params, grads = _random_tree(20, jnp.float64)
    params, grads = ({"query": t["encoder"]["query"], "head": t["head"]} for t in (params, grads))
    injected = optax.inject_hyperparams(factory)(learning_rate=1e-2, scale=2.0, weight_decay=0.1)
    state = injected.init(params)
    assert {"learning_rate", "scale", "weight_decay", "ridge", "b1"} <= set(state.hyperparams)
    update = jax.jit(injected.update)
    first, state = update(grads, state, params)
    fixed = factory(1e-2, 2.0, weight_decay=0.1)
    expected, _ = jax.jit(fixed.update)(grads, fixed.init(params), params)
    chex.assert_trees_all_close(first, expected, rtol=1e-12, atol=1e-15)

    params = optax.apply_updates(params, first)
    state.hyperparams["learning_rate"] = jnp.asarray(3e-3)
    state.hyperparams["weight_decay"] = jnp.asarray(0.5)
    next_grads = jax.tree.map(jnp.cos, grads)
    second, _ = update(next_grads, state, params)
    fresh = factory(3e-3, 2.0, weight_decay=0.5)
    expected, _ = jax.jit(fresh.update)(next_grads, state.inner_state, params)
    chex.assert_trees_all_close(second, expected, rtol=1e-12, atol=1e-15)
    # the change mattered: the old rate gives another step
    old, _ = jax.jit(fixed.update)(next_grads, state.inner_state, params)
    assert not np.allclose(old["head"]["kernel"], second["head"]["kernel"], rtol=0.1)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_apply_if_finite_skips_and_counts_non_finite_steps(mode):
  """``optax.apply_if_finite(lora_pro(...))``: a NaN/Inf gradient gives a zero update and leaves
  our state untouched, the skip is counted, and the run continues exactly as if the bad step had
  never happened."""
  params, grads = ({"gated": t["gated"], "head": t["head"]} for t in _random_tree(21))
  guarded = optax.apply_if_finite(OPTIMIZERS[mode](1e-2, 4.0, weight_decay=0.1),
                                  max_consecutive_errors=3)
  plain = OPTIMIZERS[mode](1e-2, 4.0, weight_decay=0.1)
  guarded_update, plain_update = jax.jit(guarded.update), jax.jit(plain.update)
  nan_a = grads["gated"]["lora_a"].at[2, 0].set(jnp.nan)
  bad = {**grads, "gated": {**grads["gated"], "lora_a": nan_a}}
  guarded_state, plain_state = guarded.init(params), plain.init(params)
  guarded_params = plain_params = params
  for step, step_grads in enumerate([grads, bad, jax.tree.map(jnp.sin, grads)]):
    before = guarded_state.inner_state
    updates, guarded_state = guarded_update(step_grads, guarded_state, guarded_params)
    guarded_params = optax.apply_updates(guarded_params, updates)
    if step == 1:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
      chex.assert_trees_all_equal(guarded_state.inner_state, before)
      assert int(guarded_state.total_notfinite) == 1 and not bool(guarded_state.last_finite)
      continue
    updates, plain_state = plain_update(step_grads, plain_state, plain_params)
    plain_params = optax.apply_updates(plain_params, updates)
    chex.assert_trees_all_close(guarded_params, plain_params, rtol=1e-6, atol=1e-7)
  assert int(guarded_state.total_notfinite) == 1 and int(guarded_state.notfinite_count) == 0


# ---------------------------------------------------------------------------------------------
# Sharding: only r x r Grams cross devices
# ---------------------------------------------------------------------------------------------


def test_sharded_update_matches_and_gathers_no_kernel():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.devices()
  assert len(devices) == 8, "conftest sets 8 fake CPU devices"
  mesh = Mesh(np.array(devices), ("model",))
  n_in, n_out, rank = 64, 48, 4
  keys = jax.random.split(jax.random.PRNGKey(11), 4)
  params = {"layer": {"lora_a": jax.random.normal(keys[0], (n_in, rank)),
                      "lora_b": jax.random.normal(keys[1], (rank, n_out))}}
  grads = {"layer": {"lora_a": jax.random.normal(keys[2], (n_in, rank)),
                     "lora_b": jax.random.normal(keys[3], (rank, n_out))}}
  shardings = {"layer": {"lora_a": NamedSharding(mesh, P("model", None)),
                         "lora_b": NamedSharding(mesh, P(None, "model"))}}
  for mode in ("efficient", "full"):
    optimizer = OPTIMIZERS[mode](1e-2, 2.0, weight_decay=0.01)
    state = optimizer.init(params)
    expected, _ = jax.jit(optimizer.update)(grads, state, params)
    sharded_params, sharded_grads = (jax.device_put(t, shardings) for t in (params, grads))
    update = jax.jit(optimizer.update)
    got, _ = update(sharded_grads, optimizer.init(sharded_params), sharded_params)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got["layer"]["lora_a"].sharding.spec == P("model", None)
    assert got["layer"]["lora_b"].sharding.spec == P(None, "model")
    hlo = update.lower(sharded_grads, state, sharded_params).compile().as_text()
    moved = _collective_sizes(hlo)
    # efficient: only r x r Grams and r-vectors cross devices; full: at most factor-sized blocks
    # (2r x n: the operands of g_eq = [gA, A]·[B; gB], the projection Aᵀ·U), never a kernel.
    limit = rank * rank if mode == "efficient" else 2 * rank * max(n_in, n_out)
    assert limit < n_in * n_out // 4
    assert moved and max(moved) <= limit, (mode, moved)


def _collective_sizes(hlo: str) -> list[int]:
  """Element counts of every array produced by a cross-device collective in compiled HLO."""
  collective = re.compile(r"=\s*(.*?)\s(?:all-gather|all-reduce|all-to-all|collective-permute|"
                          r"reduce-scatter)(?:-start)?\(")
  sizes = []
  for line in hlo.splitlines():
    found = collective.search(line)
    if found:
      for dims in re.findall(r"\w+\[([0-9,]*)\]", found.group(1)):
        sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
  return sizes


# ---------------------------------------------------------------------------------------------
# Gradient alignment (experiments/gradient_alignment.py at a tiny size)
# ---------------------------------------------------------------------------------------------


def test_lorapro_equivalent_gradient_aligns_better_with_full_gradient():
  """At the same parameters, LoRA-Pro's equivalent gradient (the orthogonal projection of G onto
  the tangent space) is at least as close in angle to G as plain LoRA's (another tangent vector),
  at every step; on average strictly closer."""
  from experiments.gradient_alignment import run, synthetic_task
  task = synthetic_task(n=32, n_in=8, n_out=6, rank=2, alpha=4.0)
  results = run(task, steps=6, learning_rate=1e-2, methods=("lora", "lora_pro"))
  for method, history in results.items():
    cos_lora, cos_pro = np.array(history["cos_lora"]), np.array(history["cos_lorapro"])
    assert np.all(cos_pro >= cos_lora - 1e-6), (method, cos_lora, cos_pro)
    assert cos_pro.mean() > cos_lora.mean() + 0.05, (method, cos_lora, cos_pro)
    assert np.all(cos_pro <= 1 + 1e-6)
  # both runs start from the same point: identical first loss and cosines
  assert results["lora"]["loss"][0] == results["lora_pro"]["loss"][0]


def test_linalg_zero_components_are_deflated_exactly():
  """A component with a zero column in the factor gets exactly zero rows/columns in the ridge
  inverse and in Y; the live block is the ridge inverse / Sylvester solution of the live block."""
  from lorapro_jax.linalg import eigh_psd, refine_values, ridge_inverse, solve_sylvester
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(13), 3)
    factor_a = jax.random.normal(keys[0], (9, 4), jnp.float64).at[:, 2].set(0.0)
    factor_b = jax.random.normal(keys[1], (7, 4), jnp.float64).at[:, 0].set(0.0)
    rhs = jax.random.normal(keys[2], (4, 4), jnp.float64)

    def decompose(factor):
      eig = eigh_psd((factor.T @ factor)[None])
      return refine_values(eig, jnp.sum((factor @ eig.vectors[0]) ** 2, axis=0)[None])

    eig_a, eig_b = decompose(factor_a), decompose(factor_b)
    inverse = np.asarray(ridge_inverse(eig_a, 1e-8)[0])
    live = np.array([0, 1, 3])
    np.testing.assert_array_equal(inverse[2], 0.0)
    np.testing.assert_array_equal(inverse[:, 2], 0.0)
    gram_live = np.asarray(factor_a)[:, live].T @ np.asarray(factor_a)[:, live]
    np.testing.assert_allclose(inverse[np.ix_(live, live)],
                               np.linalg.inv(gram_live + 1e-8 * np.eye(3)), rtol=1e-10)
    y = np.asarray(solve_sylvester(eig_a, eig_b, rhs[None])[0])
    np.testing.assert_array_equal(y[2], 0.0)
    np.testing.assert_array_equal(y[:, 0], 0.0)
    gram_a, gram_b = (np.asarray(f.T @ f) for f in (factor_a, factor_b))
    residual = gram_a @ y + y @ gram_b - np.asarray(rhs)
    rows, cols = np.array([0, 1, 3]), np.array([1, 2, 3])
    assert np.abs(residual[np.ix_(rows, cols)]).max() < 1e-10 * np.abs(rhs).max()


def test_with_injected_flax_model_and_config_scales():
  """End to end with ``inject``: per-layer scales from ``LoRAConfig.scales`` (rank_pattern,
  alpha_pattern, rsLoRA), and g_eq equal to the tangent projection of the true kernel gradient
  (the gradient of the frozen base kernel, which enters the model like K)."""
  import flax.linen as nn
  from lorapro_jax.inject import init_adapters, inject
  from lorapro_jax.trees import combine
  from lorapro_jax.lora import LoRAConfig

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name="out")(jnp.tanh(nn.Dense(12, name="hidden")(x)))

  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(14), 4)
    x = jax.random.normal(keys[0], (16, 7), jnp.float64)
    y = jax.random.normal(keys[1], (16, 5), jnp.float64)
    base = MLP().init(keys[2], x)["params"]
    config = LoRAConfig(rank=3, alpha=6.0, rslora=True, targets=("hidden", "out"),
                        rank_pattern={"out": 2}, alpha_pattern={"out": 1.5},
                        param_dtype=jnp.float64)
    model = inject(MLP(), config)
    trainable = init_adapters(model, base, keys[3], x)
    # B = 0 at init: move B away from zero so that both projections matter
    noise = iter(jax.random.split(jax.random.PRNGKey(15), 8))
    trainable = jax.tree.map(
        lambda p: p + 0.3 * jax.random.normal(next(noise), p.shape, p.dtype), trainable)
    loss = lambda base, trainable: jnp.mean((model.apply(
        {"params": combine(base, trainable)}, x) - y) ** 2)
    base_grads, grads = jax.grad(loss, argnums=(0, 1))(base, trainable)
    scales = config.scales(trainable)
    out, _ = jax.jit(lora_pro_project(scales).update)(grads, optax.EmptyState(), trainable)
    for name, s in (("hidden", 6.0 / np.sqrt(3)), ("out", 1.5 / np.sqrt(2))):
      assert scales[name] == pytest.approx(s)
      node, raw, got = trainable[name], grads[name], out[name]
      expected = adjust(node["lora_a"], node["lora_b"], raw["lora_a"], raw["lora_b"], s)
      np.testing.assert_allclose(got["lora_a"], expected[0], rtol=1e-9)
      np.testing.assert_allclose(got["lora_b"], expected[1], rtol=1e-9)
      a, b, g = (np.asarray(t) for t in (node["lora_a"], node["lora_b"], base_grads[name]["kernel"]))
      p_a = a @ np.linalg.inv(a.T @ a) @ a.T
      p_b = b.T @ np.linalg.inv(b @ b.T) @ b
      g_eq = s * (np.asarray(got["lora_a"]) @ b + a @ np.asarray(got["lora_b"]))
      assert_close(g_eq, p_a @ g + g @ p_b - p_a @ g @ p_b, 1e-6, name)


# ---------------------------------------------------------------------------------------------
# The independent PyTorch port lora-pro-adamw 0.2.1 (PEFT layout: ΔW = s·B_pt·A_pt, A = A_ptᵀ)
# ---------------------------------------------------------------------------------------------

PORT = dict(n_in=6, n_out=5, rank=2, alpha=4.0, steps=6, lr=1e-2, b1=0.9, b2=0.99, eps=1e-8,
            weight_decay=0.05)


@pytest.fixture(scope="module")
def port():
  """The port's modules, with torch and PEFT (the ``interop`` extra)."""
  os.environ.setdefault("USE_TF", "0")  # transformers (under PEFT) must not import TensorFlow
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  adamw = pytest.importorskip("lora_pro.adamw")
  from lora_pro import _lorapro
  from torch.overrides import TorchFunctionMode

  class Float64(TorchFunctionMode):
    """Runs the port's casts to float32/bfloat16 as float64. They are its precision choices, not
    its math: the full mode's r x r inverses in float32 (``.float()``) and its second moment
    updated with bfloat16 squares move its trajectory by 5e-4 from float64."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
      kwargs = dict(kwargs or {})
      low = (torch.float32, torch.bfloat16, torch.float16)
      if func is torch.Tensor.float:
        return args[0]
      if func is torch.Tensor.to:
        args = tuple(torch.float64 if isinstance(x, torch.dtype) and x in low else x for x in args)
        if kwargs.get("dtype") in low:
          kwargs["dtype"] = torch.float64
      return func(*args, **kwargs)

  return types.SimpleNamespace(torch=torch, peft=peft, adamw=adamw, lorapro=_lorapro,
                               Float64=Float64)


def _peft_linear(port, seed, *, b_zero=True, rslora=False):
  """A PEFT LoRA on one bias-free Linear in float64, and a least-squares batch."""
  torch = port.torch

  class Toy(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.linear = torch.nn.Linear(PORT["n_in"], PORT["n_out"], bias=False)

    def forward(self, x):
      return self.linear(x)

  torch.manual_seed(seed)
  config = port.peft.LoraConfig(r=PORT["rank"], lora_alpha=PORT["alpha"], target_modules=["linear"],
                                lora_dropout=0.0, use_rslora=rslora)
  model = port.peft.get_peft_model(Toy(), config).double()
  layer = model.base_model.model.linear
  if not b_zero:  # a trained adapter
    with torch.no_grad():
      layer.lora_B["default"].weight.normal_()
  x = torch.randn(16, PORT["n_in"], dtype=torch.float64)
  target = torch.randn(16, PORT["n_out"], dtype=torch.float64)
  return model, layer, x, target


def _port_jitter_free(port):
  """The port's efficient adjustment with its jitter (1e-6, added to both Grams, so inside the
  Sylvester coefficients too, where ours has none) set to 0; ours then runs with ridge 0."""
  original = port.lorapro.lorapro_efficient_adjustment.__wrapped__
  code = original.__code__
  assert code.co_consts.count(1e-6) == 1
  consts = tuple(0.0 if isinstance(c, float) and c == 1e-6 else c for c in code.co_consts)
  function = types.FunctionType(code.replace(co_consts=consts), original.__globals__)
  return port.torch.no_grad()(function)


def _port_run(port, mode, *, solver="eig", b_zero=True, seed=0, monkeypatch=None):
  """The port's A, B (in our layout) after every step, and the problem in numpy."""
  model, layer, x, target = _peft_linear(port, seed, b_zero=b_zero)
  a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
  problem = dict(x=x.numpy().copy(), target=target.numpy().copy(),
                 k0=layer.base_layer.weight.detach().numpy().T.copy(),
                 a0=a.detach().numpy().T.copy(), b0=b.detach().numpy().T.copy())
  if monkeypatch is not None:
    monkeypatch.setattr(port.adamw, "lorapro_efficient_adjustment", _port_jitter_free(port))
  optimizer = port.adamw.LoRAProAdamW(
      model, lr=PORT["lr"], weight_decay=PORT["weight_decay"], betas=(PORT["b1"], PORT["b2"]),
      eps=PORT["eps"], lorapro_mode=mode, efficient_solver=solver)
  history = []
  for _ in range(PORT["steps"]):
    optimizer.zero_grad()
    loss = 0.5 * ((model(x) - target) ** 2).sum(-1).mean()
    loss.backward()
    with port.Float64():
      optimizer.step()
    history.append((a.detach().numpy().T.copy(), b.detach().numpy().T.copy()))
  return problem, history


def _our_run(optimizer, problem):
  s = PORT["alpha"] / PORT["rank"]
  with jax.enable_x64(True):
    x, target, k0 = (jnp.asarray(problem[k]) for k in ("x", "target", "k0"))
    params = {"linear": {"lora_a": jnp.asarray(problem["a0"]),
                         "lora_b": jnp.asarray(problem["b0"])}}

    def loss(params):
      pair = params["linear"]
      return 0.5 * jnp.mean(jnp.sum((x @ (k0 + s * pair["lora_a"] @ pair["lora_b"]) - target) ** 2,
                                    axis=-1))

    @jax.jit
    def step(params, state):
      updates, state = optimizer.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    state, history = optimizer.init(params), []
    for _ in range(PORT["steps"]):
      params, state = step(params, state)
      history.append(tuple(np.asarray(params["linear"][k]) for k in ("lora_a", "lora_b")))
  return history


def _worst(history, reference):
  return max(np.linalg.norm(got - want) / np.linalg.norm(want)
             for pair, ref_pair in zip(history, reference) for got, want in zip(pair, ref_pair))


def _hyper():
  return dict(b1=PORT["b1"], b2=PORT["b2"], eps=PORT["eps"], weight_decay=PORT["weight_decay"])


def test_port_efficient_mode_agrees_to_round_off(port, monkeypatch):
  """With its correct ('eig') Sylvester solver and no jitter, the port's efficient mode and
  ``lora_pro`` take the same steps to float64 round-off, from a trained adapter (B ≠ 0)."""
  problem, theirs = _port_run(port, "efficient", b_zero=False, monkeypatch=monkeypatch)
  ours = _our_run(lora_pro(PORT["lr"], PORT["alpha"] / PORT["rank"], ridge=0.0, **_hyper()),
                  problem)
  assert _worst(ours, theirs) < 1e-12


def test_port_default_vec_solver_solves_the_transposed_equation(port, monkeypatch):
  """The port's default ``vec`` solver builds ``I⊗SB + SAᵀ⊗I`` (column-major vec) but flattens
  with ``reshape`` (row-major): it solves ``SA·X + X·SB = C`` instead of ``SB·X + X·SA = C``.
  The equivalent gradient does not depend on X, but the per-factor gradients do, so its
  efficient-mode trajectories are off (here by 4% in six steps)."""
  torch = port.torch
  generator = np.random.default_rng(22)
  factor_a, factor_b = generator.normal(size=(7, 3)), generator.normal(size=(3, 5))
  sa, sb = factor_a.T @ factor_a, factor_b @ factor_b.T  # SA = A_ptA_ptᵀ, SB = B_ptᵀB_pt
  c = generator.normal(size=(3, 3))
  vec = port.lorapro._solve_sylvester_vec(*(torch.from_numpy(m) for m in (sb, sa, c))).numpy()
  eig = port.lorapro._solve_sylvester(*(torch.from_numpy(m) for m in (sb, sa, c))).numpy()
  residual = lambda x, left, right: np.linalg.norm(left @ x + x @ right - c) / np.linalg.norm(c)
  assert residual(eig, sb, sa) < 1e-13
  assert residual(vec, sa, sb) < 1e-13       # the transposed equation
  assert residual(vec, sb, sa) > 1e-2        # not the intended one
  problem, theirs = _port_run(port, "efficient", solver="vec", b_zero=False,
                              monkeypatch=monkeypatch)
  ours = _our_run(lora_pro(PORT["lr"], PORT["alpha"] / PORT["rank"], ridge=0.0, **_hyper()),
                  problem)
  assert _worst(ours, theirs) > 1e-2


def test_port_full_mode_agrees_to_round_off_from_b_zero(port):
  """The port's full mode (default) and ``lora_pro_full`` take the same steps to float64
  round-off from B = 0, the only start its first step is right for."""
  problem, theirs = _port_run(port, "full", b_zero=True)
  ours = _our_run(lora_pro_full(PORT["lr"], PORT["alpha"] / PORT["rank"], **_hyper()), problem)
  assert _worst(ours, theirs) < 1e-12


def test_port_full_mode_first_step_assumes_b_zero(port):
  """At its first step the port's full mode takes ``grad_A = gA_l`` and drops B's projector, the
  closed form at B = 0 only: on a trained adapter its equivalent gradient (read from its first
  moment, m = (1 − b1)·g_eq) is not the tangent projection of G, ours is. From the second step on
  it uses the general form and agrees with ours at its own iterate to round-off."""
  torch = port.torch
  model, layer, x, target = _peft_linear(port, 23, b_zero=False)
  a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
  k0 = layer.base_layer.weight.detach().numpy().T
  s = PORT["alpha"] / PORT["rank"]
  optimizer = port.adamw.LoRAProAdamW(model, lr=PORT["lr"], betas=(PORT["b1"], PORT["b2"]),
                                      eps=PORT["eps"], weight_decay=0.0, lorapro_mode="full")
  previous_m = None
  for step in range(2):
    optimizer.zero_grad()
    (0.5 * ((model(x) - target) ** 2).sum(-1).mean()).backward()
    factor_a, factor_b = a.detach().numpy().T.copy(), b.detach().numpy().T.copy()
    grad_a, grad_b = a.grad.numpy().T.copy(), b.grad.numpy().T.copy()
    with port.Float64():
      optimizer.step()
    m = optimizer._state_m[0].numpy().T.copy()
    theirs = (m if previous_m is None else m - PORT["b1"] * previous_m) / (1 - PORT["b1"])
    previous_m = m
    with jax.enable_x64(True):
      ours = np.asarray(equivalent_gradient(factor_a, factor_b, grad_a, grad_b, s))
    kernel = k0 + s * factor_a @ factor_b
    g = x.numpy().T @ (x.numpy() @ kernel - target.numpy()) / x.shape[0]
    p_a = factor_a @ np.linalg.pinv(factor_a)
    p_b = np.linalg.pinv(factor_b) @ factor_b
    projection = p_a @ g + g @ p_b - p_a @ g @ p_b
    assert_close(ours, projection, 1e-7, f"ours, step {step + 1}")  # up to the ridge δ = 1e-8
    if step == 0:  # here off by 14 times the projection's norm
      assert np.linalg.norm(theirs - projection) > np.linalg.norm(projection)
    else:
      assert_close(theirs, ours, 1e-12, "port, step 2")


def test_port_ignores_rslora_scaling(port):
  """The port reads ``lora_alpha`` and ``r`` and uses alpha / r whatever PEFT's ``use_rslora``:
  with rsLoRA its scale is off by sqrt(r) (ours takes ``LoRAConfig.scales``: alpha / sqrt(r))."""
  model, layer, _, _ = _peft_linear(port, 24, rslora=True)
  optimizer = port.adamw.LoRAProAdamW(model, lr=1e-3, lorapro_mode="full")
  rank, alpha = PORT["rank"], PORT["alpha"]
  assert layer.scaling["default"] == pytest.approx(alpha / np.sqrt(rank))
  assert optimizer._pairs[0].s == pytest.approx(alpha / rank)
