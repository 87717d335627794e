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

``y="sylvester"`` picks the Y closest to the raw gradients, solving
``(AᵀA)·Y + Y·(BBᵀ) = −(1/s²)·Aᵀ·gA_l·inv(BBᵀ)``; ``y="zero"`` takes Y = 0.

Two optimizers, composed from small transforms as ``optax.adamw`` is:

* ``lora_pro``      = ``chain(lora_pro_project, adamw)``: the adjusted factor gradients get
  ordinary per-factor AdamW moments (the paper's efficient variant);
* ``lora_pro_full`` = ``chain(lora_pro_full_direction, adam on the other leaves,
  add_decayed_weights, scale_by_learning_rate)``: full-rank Adam moments of each pair's equivalent
  gradient, the direction projected back to (A, B) with the Sylvester Y (the paper's AdamW).

Implementation: only r x r Gram matrices (``AᵀA``, ``BBᵀ``, ``Aᵀ·gA_l``, ``gB_l·Bᵀ``) are formed,
never an n x n projector, so sharded kernels only reduce r x r blocks. The Grams of all pairs of one
rank are stacked and decomposed by ONE batched ``eigh`` (``lorapro_jax.linalg``), which gives the
ridge inverses and the Sylvester basis together; all further r x r algebra is batched as well.

Gated pairs (a ``lora_c`` of shape (*stack, r), ``ΔK = s·A·diag(c)·B``): c is a constant of the
step for LoRA-Pro. The pair is adjusted as the two-factor pair ``(A·diag(c), diag(c)·B)`` — the
raw gradients are exactly ``s·G·(diag(c)·B)ᵀ`` and ``s·(A·diag(c))ᵀ·G``, and the first-order move of
K by steps of A and B is ``s·(gA·diag(c)·B + A·diag(c)·gB)`` — so the adjusted gradients are those of
A and B themselves and nothing divides by c. c keeps its raw gradient (ordinary AdamW). Components
with c_i = 0 (or a zero column of A / row of B) get exactly zero adjusted gradients.

>>> import jax, jax.numpy as jnp, optax
>>> params = {"dense": {"lora_a": jnp.ones((4, 2)) / 2, "lora_b": jnp.zeros((2, 3))}}
>>> grads = {"dense": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.ones((2, 3))}}
>>> optimizer = lora_pro(1e-3, scale=2.0)                  # drop-in for optax.adamw(1e-3)
>>> state = optimizer.init(params)
>>> updates, state = optimizer.update(grads, state, params)
>>> params = optax.apply_updates(params, updates)
>>> jax.tree.map(jnp.shape, params)
{'dense': {'lora_a': (4, 2), 'lora_b': (2, 3)}}
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lorapro_jax.adapters import (
    DEFAULT_KEYS, AdapterKeys, Path, adapter_paths, check_pair, dotted, get_path, map_adapters,
    rebuild, scale_at, validate_scale)
from lorapro_jax.linalg import (
    PSDEigh, compute_dtype, eigh_psd, refine_values, ridge_inverse, solve_sylvester)
from lorapro_jax.lora import kernel_update
from lorapro_jax.trees import named_leaves

Y_CHOICES = ("sylvester", "zero")


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


def _check_options(y: str, ridge: Any) -> None:
  if y not in Y_CHOICES:
    raise ValueError(f"y must be one of {Y_CHOICES}, got {y!r}")
  if isinstance(ridge, jax.core.Tracer):
    # Injected by optax.inject_hyperparams: a traced value, known only when the step runs.
    return
  if (not isinstance(ridge, (int, float, np.ndarray, jax.Array)) or np.ndim(ridge) != 0
      or not float(ridge) >= 0):
    raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")


def _check_adam(learning_rate: Any, b1: Any, b2: Any, eps: Any, weight_decay: Any) -> None:
  """AdamW's hyperparameters, where they are numbers (a traced value under
  ``optax.inject_hyperparams`` is known only when the step runs; a schedule is a callable)."""
  ranges = {"learning_rate": (0.0, np.inf, "a number >= 0 or an optax schedule"),
            "b1": (0.0, 1.0, "in [0, 1)"), "b2": (0.0, 1.0, "in [0, 1)"),
            "eps": (0.0, np.inf, "a finite number >= 0"),
            "weight_decay": (0.0, np.inf, "a finite number >= 0")}
  values = dict(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  for name, value in values.items():
    if isinstance(value, jax.core.Tracer) or (name == "learning_rate" and callable(value)):
      continue
    low, high, expected = ranges[name]
    if (isinstance(value, (bool, str)) or np.ndim(value) != 0
        or not low <= float(value) < high):
      raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_keys(keys: Any) -> None:
  if not isinstance(keys, AdapterKeys):
    raise TypeError(f"keys must be an AdapterKeys (e.g. AdapterKeys(a='lora_A', b='lora_B')), got "
                    f"{keys!r}")


def _check_pairs(params, paths: Sequence[Path], keys: AdapterKeys) -> None:
  """Every pair's shapes, at ``init``: a mismatch would otherwise surface at the first step."""
  for path in paths:
    _effective(get_path(params, path), keys, dotted(path) or "<root>")


def _factors(a: jax.Array, b: jax.Array, scale: Any) -> _Factors:
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

  def __init__(self, factors: Sequence[_Factors], ridge: Any):
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

  def coefficients(self, a_t_grad_a, grad_b_b_t, y: str) -> list[_Coefficients]:
    """Closed-form coefficients for every pair from its r x r statistics ``Aᵀ·gA_l``, ``gB_l·Bᵀ``."""
    per_group = [
        _coefficients(geometry, scale, ag, gb, y)
        for geometry, scale, ag, gb in zip(
            self.geometry, self.scales, self.stack(a_t_grad_a), self.stack(grad_b_b_t))]
    return self.split(per_group)


def _coefficients(geometry: _Geometry, scale, a_t_grad_a, grad_b_b_t, y: str) -> _Coefficients:
  inv_s2 = 1.0 / (scale * scale)
  right_a = geometry.inv_b * inv_s2
  left_b = geometry.inv_a * inv_s2
  if y == "sylvester":
    y_matrix = solve_sylvester(geometry.eig_a, geometry.eig_b, -(a_t_grad_a @ right_a))
  else:
    y_matrix = jnp.zeros_like(right_a)
  # gB_l·(I − Bᵀ·inv(BBᵀ)·B) = gB_l − (gB_l·Bᵀ)·inv(BBᵀ)·B: O(r²·n_out), no n_out x n_out projector.
  right_b = left_b @ grad_b_b_t @ geometry.inv_b + y_matrix
  return _Coefficients(right_a, y_matrix, left_b, right_b)


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


def _adjust_flat(factors, grads, y, ridge):
  """Adjusted (gA, gB) for flat pairs, batched."""
  coefficients = _Groups(factors, ridge).coefficients(*_statistics(factors, grads), y)
  return [_apply(f, ga, gb, c) for f, (ga, gb), c in zip(factors, grads, coefficients)]


def _one_pair(a, b, grad_a, grad_b, scale):
  check_pair(a, b, where="pair")
  validate_scale(scale, {DEFAULT_KEYS.a: a, DEFAULT_KEYS.b: b})
  factors = _factors(a, b, scale)
  return factors, _flat_grads(factors, grad_a, grad_b, a.shape, b.shape, "pair")


def lora_pro_adjust(a, b, grad_a, grad_b, scale, *, y: str = "sylvester", ridge=1e-8):
  """LoRA-Pro's adjusted gradients ``(gA, gB)`` of one pair from its raw LoRA gradients.

  ``gA = (1/s²)·gA_l·inv(BBᵀ) + A·Y`` and ``gB = (1/s²)·inv(AᵀA)·gB_l·(I − Bᵀ·inv(BBᵀ)·B) − Y·B``
  (Wang et al., ICLR 2025, in this library's layout), with Y the Sylvester
  solution or 0. At B = 0 this is exactly ``gA = 0``, ``gB = (1/s)·inv(AᵀA)·Aᵀ·G``:

  >>> import jax.numpy as jnp
  >>> a = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])   # n_in = 3, r = 2
  >>> b = jnp.zeros((2, 4))                                   # B = 0: standard initialisation
  >>> g, s = jnp.arange(12.0).reshape(3, 4), 2.0             # G = ∂L/∂K and the LoRA scale
  >>> new_a, new_b = lora_pro_adjust(a, b, s * g @ b.T, s * a.T @ g, s)
  >>> bool(jnp.all(new_a == 0)), bool(jnp.allclose(new_b, jnp.linalg.pinv(a) @ g / s))
  (True, True)

  Args:
    a: ``lora_a``, shape (*stack, n_in, r); leading stack axes are independent pairs.
    b: ``lora_b``, shape (*stack, r, n_out).
    grad_a, grad_b: the raw gradients ``∂L/∂A = s·G·Bᵀ`` and ``∂L/∂B = s·Aᵀ·G``.
    scale: the LoRA scale s (alpha / r, or alpha / sqrt(r) for rsLoRA), a number or an array
      broadcastable to the stack shape.
    y: "sylvester" (the Y closest to the raw gradients) or "zero" (Y = 0).
    ridge: δ of ``inv(M) = pinv(M + δ·I)``.

  Returns:
    ``(gA, gB)`` in the gradients' dtypes (the r x r algebra runs in at least float32).
  """
  _check_options(y, ridge)
  factors, grads = _one_pair(a, b, grad_a, grad_b, scale)
  (new_a, new_b), = _adjust_flat([factors], [grads], y, ridge)
  return new_a.reshape(a.shape).astype(grad_a.dtype), new_b.reshape(b.shape).astype(grad_b.dtype)


def equivalent_gradient(a, b, grad_a, grad_b, scale, *, ridge=1e-8) -> jax.Array:
  """``g_eq = s·(gA·B + A·gB)`` of LoRA-Pro's adjusted gradients, shape (*stack, n_in, n_out).

  Equals the tangent-space projection ``P_A·G + G·P_B − P_A·G·P_B`` of the full gradient G (up to
  the ridge), whatever Y (Wang et al., ICLR 2025). For the equivalent gradient of *plain* LoRA use
  ``s·(grad_a·B + A·grad_b)`` directly.

  >>> import jax, jax.numpy as jnp
  >>> keys = jax.random.split(jax.random.key(0), 3)
  >>> a, b = jax.random.normal(keys[0], (5, 2)), jax.random.normal(keys[1], (2, 4))
  >>> g, s = jax.random.normal(keys[2], (5, 4)), 2.0
  >>> g_eq = equivalent_gradient(a, b, s * g @ b.T, s * a.T @ g, s)
  >>> p_a, p_b = a @ jnp.linalg.pinv(a), jnp.linalg.pinv(b) @ b   # onto the spans of A and Bᵀ
  >>> bool(jnp.allclose(g_eq, p_a @ g + g @ p_b - p_a @ g @ p_b, atol=1e-4))
  True
  """
  _check_options("zero", ridge)
  factors, grads = _one_pair(a, b, grad_a, grad_b, scale)
  (new_a, new_b), = _adjust_flat([factors], [grads], "zero", ridge)
  g_eq = _equivalent(factors, new_a, new_b)
  return g_eq.reshape(a.shape[:-1] + b.shape[-1:]).astype(jnp.result_type(grad_a, grad_b))


# ---------------------------------------------------------------------------------------------
# Pytree transforms
# ---------------------------------------------------------------------------------------------


def _effective(node, keys: AdapterKeys, where: str):
  """The two-factor pair of a node: (A·diag(c), diag(c)·B) for gated pairs, else (A, B)."""
  a, b, c = node[keys.a], node[keys.b], node.get(keys.c)
  check_pair(a, b, c, where=where, keys=keys)
  if c is None:
    return a, b
  return a * c[..., None, :], c[..., :, None] * b


def _pair_paths(tree, keys: AdapterKeys, caller: str) -> list[Path]:
  """The adapter paths of ``tree``; none is an error: LoRA-Pro would silently be its inner
  optimizer (e.g. PEFT's ``lora_A``/``lora_B`` names, or a wrong ``keys``)."""
  paths = adapter_paths(tree, keys)
  if paths:
    return paths
  lookalikes = [dotted(path) for path, _ in named_leaves(tree)
                if path and "lora" in path[-1].lower()]
  hint = (f"; leaves named like adapters: {', '.join(lookalikes[:4])}"
          f"{' ...' if len(lookalikes) > 4 else ''} — name them with "
          f"keys=AdapterKeys(a=..., b=...) "
          f"(PEFT's lora_A / lora_B are stored transposed: convert with lorapro_jax.import_peft)"
          if lookalikes else "")
  raise ValueError(f"{caller}: no LoRA pair in the tree (no mapping holds both {keys.a!r} and "
                   f"{keys.b!r}); without pairs LoRA-Pro would silently be its inner "
                   f"optimizer{hint}")


def _require_params(params, name: str):
  if params is None:
    raise ValueError(f"{name} needs the current parameters: call update(grads, state, params)")


def _collect(updates, params, scale, keys, caller):
  """Paths, flat factors and flat gradients of every pair in ``params``."""
  paths = _pair_paths(params, keys, caller)
  factors, grads = [], []
  for path in paths:
    where = dotted(path) or "<root>"
    node = get_path(params, path)
    try:
      grad_node = get_path(updates, path)
    except KeyError:
      raise ValueError(f"{caller}: the updates have no entry for the adapter pair {where}: they "
                       "must mirror the params") from None
    a, b = _effective(node, keys, where)
    pair = _factors(a, b, scale_at(scale, path))
    factors.append(pair)
    grads.append(_flat_grads(pair, grad_node[keys.a], grad_node[keys.b], a.shape, b.shape, where))
  return paths, factors, grads


def _replace_pairs(updates, new: dict[Path, tuple[jax.Array, jax.Array]], keys):
  """``updates`` with each pair's A/B entries replaced; every other leaf as it was."""

  def node_fn(path, node):
    a, b = new[path]
    items = dict(node)
    items[keys.a] = a.reshape(node[keys.a].shape).astype(node[keys.a].dtype)
    items[keys.b] = b.reshape(node[keys.b].shape).astype(node[keys.b].dtype)
    return rebuild(node, items)

  return map_adapters(node_fn, updates, keys=keys)


def lora_pro_project(scale, *, y: str = "sylvester", ridge=1e-8,
                     keys: AdapterKeys = DEFAULT_KEYS) -> optax.GradientTransformation:
  """Replaces every LoRA pair's gradients by LoRA-Pro's adjusted ones; other leaves pass through.

  Per pair ``(gA_l, gB_l) ↦ lora_pro_adjust(A, B, gA_l, gB_l, s)`` (Wang et al., ICLR 2025), all
  pairs of one rank batched. Chain it before any optax optimizer:
  ``optax.chain(lora_pro_project(s), optax.adamw(lr))`` is ``lora_pro(lr, s)``. Needs ``params`` in
  ``update``; a tree without any pair raises (LoRA-Pro would silently be the inner optimizer).

  >>> import jax.numpy as jnp, optax
  >>> params = {"dense": {"lora_a": jnp.eye(3, 2), "lora_b": jnp.ones((2, 4))}}
  >>> grads = {"dense": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 4))}}
  >>> optimizer = optax.chain(lora_pro_project(2.0), optax.sgd(0.1))
  >>> updates, _ = optimizer.update(grads, optimizer.init(params), params)
  >>> node = params["dense"]
  >>> expected = lora_pro_adjust(node["lora_a"], node["lora_b"], grads["dense"]["lora_a"],
  ...                            grads["dense"]["lora_b"], 2.0)
  >>> bool(jnp.allclose(updates["dense"]["lora_a"], -0.1 * expected[0]))
  True

  Args:
    scale: the LoRA scale s, one number or a tree mirroring the adapter nodes
      (``LoRAConfig.scales``).
    y: "sylvester" or "zero" (see ``lora_pro_adjust``).
    ridge: δ of the ridge inverse.
    keys: key names of the factors inside adapter nodes.
  """
  _check_options(y, ridge)
  _check_keys(keys)

  def init_fn(params):
    _check_pairs(params, _pair_paths(params, keys, "lora_pro_project"), keys)
    validate_scale(scale, params, keys)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    _require_params(params, "lora_pro_project")
    paths, factors, grads = _collect(updates, params, scale, keys, "lora_pro_project")
    adjusted = _adjust_flat(factors, grads, y, ridge)
    return _replace_pairs(updates, dict(zip(paths, adjusted)), keys), state

  return optax.GradientTransformation(init_fn, update_fn)


class LoRAProFullState(NamedTuple):
  """State of ``lora_pro_full_direction``: the state of ``inner`` on the full-rank equivalent
  gradients, a tree mirroring the adapter nodes (like a scale tree) with one (*stack, n_in, n_out)
  array per pair."""

  inner: optax.OptState


def _by_path(paths: Sequence[Path], values: Sequence[Any]) -> Any:
  """One value per adapter path, nested as the adapter tree (a tree that is itself a pair: the
  value)."""
  if list(paths) == [()]:
    return values[0]
  return traverse_util.unflatten_dict(dict(zip(paths, values)))


def _at_paths(tree: Any, paths: Sequence[Path]) -> list[Any]:
  if list(paths) == [()]:
    return [tree]
  flat = traverse_util.flatten_dict(tree)
  return [flat[path] for path in paths]


def lora_pro_full_direction(scale, *, inner: optax.GradientTransformation, y: str = "sylvester",
                            ridge=1e-8, keys: AdapterKeys = DEFAULT_KEYS
                            ) -> optax.GradientTransformation:
  """The direction of the paper's full-rank AdamW, without weight decay and learning rate.

  Per pair (Wang et al., ICLR 2025): the equivalent gradient ``g_eq`` of the adjusted
  raw gradients goes through ``inner`` (e.g. ``optax.scale_by_adam``: full-rank moments of shape
  (*stack, n_in, n_out)) to a direction U, which is projected back to the factors:
  ``(dA, dB) = lora_pro_adjust(A, B, s·U·Bᵀ, s·Aᵀ·U, s)`` with the chosen Y, the Grams'
  decompositions reused. Every other leaf (heads, gates ``lora_c``) passes through unchanged.
  ``inner`` sees, as its ``params``, each pair's kernel update ``ΔK = s·A·diag(c)·B``
  (``lorapro_jax.lora.kernel_update``; computed only if ``inner`` reads it: under ``jit`` XLA drops
  it otherwise).

  >>> import jax.numpy as jnp, optax
  >>> params = {"dense": {"lora_a": jnp.eye(3, 2), "lora_b": jnp.ones((2, 4))}}
  >>> grads = {"dense": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 4))}}
  >>> direction = lora_pro_full_direction(2.0, inner=optax.scale_by_rms())
  >>> state = direction.init(params)
  >>> state.inner.nu["dense"].shape                      # a full-rank second moment
  (3, 4)

  Args:
    scale: the LoRA scale s, one number or a tree mirroring the adapter nodes.
    inner: the transform on the full-rank equivalent gradients; it must not scale by the learning
      rate (``lora_pro_full`` applies it afterwards).
    y: "sylvester" or "zero": the Y of the projection back to (A, B).
    ridge: δ of the ridge inverse.
    keys: key names of the factors inside adapter nodes.
  """
  _check_options(y, ridge)
  _check_keys(keys)
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax GradientTransformation (e.g. optax.scale_by_adam()), "
                    f"got {inner!r}")

  def init_fn(params):
    paths = _pair_paths(params, keys, "lora_pro_full_direction")
    _check_pairs(params, paths, keys)
    validate_scale(scale, params, keys)
    kernels = []
    for path in paths:
      node = get_path(params, path)
      a, b = node[keys.a], node[keys.b]
      # Built from both factors so that the kernel-shaped state inherits their shardings.
      zeros = jnp.zeros_like(a[..., :, :1]) * jnp.zeros_like(b[..., :1, :])
      kernels.append(zeros.astype(compute_dtype(zeros.dtype)))
    return LoRAProFullState(inner.init(_by_path(paths, kernels)))

  def update_fn(updates, state, params=None):
    _require_params(params, "lora_pro_full_direction")
    paths, factors, grads = _collect(updates, params, scale, keys, "lora_pro_full_direction")
    groups = _Groups(factors, ridge)
    zero_y = groups.coefficients(*_statistics(factors, grads), "zero")
    g_eq = [_equivalent(pair, *_apply(pair, ga, gb, coefficients))
            for pair, (ga, gb), coefficients in zip(factors, grads, zero_y)]
    nodes = [get_path(params, path) for path in paths]
    shapes = [node[keys.a].shape[:-1] + node[keys.b].shape[-1:] for node in nodes]
    deltas = [kernel_update(node[keys.a], node[keys.b], node.get(keys.c), scale_at(scale, path))
              for path, node in zip(paths, nodes)]
    directions, inner_state = inner.update(
        _by_path(paths, [g.reshape(shape) for g, shape in zip(g_eq, shapes)]), state.inner,
        _by_path(paths, deltas))
    directions = [u.reshape(f.a.shape[:-1] + f.b.shape[-1:]).astype(f.a.dtype)
                  for u, f in zip(_at_paths(directions, paths), factors)]
    # Raw gradients of the direction: s·U·Bᵀ and s·Aᵀ·U; both r x r statistics are s·Aᵀ·U·Bᵀ.
    projected = [(u @ (f.scale * f.b).mT, (f.scale * f.a).mT @ u)
                 for f, u in zip(factors, directions)]
    cross = [_gram(f.a, ga) for f, (ga, _) in zip(factors, projected)]
    coefficients = groups.coefficients(cross, cross, y)
    new = {path: _apply(f, ga, gb, c)
           for path, f, (ga, gb), c in zip(paths, factors, projected, coefficients)}
    return _replace_pairs(updates, new, keys), LoRAProFullState(inner_state)

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


def _outside_pairs(keys: AdapterKeys):
  """``optax.masked`` mask: True for every leaf but the A/B factors of adapter nodes."""

  def mask(tree):
    return map_adapters(lambda path, node: rebuild(node, {k: k not in (keys.a, keys.b)
                                                          for k in node}),
                        tree, keys=keys, other=lambda path, leaf: True)

  return mask


def lora_pro(learning_rate, scale, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
             y: str = "sylvester", ridge=1e-8,
             keys: AdapterKeys = DEFAULT_KEYS) -> optax.GradientTransformation:
  """LoRA-Pro with per-factor AdamW: a drop-in replacement for ``optax.adamw`` on a LoRA tree.

  ``chain(lora_pro_project(scale, y, ridge), adamw(learning_rate, b1, b2, eps, weight_decay))``:
  each pair's raw gradients are replaced by LoRA-Pro's adjusted ones (Wang et al., ICLR 2025,
  arXiv 2407.18242), which then get ordinary AdamW moments per factor; every other trainable leaf
  (heads, ``modules_to_save``, gates ``lora_c``) gets plain AdamW. Bias correction uses t = 1 at
  the first step, as optax does; moments are kept in at least float32. Works under
  ``optax.inject_hyperparams`` (learning rate, weight decay, b1, b2, eps, ridge injectable) and
  composes with ``optax.apply_if_finite`` to skip non-finite steps.

  >>> import jax, jax.numpy as jnp
  >>> params = {"dense": {"lora_a": jnp.ones((4, 2)) / 2, "lora_b": jnp.zeros((2, 3))},
  ...           "head": jnp.zeros(3)}
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> optimizer = lora_pro(1e-3, scale=2.0)
  >>> updates, state = optimizer.update(grads, optimizer.init(params), params)
  >>> bool(jnp.all(updates["dense"]["lora_a"] == 0))        # B = 0: A's adjusted gradient is 0
  True
  >>> bool(jnp.allclose(updates["head"], -1e-3))           # plain AdamW: -lr·sign(g) at step 1
  True

  Args:
    learning_rate: a float or an optax schedule.
    scale: the LoRA scale s: a number or a tree of per-pair scales (``LoRAConfig.scales``).
    b1, b2, eps: Adam's hyperparameters.
    weight_decay: decoupled weight decay (on A, B and every other trainable leaf).
    y: "sylvester" or "zero": the Y of the adjustment.
    ridge: δ of the ridge inverse ``pinv(M + δ·I)``.
    keys: key names of the factors inside adapter nodes.
  """
  _check_adam(learning_rate, b1, b2, eps, weight_decay)
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.chain(lora_pro_project(scale, y=y, ridge=ridge, keys=keys),
                     _in_compute_dtype(adamw))


def lora_pro_full(learning_rate, scale, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                  inner: optax.GradientTransformation | None = None, y: str = "sylvester",
                  ridge=1e-8, keys: AdapterKeys = DEFAULT_KEYS) -> optax.GradientTransformation:
  """LoRA-Pro's full-rank AdamW (the paper's optimizer), as an optax optimizer.

  Per pair, with g_eq the equivalent gradient of the adjusted raw gradients::

    U = inner(g_eq)                         (default: Adam moments of shape (*stack, n_in, n_out))
    (dA, dB) = lora_pro_adjust(A, B, s·U·Bᵀ, s·Aᵀ·U, s)        (Y from ``y``)
    A ← A − lr·(dA + wd·A),   B ← B − lr·(dB + wd·B)

  composed as ``chain(lora_pro_full_direction(scale, inner), masked(adam, not A/B),
  add_decayed_weights(wd), scale_by_learning_rate(lr))``. Every other trainable leaf (heads, gates
  ``lora_c``) gets plain AdamW with the same hyperparameters. Bias correction uses t = 1 at the
  first step; moments are kept in at least float32 (Wang et al., ICLR 2025, arXiv 2407.18242).

  >>> import jax, jax.numpy as jnp, optax
  >>> params = {"dense": {"lora_a": jnp.ones((4, 2)) / 2, "lora_b": jnp.zeros((2, 3))}}
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> optimizer = lora_pro_full(1e-3, scale=2.0)
  >>> state = optimizer.init(params)
  >>> state[0].inner.mu["dense"].shape                  # full-rank first moment of g_eq
  (4, 3)
  >>> factored_rms = optax.scale_by_factored_rms(min_dim_size_to_factor=2)
  >>> factored = lora_pro_full(1e-3, 2.0, inner=factored_rms)
  >>> moments = factored.init(params)[0].inner              # O(n_in + n_out) memory
  >>> moments.v_row["dense"].shape, moments.v_col["dense"].shape
  ((3,), (4,))

  Args:
    learning_rate: a float or an optax schedule.
    scale: the LoRA scale s: a number or a tree of per-pair scales (``LoRAConfig.scales``).
    b1, b2, eps: Adam's hyperparameters (of ``inner``'s default and of the other leaves' Adam).
    weight_decay: decoupled weight decay (on A, B and every other trainable leaf).
    inner: the transform on the full-rank equivalent gradients (default
      ``optax.scale_by_adam(b1, b2, eps)``), e.g. ``optax.scale_by_factored_rms()``; it must not
      scale by the learning rate.
    y: "sylvester" or "zero": the Y of the projection back to (A, B).
    ridge: δ of the ridge inverse ``pinv(M + δ·I)``.
    keys: key names of the factors inside adapter nodes.
  """
  _check_adam(learning_rate, b1, b2, eps, weight_decay)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return optax.chain(
      lora_pro_full_direction(scale, inner=adam if inner is None else inner, y=y, ridge=ridge,
                              keys=keys),
      optax.masked(_in_compute_dtype(adam), _outside_pairs(keys)),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
