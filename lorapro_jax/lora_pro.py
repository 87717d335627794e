"""LoRA-Pro as optax transforms: LoRA factor gradients that best approximate full fine-tuning.

Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025, arXiv 2407.18242.

A LoRA pair adapts a kernel as ``K = K0 + s·A·B`` (``A``: n_in x r, ``B``: r x n_out, layout of
``lorapro_jax.adapters``). One gradient step on (A, B) moves K, to first order, by
``s·(gA·B + A·gB)``: the *equivalent gradient*. Plain LoRA uses the raw gradients
``gA_l = s·G·Bᵀ``, ``gB_l = s·Aᵀ·G`` (``G = ∂L/∂K``). LoRA-Pro chooses the (gA, gB) whose equivalent
gradient is closest to G, which is the projection of G onto the tangent space of the rank-r
manifold. With ``inv(M) = pinv(M + δ·I)`` (δ = ``ridge``) and a free r x r matrix Y::

  gA = (1/s²)·gA_l·inv(BBᵀ) + A·Y
  gB = (1/s²)·inv(AᵀA)·gB_l·(I − Bᵀ·inv(BBᵀ)·B) − Y·B
  g_eq = s·(gA·B + A·gB) = P_A·G + G·P_B − P_A·G·P_B        (for every Y)

``x_mode="sylvester"`` picks the Y closest to the raw gradients, solving
``(AᵀA)·Y + Y·(BBᵀ) = −(1/s²)·Aᵀ·gA_l·inv(BBᵀ)``; ``x_mode="zero"`` takes Y = 0.

Implementation: only r x r Gram matrices (``AᵀA``, ``BBᵀ``, ``Aᵀ·gA_l``, ``gB_l·Bᵀ``) are formed,
never an n x n projector, so sharded kernels only reduce r x r blocks. The Grams of all pairs of one
rank are stacked and decomposed by ONE batched ``eigh`` (``lorapro_jax.linalg``), which gives the
ridge inverses and the Sylvester basis together; all further r x r algebra is batched as well.

Gated pairs (a ``lora_c`` of shape (*stack, r), ``ΔK = s·A·diag(c)·B``): c is a constant of the
step for LoRA-Pro. The pair is adjusted as the two-factor pair ``(A·diag(c), diag(c)·B)`` — the
raw gradients are exactly ``s·G·(diag(c)·B)ᵀ`` and ``s·(A·diag(c))ᵀ·G``, and the first-order move of
K by steps of A and B is ``s·(gA·diag(c)·B + A·diag(c)·gB)`` — so the adjusted gradients are those of
A and B themselves and nothing divides by c. c keeps its raw gradient (ordinary AdamW in
``lora_pro``). Components with c_i = 0 (or a zero column of A / row of B) get exactly zero
adjusted gradients.

Example::

  import jax, jax.numpy as jnp, optax
  from lorapro_jax import lora_pro
  params = {"dense": {"lora_a": jnp.ones((4, 2)) / 2, "lora_b": jnp.zeros((2, 3))}}
  grads = {"dense": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.ones((2, 3))}}
  optimizer = lora_pro(1e-3, scale=2.0)                    # drop-in for optax.adamw(1e-3)
  state = optimizer.init(params)
  updates, state = optimizer.update(grads, state, params)
  params = optax.apply_updates(params, updates)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorapro_jax.adapters import (
    DEFAULT_KEYS, AdapterKeys, Path, _rebuild, adapter_paths, get_path, map_adapters, scale_at,
    validate_scale)
from lorapro_jax.linalg import (
    PSDEigh, compute_dtype, eigh_psd, refine_values, ridge_inverse, solve_sylvester)

X_MODES = ("sylvester", "zero")
MODES = ("efficient", "full")


class _Factors(NamedTuple):
  """One pair in compute dtype with its stack axes flattened into one leading axis p."""

  a: jax.Array      # (p, n_in, r)
  b: jax.Array      # (p, r, n_out)
  scale: jax.Array  # (p, 1, 1)


class _Geometry(NamedTuple):
  """r x r data fixed by the factors, stacked over the pairs of one group."""

  eig_a: PSDEigh
  eig_b: PSDEigh
  inv_a: jax.Array  # inv(AᵀA)
  inv_b: jax.Array  # inv(BBᵀ)


class _Coefficients(NamedTuple):
  """``gA = gA_l·right_a + A·y`` and ``gB = left_b·gB_l − right_b·B`` (all r x r)."""

  right_a: jax.Array
  y: jax.Array
  left_b: jax.Array
  right_b: jax.Array


def _check_options(x_mode: str, ridge: float) -> None:
  if x_mode not in X_MODES:
    raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")
  if not isinstance(ridge, (int, float)) or ridge < 0:
    raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")


def _factors(a: jax.Array, b: jax.Array, scale: Any, where: str = "pair") -> _Factors:
  if a.ndim < 2 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
    raise ValueError(f"{where}: expected lora_a (*stack, n_in, r) and lora_b (*stack, r, n_out), "
                     f"got shapes {a.shape} and {b.shape}")
  dtype = compute_dtype(jnp.result_type(a, b))
  rank = a.shape[-1]
  flat_a = a.reshape((-1,) + a.shape[-2:]).astype(dtype)
  flat_b = b.reshape((-1, rank, b.shape[-1])).astype(dtype)
  flat_scale = jnp.broadcast_to(jnp.asarray(scale, dtype), (flat_a.shape[0],))
  return _Factors(flat_a, flat_b, flat_scale[:, None, None])


def _flat_grads(factors: _Factors, grad_a: jax.Array, grad_b: jax.Array, shape_a, shape_b, where):
  if grad_a.shape != shape_a or grad_b.shape != shape_b:
    raise ValueError(f"{where}: gradients of shapes {grad_a.shape}, {grad_b.shape} do not match "
                     f"the factors' shapes {shape_a}, {shape_b}")
  return (grad_a.reshape(factors.a.shape).astype(factors.a.dtype),
          grad_b.reshape(factors.b.shape).astype(factors.b.dtype))


def _gram(x: jax.Array, y: jax.Array) -> jax.Array:
  """``xᵀ·y`` over the (possibly sharded) long axis: the only cross-device reduction."""
  return jnp.einsum("pnr,pnq->prq", x, y)


class _Groups:
  """Pairs grouped by (rank, dtype); the r x r algebra runs once per group on stacked arrays."""

  def __init__(self, factors: Sequence[_Factors], ridge: float):
    members: dict[tuple[int, Any], list[int]] = {}
    for index, pair in enumerate(factors):
      members.setdefault((pair.a.shape[-1], pair.a.dtype), []).append(index)
    self.members = list(members.values())
    self.sizes = [pair.a.shape[0] for pair in factors]
    self.scales = self.stack([pair.scale for pair in factors])
    self.geometry = []
    for group in self.members:
      # One eigh for both Grams of every pair in the group.
      grams = jnp.concatenate([_gram(factors[i].a, factors[i].a) for i in group]
                              + [_gram(factors[i].b.mT, factors[i].b.mT) for i in group])
      eig = eigh_psd(grams)
      half = grams.shape[0] // 2
      vectors_a = self.unstack(group, eig.vectors[:half])
      vectors_b = self.unstack(group, eig.vectors[half:])
      # Rayleigh quotients through the factors: ‖A·u‖² and ‖uᵀ·B‖² (see linalg.refine_values).
      norms = jnp.concatenate(
          [jnp.sum((factors[i].a @ u) ** 2, axis=-2) for i, u in zip(group, vectors_a)]
          + [jnp.sum((u.mT @ factors[i].b) ** 2, axis=-1) for i, u in zip(group, vectors_b)])
      eig = refine_values(eig, norms)
      eig_a = jax.tree.map(lambda x: x[:half], eig)
      eig_b = jax.tree.map(lambda x: x[half:], eig)
      self.geometry.append(_Geometry(eig_a, eig_b, ridge_inverse(eig_a, ridge),
                                     ridge_inverse(eig_b, ridge)))

  def unstack(self, group: Sequence[int], stacked: jax.Array) -> list[jax.Array]:
    """The rows of one group's stacked array, split back per pair (in group order)."""
    offsets = [0]
    for i in group:
      offsets.append(offsets[-1] + self.sizes[i])
    return [stacked[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]

  def stack(self, per_pair: Sequence[jax.Array]) -> list[jax.Array]:
    return [jnp.concatenate([per_pair[i] for i in group]) for group in self.members]

  def split(self, per_group: Sequence[Any]) -> list[Any]:
    out: list[Any] = [None] * len(self.sizes)
    for group, stacked in zip(self.members, per_group):
      leaves, treedef = jax.tree.flatten(stacked)
      rows = [self.unstack(group, leaf) for leaf in leaves]
      for position, i in enumerate(group):
        out[i] = treedef.unflatten([leaf_rows[position] for leaf_rows in rows])
    return out

  def coefficients(self, a_t_grad_a, grad_b_b_t, x_mode, y=None) -> list[_Coefficients]:
    """Closed-form coefficients for every pair from its r x r statistics ``Aᵀ·gA_l``, ``gB_l·Bᵀ``."""
    stacked_y = self.stack(y) if y is not None else [None] * len(self.members)
    per_group = [
        _coefficients(geometry, scale, ag, gb, x_mode, group_y)
        for geometry, scale, ag, gb, group_y in zip(
            self.geometry, self.scales, self.stack(a_t_grad_a), self.stack(grad_b_b_t), stacked_y)]
    return self.split(per_group)


def _coefficients(geometry: _Geometry, scale, a_t_grad_a, grad_b_b_t, x_mode, y) -> _Coefficients:
  inv_s2 = 1.0 / (scale * scale)
  right_a = geometry.inv_b * inv_s2
  left_b = geometry.inv_a * inv_s2
  if y is None:
    if x_mode == "sylvester":
      y = solve_sylvester(geometry.eig_a, geometry.eig_b, -(a_t_grad_a @ right_a))
    else:
      y = jnp.zeros_like(right_a)
  # gB_l·(I − Bᵀ·inv(BBᵀ)·B) = gB_l − (gB_l·Bᵀ)·inv(BBᵀ)·B: O(r²·n_out), no n_out x n_out projector.
  right_b = left_b @ grad_b_b_t @ geometry.inv_b + y.astype(left_b.dtype)
  return _Coefficients(right_a, y.astype(left_b.dtype), left_b, right_b)


def _apply(factors: _Factors, grad_a, grad_b, coefficients: _Coefficients):
  new_a = grad_a @ coefficients.right_a + factors.a @ coefficients.y
  new_b = coefficients.left_b @ grad_b - coefficients.right_b @ factors.b
  return new_a, new_b


def _equivalent(factors: _Factors, grad_a, grad_b) -> jax.Array:
  """``s·(gA·B + A·gB)`` as ONE product ``(s·[gA, A])·[B; gB]``: the kernel-sized result is written
  once (the scale is applied to an n x 2r operand, not to the kernel)."""
  left = factors.scale * jnp.concatenate([grad_a, factors.a], axis=-1)
  return left @ jnp.concatenate([factors.b, grad_b], axis=-2)


def _statistics(factors, grads):
  """The r x r statistics ``Aᵀ·gA_l`` and ``gB_l·Bᵀ`` of every pair."""
  return ([_gram(f.a, ga) for f, (ga, _) in zip(factors, grads)],
          [_gram(gb.mT, f.b.mT) for f, (_, gb) in zip(factors, grads)])


def _adjust_flat(factors, grads, x_mode, ridge, y=None):
  """Adjusted (gA, gB) for flat pairs, batched; ``y`` (per pair) overrides the choice of Y."""
  coefficients = _Groups(factors, ridge).coefficients(*_statistics(factors, grads), x_mode, y)
  return [_apply(f, ga, gb, c) for f, (ga, gb), c in zip(factors, grads, coefficients)]


def _one_pair(a, b, grad_a, grad_b, scale):
  factors = _factors(a, b, scale)
  return factors, _flat_grads(factors, grad_a, grad_b, a.shape, b.shape, "pair")


def _adjust_with_y(a, b, grad_a, grad_b, scale, y, *, ridge=1e-8):
  """The closed form with a caller-given Y of shape (*stack, r, r) (Y-independence checks)."""
  factors, grads = _one_pair(a, b, grad_a, grad_b, scale)
  flat_y = jnp.asarray(y).reshape((-1,) + factors.a.shape[-1:] * 2).astype(factors.a.dtype)
  (new_a, new_b), = _adjust_flat([factors], [grads], "zero", ridge, y=[flat_y])
  return new_a.reshape(a.shape).astype(grad_a.dtype), new_b.reshape(b.shape).astype(grad_b.dtype)


def sylvester_y(a, b, grad_a, grad_b, scale, *, ridge=1e-8) -> jax.Array:
  """The Sylvester Y of ``x_mode="sylvester"``, shape (*stack, r, r)."""
  _check_options("sylvester", ridge)
  factors, grads = _one_pair(a, b, grad_a, grad_b, scale)
  coefficients, = _Groups([factors], ridge).coefficients(*_statistics([factors], [grads]),
                                                         "sylvester")
  return coefficients.y.reshape(a.shape[:-2] + (a.shape[-1],) * 2)


def lora_pro_adjust(a, b, grad_a, grad_b, scale, *, x_mode="sylvester", ridge=1e-8):
  """LoRA-Pro's adjusted gradients ``(gA, gB)`` of one pair from its raw LoRA gradients.

  Args:
    a: ``lora_a``, shape (*stack, n_in, r); leading stack axes are independent pairs.
    b: ``lora_b``, shape (*stack, r, n_out).
    grad_a, grad_b: the raw gradients ``∂L/∂A = s·G·Bᵀ`` and ``∂L/∂B = s·Aᵀ·G``.
    scale: the LoRA scale s (alpha / r, or alpha / sqrt(r) for rsLoRA), a number or an array
      broadcastable to the stack shape.
    x_mode: "sylvester" (Y closest to the raw gradients) or "zero" (Y = 0).
    ridge: δ of ``inv(M) = pinv(M + δ·I)``.

  Returns:
    ``(gA, gB)`` in the gradients' dtypes (the r x r algebra runs in at least float32). At B = 0
    this is exactly ``gA = 0``, ``gB = (1/s)·inv(AᵀA)·Aᵀ·G``.
  """
  _check_options(x_mode, ridge)
  factors, grads = _one_pair(a, b, grad_a, grad_b, scale)
  (new_a, new_b), = _adjust_flat([factors], [grads], x_mode, ridge)
  return new_a.reshape(a.shape).astype(grad_a.dtype), new_b.reshape(b.shape).astype(grad_b.dtype)


def equivalent_gradient(a, b, grad_a, grad_b, scale, *, ridge=1e-8) -> jax.Array:
  """``g_eq = s·(gA·B + A·gB)`` of LoRA-Pro's adjusted gradients, shape (*stack, n_in, n_out).

  Equals the tangent-space projection ``P_A·G + G·P_B − P_A·G·P_B`` of the full gradient G (up to
  the ridge), whatever Y. For the equivalent gradient of *plain* LoRA use
  ``s·(grad_a·B + A·grad_b)`` directly.
  """
  _check_options("zero", ridge)
  factors, grads = _one_pair(a, b, grad_a, grad_b, scale)
  (new_a, new_b), = _adjust_flat([factors], [grads], "zero", ridge)
  g_eq = _equivalent(factors, new_a, new_b)
  return g_eq.reshape(a.shape[:-1] + b.shape[-1:]).astype(jnp.result_type(grad_a, grad_b))


# ---------------------------------------------------------------------------------------------
# Pytree transforms
# ---------------------------------------------------------------------------------------------


def _effective(node, keys: AdapterKeys):
  """The two-factor pair of a node: (A·diag(c), diag(c)·B) for gated pairs, else (A, B)."""
  a, b = node[keys.a], node[keys.b]
  if keys.c in node:
    c = node[keys.c]
    if c.shape != a.shape[:-2] + a.shape[-1:]:
      raise ValueError(f"{keys.c} must have shape (*stack, r) = {a.shape[:-2] + a.shape[-1:]}, "
                       f"got {c.shape}")
    return a * c[..., None, :], c[..., :, None] * b
  return a, b


def _delta_kernel(node, keys: AdapterKeys, scale) -> jax.Array:
  """The pair's kernel update ``s·A·diag(c)·B``, shape (*stack, n_in, n_out), compute dtype."""
  a, b = node[keys.a], node[keys.b]
  if keys.c in node:
    a = a * node[keys.c][..., None, :]
  dtype = compute_dtype(jnp.result_type(a, b))
  return jnp.asarray(scale, dtype) * (a.astype(dtype) @ b.astype(dtype))


def _require_params(params, name: str):
  if params is None:
    raise ValueError(f"{name} needs the current parameters: call update(grads, state, params)")


def _collect(updates, params, scale, keys):
  """Paths, flat factors and flat gradients of every pair in ``params``."""
  paths = adapter_paths(params, keys)
  factors, grads = [], []
  for path in paths:
    where = "/".join(path) or "<root>"
    node, grad_node = get_path(params, path), get_path(updates, path)
    a, b = _effective(node, keys)
    pair = _factors(a, b, scale_at(scale, path), where)
    factors.append(pair)
    grads.append(_flat_grads(pair, grad_node[keys.a], grad_node[keys.b], a.shape, b.shape, where))
  return paths, factors, grads


def _replace_pairs(updates, new: dict[Path, tuple[jax.Array, jax.Array]], keys, rest=None):
  """``updates`` with each pair's A/B entries replaced; other entries from ``rest`` if given."""

  def node_fn(path, node, *rest_node):
    a, b = new[path]
    items = dict(rest_node[0]) if rest_node else dict(node)
    items[keys.a] = a.reshape(node[keys.a].shape).astype(node[keys.a].dtype)
    items[keys.b] = b.reshape(node[keys.b].shape).astype(node[keys.b].dtype)
    return _rebuild(node, {k: items[k] for k in node})

  return map_adapters(node_fn, updates, *(() if rest is None else (rest,)), keys=keys,
                      other=None if rest is None else (lambda path, leaf, rest_leaf: rest_leaf))


def lora_pro_project(scale, *, x_mode="sylvester", ridge=1e-8,
                     keys: AdapterKeys = DEFAULT_KEYS) -> optax.GradientTransformation:
  """Replaces every LoRA pair's gradients by LoRA-Pro's adjusted ones; other leaves pass through.

  Chain it before any optax optimizer; ``optax.chain(lora_pro_project(s), optax.adamw(lr))`` is the
  paper's "efficient" mode (per-factor Adam moments). Needs ``params`` in ``update``.

  Args:
    scale: the LoRA scale s, one number or a tree mirroring the adapter nodes (``LoRAConfig.scales``).
    x_mode: "sylvester" or "zero" (see ``lora_pro_adjust``).
    ridge: δ of the ridge inverse.
    keys: key names of the factors inside adapter nodes.
  """
  _check_options(x_mode, ridge)

  def init_fn(params):
    validate_scale(scale, params, keys)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    _require_params(params, "lora_pro_project")
    paths, factors, grads = _collect(updates, params, scale, keys)
    adjusted = _adjust_flat(factors, grads, x_mode, ridge) if paths else []
    return _replace_pairs(updates, dict(zip(paths, adjusted)), keys), state

  return optax.GradientTransformation(init_fn, update_fn)


class LoRAProFullState(NamedTuple):
  """State of ``lora_pro_full_direction``: ``inner`` runs on the full-rank equivalent gradients
  (a nested dict with one (*stack, n_in, n_out) array per adapter path), ``rest`` (Adam) on the
  other trainable leaves."""

  inner: optax.OptState
  rest: optax.OptState


def _nest(paths: Sequence[Path], values: Sequence[Any]) -> dict:
  tree: dict = {}
  for path, value in zip(paths, values):
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1] if path else ""] = value
  return tree


def _unnest(tree: dict, paths: Sequence[Path]) -> list[Any]:
  return [get_path(tree, path if path else ("",)) for path in paths]


def _without_factors(tree, keys):
  """``tree`` with the A/B entries of each adapter node dropped (gates and others kept)."""
  return map_adapters(
      lambda path, node: {k: v for k, v in node.items() if k not in (keys.a, keys.b)},
      tree, keys=keys)


def lora_pro_full_direction(scale, *, inner: optax.GradientTransformation,
                            rest: optax.GradientTransformation, x_mode="sylvester", ridge=1e-8,
                            keys: AdapterKeys = DEFAULT_KEYS) -> optax.GradientTransformation:
  """The paper's full-rank mode without weight decay and learning rate.

  Per pair: ``g_eq`` (the equivalent gradient of the adjusted raw gradients) goes through
  ``inner`` (e.g. ``optax.scale_by_adam``: full-rank moments of shape (*stack, n_in, n_out)) to a
  direction U, which is projected back to the factors: ``(dA, dB) = adjust(s·U·Bᵀ, s·Aᵀ·U)`` with
  ``x_mode``'s Y, the Grams' decompositions reused. Other leaves (and gates) go through ``rest``.
  ``inner`` sees, as its ``params``, each pair's kernel update ``ΔK = s·A·diag(c)·B`` (computed
  only if ``inner`` reads the values: under ``jit`` XLA drops it otherwise).
  """
  _check_options(x_mode, ridge)

  def init_fn(params):
    validate_scale(scale, params, keys)
    paths = adapter_paths(params, keys)
    kernels = []
    for path in paths:
      node = get_path(params, path)
      a, b = node[keys.a], node[keys.b]
      # Built from both factors so that the kernel-shaped state inherits their shardings.
      zeros = jnp.zeros_like(a[..., :, :1]) * jnp.zeros_like(b[..., :1, :])
      kernels.append(zeros.astype(compute_dtype(zeros.dtype)))
    return LoRAProFullState(inner.init(_nest(paths, kernels)),
                            rest.init(_without_factors(params, keys)))

  def update_fn(updates, state, params=None):
    _require_params(params, "lora_pro_full_direction")
    paths, factors, grads = _collect(updates, params, scale, keys)
    rest_updates, rest_state = rest.update(_without_factors(updates, keys), state.rest,
                                           _without_factors(params, keys))
    if not paths:
      return rest_updates, LoRAProFullState(state.inner, rest_state)
    groups = _Groups(factors, ridge)
    zero_mode = groups.coefficients(*_statistics(factors, grads), "zero")
    g_eq = []
    for pair, (ga, gb), coefficients, path in zip(factors, grads, zero_mode, paths):
      node = get_path(params, path)
      full_shape = node[keys.a].shape[:-1] + node[keys.b].shape[-1:]
      g_eq.append(_equivalent(pair, *_apply(pair, ga, gb, coefficients)).reshape(full_shape))
    # inner's params: each pair's kernel update ΔK = s·A·diag(c)·B (dead code unless it reads them)
    deltas = [_delta_kernel(get_path(params, path), keys, scale_at(scale, path)) for path in paths]
    directions, inner_state = inner.update(_nest(paths, g_eq), state.inner, _nest(paths, deltas))
    directions = [u.reshape(f.a.shape[:-1] + f.b.shape[-1:]).astype(f.a.dtype)
                  for u, f in zip(_unnest(directions, paths), factors)]
    # Raw gradients of the direction: s·U·Bᵀ and s·Aᵀ·U; both r x r statistics are s·Aᵀ·U·Bᵀ.
    projected = [(u @ (f.scale * f.b).mT, (f.scale * f.a).mT @ u)
                 for f, u in zip(factors, directions)]
    cross = [_gram(f.a, ga) for f, (ga, _) in zip(factors, projected)]
    coefficients = groups.coefficients(cross, cross, x_mode)
    new = {path: _apply(f, ga, gb, c)
           for path, f, (ga, gb), c in zip(paths, factors, projected, coefficients)}
    return (_replace_pairs(updates, new, keys, rest_updates),
            LoRAProFullState(inner_state, rest_state))

  return optax.GradientTransformation(init_fn, update_fn)


def _in_compute_dtype(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``inner`` on float32 copies of low-precision leaves (moments included), then casts the
  updates back: an Adam second moment kept in bfloat16 never decays (``0.999·v`` rounds to v)."""
  promote = lambda tree: jax.tree.map(lambda x: x.astype(compute_dtype(x.dtype)), tree)

  def init_fn(params):
    return inner.init(promote(params))

  def update_fn(updates, state, params=None):
    new, state = inner.update(promote(updates), state, None if params is None else promote(params))
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def lora_pro(learning_rate, scale, *, mode="efficient", b1=0.9, b2=0.999, eps=1e-8,
             weight_decay=0.0, x_mode="sylvester", ridge=1e-8, inner=None,
             keys: AdapterKeys = DEFAULT_KEYS) -> optax.GradientTransformation:
  """LoRA-Pro with AdamW, a drop-in replacement for ``optax.adamw`` on a LoRA trainable tree.

  * ``mode="efficient"``: ``chain(lora_pro_project(scale), optax.adamw(...))`` — the adjusted
    factor gradients get ordinary per-factor AdamW moments.
  * ``mode="full"`` (the paper's AdamW): full-rank moments of each pair's equivalent gradient, the
    Adam direction U projected back to (A, B) with the Sylvester Y, then decoupled weight decay on
    A and B: ``A ← A − lr·(dA + wd·A)``, same for B. ``inner`` replaces Adam on the full-rank
    equivalent gradient (any optax transform, e.g. a factored second moment with memory
    O(n_in + n_out)); it must not scale by the learning rate.

  Every other trainable leaf (heads, ``modules_to_save``, gates ``lora_c``) gets ordinary AdamW
  with the same hyperparameters. Bias correction uses t = 1 at the first step, as optax does.
  Moments are kept in at least float32 (bfloat16 parameters get float32 moments).

  Args:
    learning_rate: a float or an optax schedule.
    scale: the LoRA scale s: a number or a tree of per-pair scales (``LoRAConfig.scales``).
    mode: "efficient" or "full".
    b1, b2, eps: Adam's hyperparameters.
    weight_decay: decoupled weight decay (applied to A and B, and to other leaves).
    x_mode: "sylvester" or "zero": the Y of the adjustment (in full mode, of the projection).
    ridge: δ of the ridge inverse ``pinv(M + δ·I)``.
    inner: full mode only: the transform on the full-rank equivalent gradient (default
      ``optax.scale_by_adam(b1, b2, eps)``).
    keys: key names of the factors inside adapter nodes.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if mode == "efficient":
    if inner is not None:
      raise ValueError("inner is used only by mode='full'; for other per-factor optimizers chain "
                       "lora_pro_project(scale) with them")
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(lora_pro_project(scale, x_mode=x_mode, ridge=ridge, keys=keys),
                       _in_compute_dtype(adamw))
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return optax.chain(
      lora_pro_full_direction(scale, inner=adam if inner is None else inner,
                              rest=_in_compute_dtype(adam), x_mode=x_mode, ridge=ridge, keys=keys),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
