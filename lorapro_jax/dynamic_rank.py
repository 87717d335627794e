"""DoRA *dynamic rank*: importance-scored rank-1 components pruned to a global budget.

Mao et al., "DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution",
ACL 2024, arXiv 2405.17357 — **not** weight-decomposed DoRA (Liu et al. 2024, PEFT's
``use_dora=True``); nothing here decomposes weights into magnitude and direction.

Everything is configured by ONE frozen :class:`DynamicRankConfig`: the transform
(:func:`dynamic_rank`), the DEM regulariser (:func:`dem_regularizer`), the adapters it expects
(:meth:`DynamicRankConfig.lora_config`, checked when the transform is initialised) and so the
export (:func:`rank_pattern` and :func:`shrink` read the transform's state out of any optax state).

Each adapted kernel is a sum of r' rank-1 components (layout of ``lorapro_jax.adapters``)::

  ΔK = s·A·diag(c)·B = s·Σ_i c_i·A[:, i]·B[i, :]      (gated form, ``lora_c``; the paper's)
  ΔK = s·A·B                                          (plain form, c = 1; composes with LoRA-Pro)

with r' = ceil(1.5·r) for a target rank r (``initial_rank_factor``).

**Importance** (``score="norm_ratio"``, the paper's): the share of component i in ΔK,
``s_i = |c_i|·‖A[:, i]‖·‖B[i, :]‖ / (‖A·diag(c)·B‖_F + 1e-8)``. With the QR factorisation
``A = Q_A·R_A`` (modified Gram-Schmidt; Q_A has orthonormal columns) the denominator is
``‖R_A·diag(c)·B‖_F`` (or the same from ``Bᵀ``, whichever side is shorter): O(n·r'²) work, no
n_in×n_out product, and accurate in float32 even when components nearly cancel (the Gram
expansion ``cᵀ((AᵀA)∘(BBᵀ))c`` squares the condition number and loses exactly that case).
``score="sensitivity"`` is AdaLoRA's alternative ``Σ |θ·g|`` over the component's parameters.
Scores are smoothed by an EMA ``S ← β·S + (1−β)·s`` (from 0, no bias correction), from the
parameters *after* each step's update (the reference calls its allocator right after
``optimizer.step()``), on every step up to the last pruning event.

**Schedule**, the official code's rule (``Finetune_Utils.py``, ``get_prune_step``), evaluated in
the same floating point: for the 1-based step t of T, the pruning step is
``k(t) = int(t − T·warmup_frac)`` and the last one ``K = int(T·(1 − warmup_frac − final_frac))``;
an *event* fires after step t when ``0 < k(t) ≤ K`` and (``k(t) % interval == 0`` or
``k(t) == K``) — T = 201, interval 10: events 41, 51, …, 101. After an event the number of live
components over ALL adapted kernels is ``N − floor((N − R)·k³/K³)`` (N = Σ r', R = Σ r; for one
r', r everywhere the paper's ``N − floor(N·(r'−r)/r'·p³)``, p = k/K), chosen by ONE global ranking
of the EMA scores (ties: the component earlier in the tree's order stays). The step t_e of the
event k = K ends pruning: EMA and DEM run through t_e (the reference's ``k(t) ≤ K``), the final
mask holds after every later step. :func:`pruning_events` is that rule, in one function.

**Masking**: gated components are pruned by setting c_i = 0, plain ones by zeroing A[:, i] and
B[i, :]. ``hard=False`` (the reference): masks are applied at events; pruned components may grow
back in between and be re-ranked; from t_e on the final mask is applied after every step.
``hard=True``: a pruned component stays exactly zero after every step. Masks are static-shape
boolean arrays (``(*stack, r')`` per adapter node); shrink to per-kernel ranks only at export.

**Where we differ from the reference** (everything else follows it): (1) the live count is exact
integer arithmetic, where the reference's float ``int(N·rate)`` prunes one component fewer when
``N·rate`` is an integer that floating point puts just below (N = 54, r' = 2, r = 1, k/K = 1/3);
(2) the reference prunes ``max(int(N·rate), 1)`` components (``kthvalue``) whenever its allocator
runs the pruning branch, which includes the calls with k(t) = 0 (the one or two steps with
``−1 < t − T·warmup_frac < 1``: ``0 % interval == 0``) and every early event whose cubic count is
0 — we prune exactly the count, so those steps prune nothing and are no events; (3) it prunes
every component tied with the threshold, we keep exactly the count.

Example: configure once, build the adapters from it, prune, read the live ranks.

>>> import jax, jax.numpy as jnp, optax
>>> from lorapro_jax.lora import LoRAConfig
>>> config = DynamicRankConfig(total_steps=40, target_rank=2, interval=5)
>>> config.events                                  # {step t: pruning step k}
{11: 5, 16: 10, 20: 14}
>>> config.lora_config(LoRAConfig(rank=2, alpha=4.0, targets="query")).rank   # r' = ceil(1.5·2)
3
>>> ka, kb, kc = jax.random.split(jax.random.key(0), 3)
>>> params = {"layer": {"0": {"query": {"lora_a": jax.random.normal(ka, (16, 3)),
...                                     "lora_b": jax.random.normal(kb, (3, 8)),
...                                     "lora_c": jax.random.normal(kc, (3,))}}}}
>>> optimizer = optax.chain(optax.adamw(1e-2), dynamic_rank(config))   # dynamic_rank LAST
>>> state = optimizer.init(params)
>>> for _ in range(40):
...   grads = jax.tree.map(jnp.ones_like, params)
...   updates, state = optimizer.update(grads, state, params)
...   params = optax.apply_updates(params, updates)
>>> rank_pattern(state)
{'layer.0.query': 2}
>>> jax.tree.map(jnp.shape, shrink(params, state))
{'layer': {'0': {'query': {'lora_a': (16, 2), 'lora_b': (2, 8)}}}}
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorapro_jax.adapters import (
    DEFAULT_KEYS, AdapterKeys, Path, adapter_paths, check_pair, dotted, get_path, map_adapters,
    rebuild)
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.trees import named_leaves

SCORES = ("norm_ratio", "sensitivity")
NORM_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# Configuration and schedule
# ---------------------------------------------------------------------------------------------


def pruning_events(total_steps: int, warmup_frac: float = 0.15, final_frac: float = 0.5,
                   interval: int = 10) -> dict[int, int]:
  """``{step t: pruning step k(t)}`` of every event: the official code's rule, in its floats.

  DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA). ``Finetune_Utils.py`` computes
  ``k(t) = int(t − T·warmup_frac)`` and ``K = int(T·(1 − warmup_frac − final_frac))`` in Python
  floats (``int`` truncates toward zero) for the 1-based step t; an event fires when
  ``0 < k(t) ≤ K`` and (``k(t) % interval == 0`` or ``k(t) == K``). numpy's float64 arithmetic and
  ``trunc`` are the same IEEE operations, so the steps are the reference's bit for bit.

  >>> pruning_events(201)
  {41: 10, 51: 20, 61: 30, 71: 40, 81: 50, 91: 60, 101: 70}
  """
  start = total_steps * warmup_frac
  last = int(total_steps * (1 - warmup_frac - final_frac))
  steps = np.arange(1, total_steps + 1)
  k = np.trunc(steps.astype(np.float64) - start).astype(np.int64)
  fires = (k > 0) & (k <= last) & ((k % interval == 0) | (k == last))
  return dict(zip(steps[fires].tolist(), k[fires].tolist()))


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DynamicRankConfig:
  """Everything about DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA), in one place.

  The transform (:func:`dynamic_rank`), the DEM term (:func:`dem_regularizer`) and the adapters
  (:meth:`lora_config`; checked by the transform's init) all read this one object.

  Attributes:
    total_steps: T, the number of optimizer steps of the run.
    target_rank: r per adapted kernel after pruning (>= 1): one int, or a mapping from dotted
      adapter path (``"encoder.layer.0.attention.self.query"``) to int covering every adapter node.
      The global budget R = Σ r may still prune a single kernel to rank 0 (export drops it).
    initial_rank_factor: the adapters start at rank r' = ceil(factor·r) (the paper: 1.5).
    warmup_frac, final_frac: the schedule's fractions of T (the reference's start and end prune
      step ratios): pruning steps ``k(t) = int(t − T·warmup_frac)``, the last ``K = int(T·(1 −
      warmup_frac − final_frac))`` (:func:`pruning_events`).
    interval: pruning steps between events.
    beta: EMA factor of the scores.
    dem_weight: η, the weight of the DEM penalty in the loss (:func:`dem_regularizer`; 0: off).
    hard: False (the reference): masks applied at events only, pruned components may come back
      until the last event; True: a pruned component stays zero after every step.
    gated: True: adapters carry gates ``lora_c`` (the paper's form, pruned by c_i = 0); False:
      plain adapters, pruned by zeroing A[:, i] and B[i, :] (composes with LoRA-Pro).
    score: "norm_ratio" (the paper's) or "sensitivity" (AdaLoRA's |θ·g|, needs ``grads``).
    keys: key names of the factors inside adapter nodes.
  """

  total_steps: int
  target_rank: int | Mapping[str, int]
  _: dataclasses.KW_ONLY
  initial_rank_factor: float = 1.5
  warmup_frac: float = 0.15
  final_frac: float = 0.5
  interval: int = 10
  beta: float = 0.9
  dem_weight: float = 0.0
  hard: bool = False
  gated: bool = True
  score: str = "norm_ratio"
  keys: AdapterKeys = DEFAULT_KEYS

  def __post_init__(self):
    if not _is_int(self.total_steps) or self.total_steps < 1:
      raise ValueError(f"total_steps must be an int >= 1, got {self.total_steps!r}")
    targets = (self.target_rank.values() if isinstance(self.target_rank, Mapping)
               else [self.target_rank])
    bad = [r for r in targets if not _is_int(r) or r < 1]
    if bad or not targets:
      raise ValueError(
          f"target_rank must be an int >= 1 or a non-empty mapping of dotted adapter paths to "
          f"ints >= 1, got {self.target_rank!r} (a kernel without adapter: leave it out of "
          f"LoRAConfig.targets; the global budget may still prune one to rank 0)")
    if not 1.0 <= self.initial_rank_factor < math.inf:
      raise ValueError(f"initial_rank_factor must be a number >= 1 (r' = ceil(factor·r)), got "
                       f"{self.initial_rank_factor!r}")
    if not (0.0 <= self.warmup_frac and 0.0 <= self.final_frac
            and self.warmup_frac + self.final_frac < 1.0):
      raise ValueError(f"need warmup_frac >= 0, final_frac >= 0 and warmup_frac + final_frac < 1, "
                       f"got {self.warmup_frac!r} and {self.final_frac!r}")
    if not _is_int(self.interval) or self.interval < 1:
      raise ValueError(f"interval must be an int >= 1, got {self.interval!r}")
    if not 0.0 <= self.beta < 1.0:
      raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
    if not 0.0 <= self.dem_weight < math.inf:
      raise ValueError(f"dem_weight must be a finite number >= 0, got {self.dem_weight!r}")
    for name in ("hard", "gated"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if self.score not in SCORES:
      raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
    if not isinstance(self.keys, AdapterKeys):
      raise ValueError(f"keys must be an AdapterKeys, got {self.keys!r}")
    if not self.events:
      raise ValueError(
          f"no pruning event in {self.total_steps} steps: K = int(T·(1 − warmup_frac − "
          f"final_frac)) = {int(self.total_steps * (1 - self.warmup_frac - self.final_frac))}; "
          f"raise total_steps or lower warmup_frac / final_frac")

  @functools.cached_property
  def events(self) -> dict[int, int]:
    """``{step t: pruning step k}`` of every event (:func:`pruning_events`)."""
    return pruning_events(self.total_steps, self.warmup_frac, self.final_frac, self.interval)

  @property
  def last_event(self) -> int:
    """t_e, the step of the event k = K: pruning (EMA, DEM) runs through it, then the final mask
    holds."""
    return max(self.events)

  def live_counts(self, n_components: int, n_target: int) -> dict[int, int]:
    """``{event step t: live components after it}``: ``N − floor((N − R)·k³/K³)``, exactly.

    >>> DynamicRankConfig(600, 2).live_counts(n_components=12, n_target=8)[300]
    8
    """
    if not 0 <= n_target <= n_components:
      raise ValueError(f"need 0 <= n_target <= n_components, got {n_target} and {n_components}")
    last = self.events[self.last_event]
    return {t: n_components - (n_components - n_target) * k ** 3 // last ** 3
            for t, k in self.events.items()}

  def target_for(self, path: Path) -> int:
    """The target rank r of the adapter node at ``path``."""
    if not isinstance(self.target_rank, Mapping):
      return self.target_rank
    if dotted(path) not in self.target_rank:
      raise ValueError(f"target_rank has no entry for adapter {dotted(path)!r}; it has "
                       f"{sorted(self.target_rank)}")
    return self.target_rank[dotted(path)]

  def initial_rank(self, path: Path = ()) -> int:
    """r' = ceil(initial_rank_factor·r), the rank the adapter at ``path`` must start with."""
    return math.ceil(self.initial_rank_factor * self.target_for(path))

  def lora_config(self, base: LoRAConfig) -> LoRAConfig:
    """``base`` with the adapters this config prunes: rank r' (per path for a mapping, as a
    ``rank_pattern`` of full dotted paths) and ``gated``. Targets, alpha (so s = alpha/r', as in
    the reference), dropout, ... stay ``base``'s."""
    if base.rank_pattern:
      raise ValueError(f"the base LoRAConfig has rank_pattern {base.rank_pattern}: with dynamic "
                       f"rank the ranks come from DynamicRankConfig.target_rank (a mapping)")
    if not isinstance(self.target_rank, Mapping):
      return dataclasses.replace(base, rank=self.initial_rank(), gated=self.gated)
    ranks = {path: math.ceil(self.initial_rank_factor * r) for path, r in self.target_rank.items()}
    return dataclasses.replace(base, rank=max(ranks.values()), rank_pattern=ranks,
                               gated=self.gated)

  def check_adapters(self, params: Any) -> list[tuple[Path, Mapping]]:
    """The adapter nodes of ``params`` as ``(path, node)``, after checking that they are the ones
    :meth:`lora_config` describes (pairs, gates iff ``gated``, rank r'); raises a ValueError
    naming the path, what it found and what was expected."""
    keys = self.keys
    nodes = [(path, get_path(params, path)) for path in adapter_paths(params, keys)]
    if not nodes:
      raise ValueError(f"dynamic rank found no adapter nodes (mappings holding {keys.a!r} and "
                       f"{keys.b!r}) in the parameters")
    for path, node in nodes:
      check_pair(node[keys.a], node[keys.b], node.get(keys.c), where=f"adapter {dotted(path)!r}",
                 keys=keys)
      if self.gated != (keys.c in node):
        raise ValueError(
            f"adapter {dotted(path)!r} {'has no' if self.gated else 'has'} gates {keys.c!r}, but "
            f"DynamicRankConfig(gated={self.gated}) expects {'them' if self.gated else 'none'}: "
            f"build the LoRAConfig with DynamicRankConfig.lora_config(base)")
      found, expected = node[keys.a].shape[-1], self.initial_rank(path)
      if found != expected:
        raise ValueError(
            f"adapter {dotted(path)!r} has rank {found}, expected r' = ceil("
            f"{self.initial_rank_factor}·{self.target_for(path)}) = {expected} for target rank "
            f"{self.target_for(path)}: build the LoRAConfig with DynamicRankConfig.lora_config("
            f"base)")
    if isinstance(self.target_rank, Mapping):
      unknown = set(self.target_rank) - {dotted(path) for path, _ in nodes}
      if unknown:
        raise ValueError(f"target_rank names no adapter at {sorted(unknown)}")
    return nodes


class DynamicRankState(NamedTuple):
  """State of DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA).

  ``scores`` and ``mask`` mirror the adapter tree: each adapter node is replaced by an array of
  shape ``(*stack, r')`` (other leaves by ``optax.MaskedNode()``), so they shard and checkpoint
  like the adapters.

  Attributes:
    count: completed steps.
    scores: EMA importance of each component (float32).
    mask: live components (bool) as of the latest event; from the last event on, the final mask.
    misordered: steps at which components zeroed by the previous step arrived non-zero: a
      transform after ``dynamic_rank`` in the chain changed its updates (:func:`rank_pattern` and
      :func:`shrink` refuse such a state).
  """

  count: jax.Array
  scores: Any
  mask: Any
  misordered: jax.Array


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def _r_factor(x: jax.Array) -> jax.Array:
  """R (*stack, r, r) of ``x = Q·R`` for (*stack, n, r) ``x`` with orthonormal Q, never formed.

  Modified Gram-Schmidt: its R is backward stable column by column (Björck and Paige 1992: MGS is
  Householder QR of ``[0; x]``), which is all the score needs; the computed Q's loss of
  orthogonality does not matter since Q is not used. Zero columns (pruned plain components) give
  zero rows. In jnp rather than LAPACK's geqrf: several geqrf calls running concurrently inside
  one XLA CPU program can hang.
  """
  rank = x.shape[-1]
  columns = jnp.arange(rank)
  rest, rows = x, []
  for j in range(rank):  # unrolled: r' is small, and XLA fuses each step's two passes over x
    v = rest[..., :, j]
    norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
    u = v / jnp.where(norm > 0, norm, 1.0)
    row = jnp.where(columns >= j, jnp.einsum("...n,...nk->...k", u, rest), 0.0)
    rest = rest - u[..., :, None] * jnp.where(columns > j, row, 0.0)[..., None, :]
    rows.append(row)
  return jnp.stack(rows, axis=-2)


def norm_ratio_scores(a: jax.Array, b: jax.Array, c: jax.Array | None = None) -> jax.Array:
  """``|c_i|·‖A[:, i]‖·‖B[i, :]‖ / (‖A·diag(c)·B‖_F + 1e-8)``, shape (*stack, r), float32.

  DoRA dynamic rank's importance (Mao et al. 2024; not weight-decomposed DoRA): the Frobenius norm
  of component i relative to the whole update, ``‖ΔK_i‖_F / ‖ΔK‖_F`` (the scale s cancels). With
  ``A = Q_A·R_A`` (Q_A orthonormal), ``‖A·diag(c)·B‖_F = ‖R_A·diag(c)·B‖_F`` (or the same with
  ``Bᵀ = Q_B·R_B`` when n_out < n_in): O(n·r²), backward stable, so nearly cancelling components
  keep float32 accuracy. ``c=None``: c = 1.

  >>> a, b = jnp.eye(3, 2), jnp.eye(2, 4)            # two orthogonal unit components
  >>> [round(float(s), 6) for s in norm_ratio_scores(a, b, jnp.array([3.0, 4.0]))]  # 3/5, 4/5
  [0.6, 0.8]
  """
  check_pair(a, b, c, where="norm_ratio_scores")
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  c32 = jnp.ones(a.shape[:-2] + a.shape[-1:], jnp.float32) if c is None else c.astype(jnp.float32)
  # One factorisation suffices (‖Q·M‖_F = ‖M‖_F): of the shorter side, the other is multiplied.
  if a.shape[-2] <= b.shape[-1]:
    core = (_r_factor(a32) * c32[..., None, :]) @ b32                 # R_A·diag(c)·B
  else:
    core = (a32 * c32[..., None, :]) @ _r_factor(b32.mT).mT           # A·diag(c)·R_Bᵀ
  total = jnp.sqrt(jnp.sum(jnp.square(core), axis=(-2, -1)))
  component = (jnp.abs(c32) * jnp.linalg.norm(a32, axis=-2) * jnp.linalg.norm(b32, axis=-1))
  return component / (total[..., None] + NORM_EPS)


def sensitivity_scores(node: Mapping, grad_node: Mapping,
                       keys: AdapterKeys = DEFAULT_KEYS) -> jax.Array:
  """AdaLoRA's sensitivity ``Σ |θ·g|`` over each component's parameters, shape (*stack, r).

  For DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA) with ``score="sensitivity"``:
  component i owns A[:, i], B[i, :] and, gated, c_i. ``grad_node`` holds the loss gradients.

  >>> node = {"lora_a": jnp.ones((2, 1)), "lora_b": 2 * jnp.ones((1, 3))}
  >>> sensitivity_scores(node, node).tolist()         # 2·1·1 + 3·2·2
  [14.0]
  """
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  total = (jnp.abs(f32(node[keys.a]) * f32(grad_node[keys.a])).sum(-2)
           + jnp.abs(f32(node[keys.b]) * f32(grad_node[keys.b])).sum(-1))
  if keys.c in node:
    total = total + jnp.abs(f32(node[keys.c]) * f32(grad_node[keys.c]))
  return total


def _norm_ratio_all(nodes: list[Mapping], keys: AdapterKeys) -> list[jax.Array]:
  """``norm_ratio_scores`` of every node, one batched call per shape: small QRs launched one by
  one would dominate the step on an accelerator."""
  groups: dict[tuple, list[int]] = {}
  for i, node in enumerate(nodes):
    groups.setdefault((node[keys.a].shape[-2:], node[keys.b].shape[-1]), []).append(i)
  out: list[Any] = [None] * len(nodes)
  for members in groups.values():
    def stacked(name, tail, members=members):
      return jnp.concatenate([nodes[i][name].reshape((-1,) + nodes[i][name].shape[tail:])
                              for i in members])
    c = stacked(keys.c, -1) if keys.c in nodes[members[0]] else None
    scores = norm_ratio_scores(stacked(keys.a, -2), stacked(keys.b, -2), c)
    offsets = np.cumsum([0] + [math.prod(nodes[i][keys.a].shape[:-2]) for i in members])
    for i, lo, hi in zip(members, offsets, offsets[1:]):
      shape = nodes[i][keys.a].shape
      out[i] = scores[lo:hi].reshape(shape[:-2] + shape[-1:])
  return out


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------


def _global_top_k(scores: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
  """Boolean mask of the k highest eligible scores; among equal scores the lower index wins."""
  key = jnp.where(eligible, scores, -jnp.inf)
  order = jnp.argsort(-key, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  return rank < k


def _enforced(config: DynamicRankConfig, step: jax.Array) -> jax.Array:
  """Whether the mask is applied after ``step``: always when hard, else at events and after t_e."""
  if config.hard:
    return jnp.asarray(True)
  return jnp.isin(step, jnp.asarray(list(config.events))) | (step > config.last_event)


def _component_entries(node: Mapping, zero: jax.Array, keys: AdapterKeys) -> dict[str, jax.Array]:
  """Which entries of each factor belong to zeroed components: c_i gated, else A[:, i], B[i, :]."""
  if keys.c in node:
    return {keys.c: zero}
  return {keys.a: zero[..., None, :], keys.b: zero[..., :, None]}


def _mirror(params: Any, per_path: Mapping[Path, Any], keys: AdapterKeys) -> Any:
  return map_adapters(lambda path, node: per_path[path], params, keys=keys,
                      other=lambda path, leaf: optax.MaskedNode())


def _check_step_inputs(paths: Sequence[Path], nodes: Sequence[Mapping], updates: Any,
                       state: DynamicRankState, keys: AdapterKeys) -> None:
  """The step's adapters must be those ``init`` saw, and ``updates`` must mirror them: a clear
  error here instead of a broadcasting error (or a KeyError) inside the step."""
  seen = {path for path, _ in named_leaves(state.mask)}
  missing = sorted(dotted(path) for path in seen - set(paths))
  if missing:
    raise ValueError(f"dynamic_rank: the params lack the adapters {missing} that init saw")
  for path, node in zip(paths, nodes):
    where = dotted(path) or "<root>"
    shape = node[keys.a].shape[:-2] + node[keys.a].shape[-1:]
    if path not in seen or get_path(state.mask, path).shape != shape:
      raise ValueError(
          f"dynamic_rank: adapter {where!r} has components of shape {shape} (*stack, r'), but "
          + (f"init saw {get_path(state.mask, path).shape}" if path in seen else "init did not see it")
          + ": pass the params the optimizer was initialised with")
    try:
      update = get_path(updates, path)
    except KeyError:
      raise ValueError(f"dynamic_rank: the updates have no entry for adapter {where!r}; they must "
                       "mirror the params") from None
    for name in (keys.a, keys.b, keys.c):
      got = np.shape(update[name]) if isinstance(update, Mapping) and name in update else None
      if name in node and got != node[name].shape:
        raise ValueError(f"dynamic_rank: the update of {where}.{name} has shape "
                         f"{got if got is not None else '(missing)'}, expected "
                         f"{node[name].shape} (the params'): the updates must mirror the params")


def dynamic_rank(config: DynamicRankConfig) -> optax.GradientTransformationExtraArgs:
  """DoRA dynamic rank (Mao et al., ACL 2024, arXiv 2405.17357) as an optax transform.

  Not weight-decomposed DoRA (Liu et al. 2024, PEFT's ``use_dora``). Place it LAST in a chain,
  ``optax.chain(optimizer, dynamic_rank(config))``: ``update(updates, state, params)`` scores the
  parameters ``params + updates`` that the step will produce, and for every component to be
  zeroed now it replaces the update by ``-param``, so that after ``optax.apply_updates`` the gate
  c_i (gated form) or A[:, i] and B[i, :] (plain form) are exactly 0 (``p + (-p)`` is exactly 0 in
  any float format), whatever the optimizer's moments. Other entries pass through unchanged. The
  next update checks that those components did arrive as zeros; if a later transform changed them
  the state counts it (``misordered``) and :func:`rank_pattern` / :func:`shrink` raise.

  ``init(params)`` checks the adapters against the config (:meth:`DynamicRankConfig.
  check_adapters`). ``score="sensitivity"`` needs the loss gradients, which the last transform of
  a chain cannot see: pass them as an extra argument, ``chain.update(grads, state, params,
  grads=grads)``; other extra arguments are ignored, per optax's convention.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`DynamicRankState`.
  """
  if not isinstance(config, DynamicRankConfig):
    raise TypeError(f"dynamic_rank takes a DynamicRankConfig, got {type(config).__name__}")
  keys = config.keys
  event_steps = jnp.asarray(list(config.events), jnp.int32)

  def init_fn(params):
    shapes = {path: node[keys.a].shape[:-2] + node[keys.a].shape[-1:]
              for path, node in config.check_adapters(params)}
    # Separate buffers for scores and mask: a step that donates its state cannot donate one
    # buffer twice.
    return DynamicRankState(
        count=jnp.zeros([], jnp.int32),
        scores=_mirror(params, {p: jnp.zeros(s, jnp.float32) for p, s in shapes.items()}, keys),
        mask=_mirror(params, {p: jnp.ones(s, jnp.bool_) for p, s in shapes.items()}, keys),
        misordered=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, grads=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("dynamic_rank needs the current parameters: call "
                       "update(updates, state, params), with dynamic_rank last in the chain")
    paths, before = zip(*config.check_adapters(params))
    _check_step_inputs(paths, before, updates, state, keys)
    after = [{name: optax.apply_updates(node[name], get_path(updates, path)[name])
              for name in (keys.a, keys.b, keys.c) if name in node} for path, node in
             zip(paths, before)]
    old_mask = [get_path(state.mask, path) for path in paths]

    # Components this transform zeroed in the previous step must arrive as exact zeros.
    was_zeroed = _enforced(config, state.count)
    arrived_live = jnp.any(jnp.stack([
        jnp.any(was_zeroed & ~mask & _alive(node, keys)) for node, mask in zip(before, old_mask)]))

    step = state.count + 1
    if config.score == "sensitivity":
      if grads is None:
        raise ValueError("score='sensitivity' scores |theta * grad|: pass the loss gradients, "
                         "update(updates, state, params, grads=grads)")
      raw = [sensitivity_scores(node, get_path(grads, path), keys)
             for path, node in zip(paths, after)]
    else:
      raw = _norm_ratio_all(after, keys)
    scoring = step <= config.last_event
    scores = [jnp.where(scoring, config.beta * get_path(state.scores, path)
                        + (1.0 - config.beta) * new, get_path(state.scores, path))
              for path, new in zip(paths, raw)]

    shapes = [m.shape for m in old_mask]
    n_target = sum(math.prod(shape[:-1]) * config.target_for(path)
                   for path, shape in zip(paths, shapes))
    live = config.live_counts(sum(math.prod(shape) for shape in shapes), n_target)
    is_event = jnp.any(event_steps == step)
    budget = jnp.sum(jnp.where(event_steps == step, jnp.asarray(list(live.values())), 0))
    flat_mask = jnp.concatenate([m.reshape(-1) for m in old_mask])
    # Hard pruning ranks only the live components, so the live set only ever shrinks.
    eligible = flat_mask if config.hard else jnp.ones_like(flat_mask)
    keep = _global_top_k(jnp.concatenate([s.reshape(-1) for s in scores]), eligible, budget)
    flat_mask = jnp.where(is_event, keep, flat_mask)
    offsets = np.cumsum([0] + [math.prod(shape) for shape in shapes])
    mask = [flat_mask[lo:hi].reshape(shape) for lo, hi, shape in zip(offsets, offsets[1:], shapes)]
    zero = {path: _enforced(config, step) & ~m for path, m in zip(paths, mask)}

    def node_fn(path, update_node, param_node):
      entries = _component_entries(param_node, zero[path], keys)
      return rebuild(update_node, {
          name: jnp.where(entries[name], -param_node[name], value) if name in entries else value
          for name, value in update_node.items()})

    new_state = DynamicRankState(
        count=optax.safe_int32_increment(state.count),
        scores=_mirror(params, dict(zip(paths, scores)), keys),
        mask=_mirror(params, dict(zip(paths, mask)), keys),
        misordered=state.misordered + arrived_live.astype(jnp.int32))
    return map_adapters(node_fn, updates, params, keys=keys,
                        other=lambda path, leaf, param: leaf), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _alive(node: Mapping, keys: AdapterKeys) -> jax.Array:
  """Components that contribute: a non-zero gate, else a non-zero A column and B row."""
  if keys.c in node:
    return node[keys.c] != 0
  return jnp.any(node[keys.a] != 0, axis=-2) & jnp.any(node[keys.b] != 0, axis=-1)


# ---------------------------------------------------------------------------------------------
# DEM regulariser
# ---------------------------------------------------------------------------------------------


def dem_penalty(adapters: Any, keys: AdapterKeys = DEFAULT_KEYS) -> jax.Array:
  """DoRA's DEM regulariser (Mao et al. 2024; not weight-decomposed DoRA), a float32 scalar.

  The mean, over all 2·Σr' vectors formed by the columns A[:, i] and rows B[i, :] of every adapted
  kernel (each slice of a stacked node a kernel of its own), of their unbiased variance::

    DEM = 1/(2·Σ_k r'_k) · Σ_k Σ_i [ var(A_k[:, i]) + var(B_k[i, :]) ]

  the reference's normalisation (``sum_var / (n_linear·2·r')``), so its η carries over.

  >>> node = {"lora_a": jnp.array([[0.0], [2.0]]), "lora_b": jnp.array([[1.0, 1.0, 4.0]])}
  >>> float(dem_penalty({"q": node}))                  # (2 + 3) / 2
  2.5
  """
  total, count = jnp.zeros([], jnp.float32), 0
  paths = adapter_paths(adapters, keys)
  if not paths:
    raise ValueError(f"DEM found no adapter nodes (mappings holding {keys.a!r} and {keys.b!r})")
  for path in paths:
    a, b = get_path(adapters, path)[keys.a], get_path(adapters, path)[keys.b]
    if a.shape[-2] < 2 or b.shape[-1] < 2:
      raise ValueError(f"DEM needs n_in, n_out >= 2 for an unbiased variance, got {a.shape} and "
                       f"{b.shape} at {dotted(path)!r}")
    total += (jnp.var(a.astype(jnp.float32), axis=-2, ddof=1).sum()
              + jnp.var(b.astype(jnp.float32), axis=-1, ddof=1).sum())
    count += 2 * math.prod(a.shape[:-2] + a.shape[-1:])
  return total / count


def dem_regularizer(config: DynamicRankConfig) -> Callable[[Any, jax.Array], jax.Array]:
  """``regularizer(trainable, step) = η·DEM(trainable)`` while pruning runs, else 0.

  DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA); η = ``config.dem_weight``.
  ``step`` is the 0-based index of the step whose loss is computed (optax's count before the
  update, :func:`lorapro_jax.train.make_train_step`'s ``state.step``): that step is the reference's
  1-based t = step + 1, and the reference adds DEM while ``k(t) ≤ K``, i.e. t ≤ t_e. Works under
  jit.

  >>> config = DynamicRankConfig(200, 2, dem_weight=0.1)
  >>> node = {"lora_a": jnp.array([[0.0], [2.0]]), "lora_b": jnp.array([[1.0, 1.0, 4.0]])}
  >>> [round(float(dem_regularizer(config)({"q": node}, s)), 6)
  ...  for s in (config.last_event - 1, config.last_event)]
  [0.25, 0.0]
  """
  if not isinstance(config, DynamicRankConfig):
    raise TypeError(f"dem_regularizer takes a DynamicRankConfig, got {type(config).__name__}")

  def regularizer(trainable, step):
    if config.dem_weight == 0.0:
      return jnp.zeros([], jnp.float32)
    penalty = config.dem_weight * dem_penalty(trainable, config.keys)
    return jnp.where(jnp.asarray(step) < config.last_event, penalty, 0.0)

  return regularizer


# ---------------------------------------------------------------------------------------------
# Export: live ranks, shrinking, the heatmap
# ---------------------------------------------------------------------------------------------


def _mask_items(opt_state_or_masks: Any) -> list[tuple[Path, np.ndarray]]:
  """(path, bool mask) of every adapter node: from the one ``DynamicRankState`` anywhere inside an
  optax state (chains, nested chains, inject_hyperparams, masked, MultiSteps...), or from a tree
  of boolean masks."""
  found, _ = jax.tree_util.tree_flatten_with_path(
      opt_state_or_masks, is_leaf=lambda x: isinstance(x, DynamicRankState))
  states = [(jax.tree_util.keystr(where), leaf) for where, leaf in found
            if isinstance(leaf, DynamicRankState)]
  if len(states) > 1:
    raise ValueError(f"the optimizer state holds {len(states)} DynamicRankStates (at "
                     f"{[where for where, _ in states]}); expected one: pass the one you mean")
  if states:
    state = states[0][1]
    if int(state.misordered):
      raise ValueError(
          f"dynamic_rank is not the last transform of the optimizer chain: at "
          f"{int(state.misordered)} step(s) components it had zeroed arrived non-zero, so its "
          f"masks do not describe the parameters; put it last, optax.chain(optimizer, "
          f"dynamic_rank(config))")
    masks = state.mask
  else:
    masks = opt_state_or_masks
  items = [(path, np.asarray(leaf)) for path, leaf in named_leaves(masks)]
  not_masks = [f"{dotted(path)} ({np.asarray(leaf).dtype})" for path, leaf in items
               if np.asarray(leaf).dtype != np.bool_]
  if not_masks or not items:
    raise ValueError(f"expected an optimizer state holding a DynamicRankState (dynamic_rank in the "
                     f"chain) or a tree of boolean masks; found neither (non-boolean leaves: "
                     f"{not_masks[:3] or 'none, and no leaves at all'})")
  return items


def rank_pattern(opt_state_or_masks: Any) -> dict[str, Any]:
  """``{dotted adapter path: live rank}`` from an optimizer state (or a tree of masks).

  DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA). The ``DynamicRankState`` is
  found anywhere inside the state; stacked nodes (``*stack`` axes) give a nested list of live
  ranks, one per slice. From the last event on, the mask is the final mask.

  >>> rank_pattern({"layer": {"0": {"q": jnp.array([True, False, True])}}})
  {'layer.0.q': 2}
  """
  return {dotted(path): (int(m.sum()) if m.ndim == 1 else m.sum(-1).tolist())
          for path, m in _mask_items(opt_state_or_masks)}


def shrink(adapters: Any, opt_state_or_masks: Any, *, keys: AdapterKeys = DEFAULT_KEYS) -> Any:
  """Adapters with dead components removed and c folded into B, for export (not jit-able).

  DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA). For each adapter node with
  live components L: ``A' = A[:, L]``, ``B' = diag(c_L)·B[L, :]`` (gated) or ``B[L, :]``, no
  ``lora_c``, so ``A'·B' = A·diag(c)·B`` and outputs are unchanged *with the same scale s*
  (exporting to PEFT with rank r_new therefore needs ``alpha = s·r_new``, which ``export_peft``
  writes). A kernel pruned to rank 0 keeps factors of shape (n_in, 0), (0, n_out); ``export_peft``
  drops its module. Stacked nodes keep one array: live components first, zero-padded to the
  largest live rank among the slices (``rank_pattern`` gives each slice's rank). Raises if a dead
  component still contributes (pruned gates that revived before the last event: shrink after it,
  or prune ``hard``), since dropping it would change the outputs.
  """
  masks = dict(_mask_items(opt_state_or_masks))

  def node_fn(path, node):
    if path not in masks:
      raise ValueError(f"no mask for adapter {dotted(path)!r}; masks cover "
                       f"{sorted(dotted(p) for p in masks)}")
    live = masks[path]
    a, b = np.asarray(node[keys.a]), np.asarray(node[keys.b])
    if live.shape != a.shape[:-2] + a.shape[-1:]:
      raise ValueError(f"mask of shape {live.shape} does not fit adapter {dotted(path)!r} with "
                       f"{keys.a} {a.shape}")
    c = np.asarray(node[keys.c], np.float64) if keys.c in node else np.ones(live.shape)
    contribution = (np.abs(c) * np.linalg.norm(a.astype(np.float64), axis=-2)
                    * np.linalg.norm(b.astype(np.float64), axis=-1))
    if np.any(contribution[~live] != 0):
      raise ValueError(f"adapter {dotted(path)!r} has masked components that are not zero: shrink "
                       f"after the last pruning event (DynamicRankConfig.last_event), or prune "
                       f"with hard=True")
    order = np.argsort(~live, axis=-1, kind="stable")[..., :int(live.sum(-1).max(initial=0))]
    kept = np.take_along_axis(live, order, -1)
    folded_b = (np.take_along_axis(c, order, -1) * kept)[..., None] * np.take_along_axis(
        b.astype(np.float64), order[..., None], -2)
    items = {name: value for name, value in node.items() if name not in (keys.a, keys.b, keys.c)}
    items[keys.a] = jnp.asarray(np.take_along_axis(a, order[..., None, :], -1) * kept[..., None, :],
                                a.dtype)
    items[keys.b] = jnp.asarray(folded_b, b.dtype)
    return rebuild(node, {name: items[name] for name in node if name in items})

  return map_adapters(node_fn, adapters, keys=keys)


class _Layer(NamedTuple):
  """A layer column found in a path: ordered by prefix, then index; labelled by both."""

  order: int
  index: int
  prefix: str


def _split_layer(path: str) -> tuple[str, int | None, tuple[str, ...]]:
  """(prefix before the first integer element, that integer, the elements after it)."""
  parts = path.split(".")
  at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
  if at is None:
    return "", None, tuple(parts)
  return dotted(tuple(parts[:at])), int(parts[at]), tuple(parts[at + 1:])


def _matrix_labels(tails: set[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
  """Each tail's shortest suffix that no other tail shares (``query``, ``intermediate.dense``)."""
  labels = {}
  for tail in tails:
    length = next((k for k in range(1, len(tail) + 1)
                   if all(other[-k:] != tail[-k:] for other in tails if other != tail)), len(tail))
    labels[tail] = dotted(tail[-length:])
  return labels


def plot_rank_heatmap(rank_pattern_or_state: Any, *, cell=None, title: str | None = None,
                      cmap: str = "viridis"):
  """A heatmap of live ranks, matrix types × layers, like Figure 2 of Mao et al. 2024.

  DoRA dynamic rank (not weight-decomposed DoRA). Takes a ``rank_pattern`` dict, or anything
  :func:`rank_pattern` reads (an optimizer state, a tree of masks). By default the layer is the
  first integer element of a dotted path and the matrix type its last element, lengthened to the
  shortest unambiguous suffix where the last element repeats (BERT: ``query``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``); where several prefixes
  carry layer numbers (T5's ``encoder.block.0`` and ``decoder.block.0``) the prefix is part of the
  layer label. Stacked entries (lists) take the layer from the position in the list.
  ``cell(path) -> (layer, matrix_type)`` overrides all this. Returns a
  ``matplotlib.figure.Figure`` (no pyplot state is touched).
  """
  from matplotlib.figure import Figure  # a plotting dependency only where a plot is drawn

  is_pattern = isinstance(rank_pattern_or_state, Mapping) and all(
      isinstance(v, (int, np.integer, list, tuple)) for v in rank_pattern_or_state.values())
  pattern = rank_pattern_or_state if is_pattern else rank_pattern(rank_pattern_or_state)
  split = {path: _split_layer(path) for path in pattern}
  labels = _matrix_labels({tail for _, _, tail in split.values()})
  prefixes = list(dict.fromkeys(prefix for prefix, layer, _ in split.values() if layer is not None))

  def default_cell(path: str):
    prefix, layer, tail = split[path]
    if layer is None:
      raise ValueError(f"no integer layer index in adapter path {path!r}; pass cell=")
    # Sorted by the prefix's first appearance, then numerically (block 2 before block 10).
    return _Layer(prefixes.index(prefix), layer, prefix if len(prefixes) > 1 else ""), labels[tail]

  cells: dict[tuple[Any, str], int] = {}
  for path, value in pattern.items():
    entries = ([((_Layer(0, i, ""), labels[split[path][2]]), v)
                for i, v in enumerate(np.ravel(value))]
               if isinstance(value, (list, tuple)) else [((cell or default_cell)(path), value)])
    for key, rank in entries:
      if key in cells:
        raise ValueError(f"two adapters map to layer {key[0]!r}, matrix {key[1]!r} (one is "
                         f"{path!r}); pass cell= to tell them apart")
      cells[key] = int(rank)
  if not cells:
    raise ValueError("empty rank pattern: nothing to plot")
  kind_rank = lambda x: 0 if isinstance(x, _Layer) else 2 if isinstance(x, str) else 1
  layers = sorted({k[0] for k in cells}, key=lambda x: (kind_rank(x), x))
  tick_labels = [f"{x.prefix}.{x.index}" if isinstance(x, _Layer) and x.prefix
                 else str(x.index if isinstance(x, _Layer) else x) for x in layers]
  kinds = list(dict.fromkeys(k[1] for k in cells))
  grid = np.full((len(kinds), len(layers)), np.nan)
  for (layer, kind), rank in cells.items():
    grid[kinds.index(kind), layers.index(layer)] = rank

  label_width = 0.08 * max(len(kind) for kind in kinds)
  figure = Figure(figsize=(max(4.0, 0.6 * len(layers) + 2 + label_width),
                           max(2.5, 0.5 * len(kinds) + 1.5)), layout="constrained")
  ax = figure.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
  figure.colorbar(image, ax=ax, label="live rank")
  ax.set_xticks(range(len(layers)), tick_labels)
  ax.set_yticks(range(len(kinds)), kinds)
  ax.set_xlabel("layer")
  ax.set_ylabel("matrix")
  for y, x in zip(*np.nonzero(~np.isnan(grid))):
    ax.text(x, y, f"{int(grid[y, x])}", ha="center", va="center", color="white")
  ax.set_title(title or f"live rank per matrix (mean {np.nanmean(grid):.2f})")
  return figure
