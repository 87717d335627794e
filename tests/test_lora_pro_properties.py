"""LoRA-Pro property tests over random shapes (hypothesis), against the true kernel gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from lorapro_jax.lora_pro import equivalent_gradient, lora_pro, lora_pro_adjust, lora_pro_full

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)

# One compiled function per shape: eager dispatch of many small ops would dominate the run time.
adjust = jax.jit(lora_pro_adjust, static_argnames=("y", "ridge"))
equivalent = jax.jit(equivalent_gradient, static_argnames=("ridge",))


def closed_form(a, b, grad_a, grad_b, scale, y, ridge=1e-8):
  """The closed form with a given Y, in NumPy float64 with explicit ridge pseudo-inverses."""
  a, b, grad_a, grad_b, y = (np.asarray(t, np.float64) for t in (a, b, grad_a, grad_b, y))
  eye = np.eye(a.shape[-1])
  inv_a, inv_b = np.linalg.pinv(a.T @ a + ridge * eye), np.linalg.pinv(b @ b.T + ridge * eye)
  new_a = grad_a @ inv_b / scale**2 + a @ y
  new_b = inv_a @ (grad_b - grad_b @ b.T @ inv_b @ b) / scale**2 - y @ b
  return new_a, new_b


@jax.jit
def library_y(a, b, grad_a, grad_b, scale):
  """The Y of ``y="sylvester"``, read off the library's gradients: they differ from Y = 0 by A·Y."""
  sylvester = lora_pro_adjust(a, b, grad_a, grad_b, scale)[0]
  zero = lora_pro_adjust(a, b, grad_a, grad_b, scale, y="zero")[0]
  return jnp.linalg.pinv(a) @ (sylvester - zero)


@st.composite
def problems(draw):
  rank = draw(st.integers(1, 3))
  n_in = draw(st.integers(rank + 1, 7))
  n_out = draw(st.integers(rank + 1, 7))
  scale = draw(st.sampled_from([0.5, 2.0, 8.0]))
  seed = draw(st.integers(0, 2**16))
  return n_in, n_out, rank, scale, seed


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _model(n_in, n_out, rank, scale, key):
  """Random factors, and the raw LoRA gradients plus the true G = ∂L/∂K of a tiny tanh model."""
  keys = jax.random.split(key, 5)
  a = jax.random.normal(keys[0], (n_in, rank), jnp.float64)
  b = jax.random.normal(keys[1], (rank, n_out), jnp.float64)
  k0 = jax.random.normal(keys[2], (n_in, n_out), jnp.float64)
  x = jax.random.normal(keys[3], (16, n_in), jnp.float64)
  target = jax.random.normal(keys[4], (16, n_out), jnp.float64)
  kernel_loss = lambda k: jnp.mean((jnp.tanh(x @ k) - target) ** 2)
  grad_a, grad_b = jax.grad(lambda a, b: kernel_loss(k0 + scale * a @ b), argnums=(0, 1))(a, b)
  return a, b, grad_a, grad_b, jax.grad(kernel_loss)(k0 + scale * a @ b)


def _rel(got, expected):
  return float(np.linalg.norm(np.asarray(got) - expected) / np.linalg.norm(expected))


@SETTINGS
@given(problems())
def test_equivalent_gradient_is_the_tangent_projection(problem):
  n_in, n_out, rank, scale, seed = problem
  with jax.enable_x64(True):
    a, b, grad_a, grad_b, g = (np.asarray(t) for t in _model(n_in, n_out, rank, scale,
                                                               jax.random.PRNGKey(seed)))
    # ridge 0: the identity holds exactly with exact inverses
    g_eq = np.asarray(equivalent(a, b, grad_a, grad_b, scale, ridge=0.0))
    p_a = a @ np.linalg.inv(a.T @ a) @ a.T
    p_b = b.T @ np.linalg.inv(b @ b.T) @ b
    projection = p_a @ g + g @ p_b - p_a @ g @ p_b
    assert _rel(g_eq, projection) < 1e-8
    # descent: <G, g_eq> = ‖g_eq‖² >= 0 (g_eq is an orthogonal projection of G)
    inner = float(np.sum(g * g_eq))
    assert inner >= 0
    np.testing.assert_allclose(inner, np.sum(g_eq ** 2), rtol=1e-8)


@SETTINGS
@given(problems())
def test_equivalent_gradient_does_not_depend_on_y(problem):
  n_in, n_out, rank, scale, seed = problem
  with jax.enable_x64(True):
    a, b, grad_a, grad_b, _ = _model(n_in, n_out, rank, scale, jax.random.PRNGKey(seed))
    lift = lambda ga, gb: scale * (ga @ b + a @ gb)
    zero = adjust(a, b, grad_a, grad_b, scale, y="zero")
    y = jax.random.normal(jax.random.PRNGKey(seed + 1), (rank, rank), jnp.float64)
    arbitrary = closed_form(a, b, grad_a, grad_b, scale, y)
    reference = np.asarray(lift(*zero))
    assert _rel(lift(*adjust(a, b, grad_a, grad_b, scale, y="sylvester")), reference) < 1e-10
    assert _rel(lift(*arbitrary), reference) < 1e-10
    # and Y changes the factors' gradients themselves (the check above is not vacuous)
    assert _rel(arbitrary[0], np.asarray(zero[0])) > 1e-3


@SETTINGS
@given(problems())
def test_sylvester_residual_and_minimality(problem):
  n_in, n_out, rank, scale, seed = problem
  with jax.enable_x64(True):
    a, b, grad_a, grad_b, _ = _model(n_in, n_out, rank, scale, jax.random.PRNGKey(seed))
    y = np.asarray(library_y(a, b, grad_a, grad_b, scale))
    a, b, grad_a, grad_b = (np.asarray(t) for t in (a, b, grad_a, grad_b))
    inv_b = np.linalg.pinv(b @ b.T + 1e-8 * np.eye(rank))
    rhs = -(a.T @ grad_a @ inv_b) / scale**2
    residual = a.T @ a @ y + y @ (b @ b.T) - rhs
    assert np.linalg.norm(residual) <= 1e-9 * np.linalg.norm(rhs) + 1e-300
    # Y minimises ‖gA − gA_l‖² + ‖gB − gB_l‖²: random perturbations never do better
    distance = lambda y_: sum(float(np.sum((np.asarray(new) - raw) ** 2)) for new, raw in zip(
        closed_form(a, b, grad_a, grad_b, scale, y_), (grad_a, grad_b)))
    best = distance(y)
    perturbations = np.random.default_rng(seed).normal(size=(4, rank, rank))
    assert all(distance(y + 1e-3 * p) >= best for p in perturbations)


BF16_CASES = ["random", "b_zero", "zeroed_component", "rank_deficient"]


@settings(max_examples=6, deadline=None, derandomize=True)
@given(problems(), st.sampled_from(BF16_CASES))
def test_bfloat16_inputs_stay_finite_and_zeros_stay_zero(problem, case):
  n_in, n_out, rank, scale, seed = problem
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  a, grad_a = (jax.random.normal(k, (n_in, rank), jnp.bfloat16) for k in keys[:2])
  b, grad_b = (jax.random.normal(k, (rank, n_out), jnp.bfloat16) for k in keys[2:])
  if case == "b_zero":
    b = jnp.zeros_like(b)
  elif case == "zeroed_component":   # a pruned component: zero column of A and row of B
    a, b = a.at[:, 0].set(0), b.at[0].set(0)
    grad_a, grad_b = grad_a.at[:, 0].set(0), grad_b.at[0].set(0)
  elif case == "rank_deficient" and rank > 1:
    a, b = a.at[:, 1].set(a[:, 0]), b.at[1].set(b[0])
  outputs = _bfloat16_outputs(a, b, grad_a, grad_b, scale)
  for leaf in jax.tree.leaves(outputs):
    assert bool(jnp.all(jnp.isfinite(leaf))), case
  for y in ("sylvester", "zero"):
    new_a, new_b = outputs[y]
    assert new_a.dtype == new_b.dtype == jnp.bfloat16
    if case == "b_zero":
      np.testing.assert_array_equal(np.asarray(new_a, np.float32), 0.0)
    if case == "zeroed_component":
      np.testing.assert_array_equal(np.asarray(new_a[:, 0], np.float32), 0.0)
      np.testing.assert_array_equal(np.asarray(new_b[0], np.float32), 0.0)
  for mode in ("efficient", "full"):
    assert outputs[mode]["layer"]["lora_a"].dtype == jnp.bfloat16
    if case == "zeroed_component":
      np.testing.assert_array_equal(np.asarray(outputs[mode]["layer"]["lora_b"][0], np.float32), 0)


@jax.jit
def _bfloat16_outputs(a, b, grad_a, grad_b, scale):
  outputs = {y: lora_pro_adjust(a, b, grad_a, grad_b, scale, y=y) for y in ("sylvester", "zero")}
  outputs["g_eq"] = equivalent_gradient(a, b, grad_a, grad_b, scale)
  params = {"layer": {"lora_a": a, "lora_b": b}}
  grads = {"layer": {"lora_a": grad_a, "lora_b": grad_b}}
  for mode, factory in (("efficient", lora_pro), ("full", lora_pro_full)):
    optimizer = factory(1e-3, scale)
    outputs[mode], outputs[mode + "_state"] = optimizer.update(grads, optimizer.init(params), params)
  return outputs
