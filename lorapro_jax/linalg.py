"""Batched algebra on small symmetric positive semi-definite r x r matrices (LoRA Gram matrices).

LoRA-Pro needs, for every adapter pair, the ridge inverses of the Gram matrices ``AᵀA`` and ``BBᵀ``
and the solution of the Sylvester equation ``(AᵀA)·Y + Y·(BBᵀ) = C``. Both Grams are symmetric PSD,
so ONE symmetric eigendecomposition of each gives everything:

* ridge inverse  ``inv(M) = pinv(M + δI) = U·diag(1 / (μ + δ))·Uᵀ``;
* Sylvester      ``Y = U_a·[(U_aᵀ·C·U_b) / (μ_i + λ_j)]·U_bᵀ``  (``M_a = U_a·diag(μ)·U_aᵀ``,
  ``M_b = U_b·diag(λ)·U_bᵀ``).

No general ``eig`` (unavailable on TPU), no SVD, no host callbacks. Every function takes a leading
batch axis: callers stack the Grams of all pairs of one rank and decompose them in one call, because
small decompositions launched one by one dominate an optimizer step on accelerators.

*Exactly zero components* (a zero column of A or row of B: B = 0 at initialisation, components
pruned by dynamic rank) are deflated before the decomposition: their diagonal entry is replaced by
the largest diagonal entry, so rounding in ``eigh`` cannot mix an eigenvalue-0 direction (amplified
by ``1/δ``) into live components, and their rows/columns of every result are set to exactly zero.
In exact arithmetic this changes nothing that LoRA-Pro uses: every entry of ``inv(M)`` or ``Y`` that
is zeroed multiplies an exact zero in the closed form (see ``lorapro_jax.lora_pro``). Denominators
``μ + δ`` and ``μ_i + λ_j`` below ``10·r·eps·max`` are treated as zero (as ``jnp.linalg.pinv`` does),
so nothing turns into NaN/Inf. The algebra runs in float32 for bfloat16/float16 inputs.

>>> import jax, jax.numpy as jnp
>>> factors = jax.random.normal(jax.random.key(0), (3, 6, 2))     # three A's, n_in = 6, r = 2
>>> grams = factors.mT @ factors                                   # (p, r, r): AᵀA per pair
>>> eig = eigh_psd(grams)
>>> eig = refine_values(eig, jnp.sum((factors @ eig.vectors) ** 2, axis=-2))
>>> inverses = ridge_inverse(eig, 1e-8)                            # (p, r, r)
>>> bool(jnp.allclose(inverses @ grams, jnp.eye(2), atol=1e-4))
True
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PSDEigh(NamedTuple):
  """Eigendecomposition of a batch of PSD Gram matrices with exactly-zero components deflated.

  ``values`` (..., r): eigenvalues (clipped at 0; deflated components carry ``stand_in``),
  ``vectors`` (..., r, r): orthonormal eigenvectors as columns, ``live`` (..., r): False for
  components whose diagonal entry is exactly zero, ``stand_in`` (..., 1): the value put on the
  diagonal of those components.
  """

  values: jax.Array
  vectors: jax.Array
  live: jax.Array
  stand_in: jax.Array


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of the r x r algebra: at least float32 (float64 stays float64).

  >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.float32)
  (dtype('float32'), dtype('float32'))
  """
  return jnp.promote_types(dtype, jnp.float32)


def _cutoff(largest: jax.Array, rank: int) -> jax.Array:
  """Threshold below which a denominator counts as zero (``jnp.linalg.pinv``'s default rtol)."""
  return 10.0 * rank * jnp.finfo(largest.dtype).eps * largest


def eigh_psd(grams: jax.Array) -> PSDEigh:
  """One batched ``eigh`` of PSD matrices ``(..., r, r)``, deflating exactly-zero components.

  >>> eig = eigh_psd(jnp.array([[[4.0, 0.0], [0.0, 0.0]]]))     # component 1 is exactly zero
  >>> eig.live, eig.stand_in                                  # its diagonal carries 4 instead
  (Array([[ True, False]], dtype=bool), Array([[4.]], dtype=float32))
  """
  if grams.ndim < 2 or grams.shape[-1] != grams.shape[-2]:
    raise ValueError(f"expected a batch of square matrices (..., r, r), got shape {grams.shape}")
  grams = grams.astype(compute_dtype(grams.dtype))
  diagonal = jnp.diagonal(grams, axis1=-2, axis2=-1)
  live = diagonal > 0
  # A stand-in of the matrix's own scale keeps eigh's absolute error at the live eigenvalues' level.
  stand_in = jnp.max(diagonal, axis=-1, keepdims=True)
  stand_in = jnp.where(stand_in > 0, stand_in, jnp.ones_like(stand_in))
  mask = live[..., :, None] & live[..., None, :]
  eye = jnp.eye(grams.shape[-1], dtype=grams.dtype)
  deflated = jnp.where(mask, grams, 0.0) + eye * jnp.where(live, 0.0, stand_in)[..., None, :]
  values, vectors = jnp.linalg.eigh(deflated, symmetrize_input=True)
  return PSDEigh(jnp.maximum(values, 0.0), vectors, live, stand_in)


def refine_values(eig: PSDEigh, factor_norms: jax.Array) -> PSDEigh:
  """Eigenvalues recomputed as Rayleigh quotients from the factor of the Gram ``M = FᵀF``.

  ``factor_norms[..., k] = ‖F·u_k‖²`` for the eigenvectors ``u_k`` of ``eig``. ``eigh`` of the
  formed Gram is accurate to ``eps·‖M‖`` in absolute terms, i.e. only to ``eps·cond(M)`` relative
  for small eigenvalues (6e-4 in float32 at cond 7.5e3), and ``inv(M)`` inherits that error. The
  quotients through the factor are accurate relative to each eigenvalue (the eigenvectors' own
  error enters only quadratically), at the cost of one ``F·U`` product per pair. Deflated
  components add their stand-in, so the quotients are those of the deflated matrix.

  >>> a = jnp.array([[[1.0, 1.0], [0.0, 1e-3]]])              # cond(AᵀA) = 4e6
  >>> eig = eigh_psd(a.mT @ a)
  >>> small = refine_values(eig, jnp.sum((a @ eig.vectors) ** 2, axis=-2)).values[0, 0]
  >>> bool(abs(small / 5e-7 - 1) < 1e-3)                     # exact: 5e-7 (to 1e-6 relative)
  True
  """
  dead_weight = jnp.sum(jnp.where(eig.live[..., :, None], 0.0, eig.vectors ** 2), axis=-2)
  values = factor_norms.astype(eig.values.dtype) + eig.stand_in * dead_weight
  return eig._replace(values=values)


def _mask(matrix: jax.Array, rows_live: jax.Array, cols_live: jax.Array) -> jax.Array:
  return jnp.where(rows_live[..., :, None] & cols_live[..., None, :], matrix, 0.0)


def ridge_inverse(eig: PSDEigh, ridge: float) -> jax.Array:
  """``pinv(M + ridge·I)`` from ``eigh_psd(M)``, zero on rows/columns of zero components.

  ``ridge`` is a number or a scalar array (e.g. a hyperparameter injected by
  ``optax.inject_hyperparams``); it is applied in the eigenvalues' dtype.

  >>> ridge_inverse(eigh_psd(jnp.array([[[4.0, 0.0], [0.0, 0.0]]])), 0.0)
  Array([[[0.25, 0.  ],
          [0.  , 0.  ]]], dtype=float32)
  """
  shifted = eig.values + jnp.asarray(ridge, eig.values.dtype)
  rank = shifted.shape[-1]
  safe = shifted > _cutoff(jnp.max(shifted, axis=-1, keepdims=True), rank)
  inverse_values = jnp.where(safe, 1.0 / jnp.where(safe, shifted, 1.0), 0.0)
  inverse = jnp.einsum("...ik,...k,...jk->...ij", eig.vectors, inverse_values, eig.vectors)
  return _mask(inverse, eig.live, eig.live)


def solve_sylvester(eig_a: PSDEigh, eig_b: PSDEigh, rhs: jax.Array) -> jax.Array:
  """Y with ``M_a·Y + Y·M_b = rhs`` (both PSD, from ``eigh_psd``), minimum norm where singular.

  Entries whose denominator ``μ_i + λ_j`` vanishes (a direction that is zero in both Grams) are set
  to zero instead of dividing, so zeros stay zeros and nothing becomes NaN.

  >>> m_a, m_b = jnp.array([[[2.0, 1.0], [1.0, 3.0]]]), jnp.array([[[1.0, 0.0], [0.0, 5.0]]])
  >>> rhs = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
  >>> y = solve_sylvester(eigh_psd(m_a), eigh_psd(m_b), rhs)
  >>> bool(jnp.allclose(m_a @ y + y @ m_b, rhs, atol=1e-5))
  True
  """
  rhs = rhs.astype(eig_a.values.dtype)
  denominators = eig_a.values[..., :, None] + eig_b.values[..., None, :]
  largest = jnp.maximum(jnp.max(eig_a.values, axis=-1), jnp.max(eig_b.values, axis=-1))
  safe = denominators > _cutoff(largest, eig_a.values.shape[-1])[..., None, None]
  rotated = jnp.einsum("...ki,...kl,...lj->...ij", eig_a.vectors, rhs, eig_b.vectors)
  solved = jnp.where(safe, rotated / jnp.where(safe, denominators, 1.0), 0.0)
  y = jnp.einsum("...ik,...kl,...jl->...ij", eig_a.vectors, solved, eig_b.vectors)
  return _mask(y, eig_a.live, eig_b.live)
