"""DoRA *dynamic rank*: importance-scored rank-1 components pruned to a global budget.

Mao et al., "DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution",
ACL 2024, arXiv 2405.17357 — **not** weight-decomposed DoRA (Liu et al. 2024, PEFT's
``use_dora=True``); nothing here decomposes weights into magnitude and direction.

Each adapted kernel is a sum of r' rank-1 components (layout of ``lorapro_jax.adapters``)::

  ΔK = s·A·diag(c)·B = s·Σ_i c_i·A[:, i]·B[i, :]      (gated form, ``lora_c`` present)
  ΔK = s·A·B                                          (plain form, c = 1)

**Importance** (``score="norm_ratio"``, the paper's): the share of component i in ΔK,
``s_i = |c_i|·‖A[:, i]‖·‖B[i, :]‖ / (‖A·diag(c)·B‖_F + 1e-8)``. The denominator comes in closed
form from the r'×r' Grams, ``‖A·diag(c)·B‖_F² = cᵀ·((AᵀA) ∘ (BBᵀ))·c``, so neither the
r'×n_in×n_out tensor of components nor the n_in×n_out product is ever built. ``score="sensitivity"``
is AdaLoRA's alternative: ``s_i = Σ |θ·g|`` over the component's parameters (c_i, A[:, i], B[i, :]).
Scores are smoothed by an EMA ``S ← β·S + (1−β)·s`` (from 0, no bias correction), updated after
every step up to the last pruning event, from the parameters *after* that step's update (the
reference calls its allocator right after ``optimizer.step()``).

**Schedule** over T steps (t counts completed updates, 1-based; round() rounds half up): warm-up
to t_i = round(0.15·T), events at t_i, t_i + interval, ... and at the last event
t_e = T − round(0.5·T). After an event with p = (t − t_i)/(t_e − t_i) the number of live
components over ALL adapted kernels is ``N − floor((N − R)·p³)`` (N = Σ r', R = Σ r over kernels;
for one r', r everywhere this is the paper's ``N − floor(N·(r'−r)/r'·p³)``), computed in exact
integer arithmetic and chosen by ONE global ranking of the EMA scores (ties: the component earlier
in the tree's order stays).

**Masking**: gated components are pruned by setting c_i = 0, plain ones by zeroing A[:, i] and
B[i, :]. ``revive=True`` (the reference): the mask is applied at events only, pruned components
may grow back in between and be re-ranked; from the last event on the final mask is applied after
every step. ``revive=False``: hard pruning, a pruned component stays exactly zero after every step.
Masks are static-shape boolean arrays (``(*stack, r')`` per adapter node) — shrink to per-kernel
ranks only at export (``shrink``, ``rank_pattern``).

Quirks of the reference code not copied: at p = 0 it prunes one component (``kthvalue(·, max(k,
1))``) and it prunes every component tied with the threshold; here the count is exactly the formula.

Example (an optax chain; ``dynamic_rank`` goes LAST, it needs ``params``)::

  import jax, jax.numpy as jnp, optax
  from lorapro_jax import dynamic_rank, rank_pattern
  ka, kb = jax.random.split(jax.random.key(0))
  params = {"layer": {"0": {"query": {"lora_a": jax.random.normal(ka, (16, 3)),
                                      "lora_b": jax.random.normal(kb, (3, 8)),
                                      "lora_c": jnp.zeros((3,))}}}}
  optimizer = optax.chain(optax.adamw(1e-2), dynamic_rank(total_steps=60, target_rank=2))
  state = optimizer.init(params)
  for _ in range(60):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  rank_pattern(state[1])   # {'layer.0.query': 2}
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorapro_jax.adapters import (
    DEFAULT_KEYS, AdapterKeys, Path, _rebuild, adapter_paths, get_path, map_adapters)

SCORES = ("norm_ratio", "sensitivity")
NORM_EPS = 1e-8


def _dotted(path: Path) -> str:
  return ".".join(path)


# ---------------------------------------------------------------------------------------------
# Configuration and schedule
# ---------------------------------------------------------------------------------------------


def initial_rank(target_rank: int, factor: float = 1.5) -> int:
  """The adapter rank r' to initialise for a target rank r: ``ceil(factor·r)`` (paper: 1.5).

  DoRA dynamic rank (Mao et al. 2024), not weight-decomposed DoRA (Liu et al. 2024).
  """
  if not isinstance(target_rank, int) or target_rank < 1 or factor < 1:
    raise ValueError(f"need an int target_rank >= 1 and factor >= 1, got {target_rank!r}, "
                     f"{factor!r}")
  return math.ceil(factor * target_rank)


def _round_steps(frac: float, total_steps: int) -> int:
  """frac·T rounded half up (Python's round() would send 2.5 to 2 but 3.5 to 4)."""
  return math.floor(frac * total_steps + 0.5)


def last_event_step(total_steps: int, final_frac: float = 0.5) -> int:
  """t_e = T − round(final_frac·T): DoRA dynamic rank's last pruning event (1-based step count).

  Mao et al. 2024, not weight-decomposed DoRA (Liu et al. 2024).
  """
  return total_steps - _round_steps(final_frac, total_steps)


def pruning_schedule(total_steps: int, n_components: int, n_target: int, *,
                     warmup_frac: float = 0.15, final_frac: float = 0.5,
                     interval: int = 10) -> dict[int, int]:
  """``{event step t: live components after the event}`` of DoRA dynamic rank (Mao et al. 2024).

  Not weight-decomposed DoRA (Liu et al. 2024). Events at t_i, t_i + interval, ... and t_e, with
  t_i = round(warmup_frac·T), t_e = T − round(final_frac·T); live = N − floor((N − R)·p³),
  p = (t − t_i)/(t_e − t_i), in exact integer arithmetic (N = n_components, R = n_target).

  >>> pruning_schedule(600, n_components=30, n_target=20)[300]
  20
  """
  warmup, last = _round_steps(warmup_frac, total_steps), last_event_step(total_steps, final_frac)
  if not 0 <= n_target <= n_components:
    raise ValueError(f"need 0 <= n_target <= n_components, got {n_target} and {n_components}")
  span, prunable = last - warmup, n_components - n_target
  steps = list(range(warmup, last, interval)) + [last]
  return {t: n_components - (prunable * (t - warmup) ** 3) // span ** 3 for t in steps}


@dataclasses.dataclass(frozen=True)
class DynamicRankConfig:
  """Hyperparameters of DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA).

  Attributes:
    total_steps: T, the number of optimizer steps of the run.
    target_rank: r per adapted kernel after pruning: one int, or a mapping from dotted adapter path
      (``"encoder.layer.0.attention.self.query"``) to int covering every adapter node. The initial
      rank r' is each adapter's own rank (its ``lora_a``'s last axis).
    warmup_frac: t_i = round(warmup_frac·T), the first event.
    final_frac: the last event is t_e = T − round(final_frac·T); the final mask holds after it.
    interval: steps between events.
    beta: EMA factor of the scores.
    revive: True: masks applied at events only (pruned components may come back until the last
      event, the reference's behaviour); False: hard pruning after every step.
    score: "norm_ratio" (the paper's) or "sensitivity" (AdaLoRA's |θ·g|, needs ``grads``).
    keys: key names of the factors inside adapter nodes.
  """

  total_steps: int
  target_rank: int | Mapping[str, int]
  warmup_frac: float = 0.15
  final_frac: float = 0.5
  interval: int = 10
  beta: float = 0.9
  revive: bool = True
  score: str = "norm_ratio"
  keys: AdapterKeys = DEFAULT_KEYS

  def __post_init__(self):
    if not isinstance(self.total_steps, (int, np.integer)) or self.total_steps < 1:
      raise ValueError(f"total_steps must be an int >= 1, got {self.total_steps!r}")
    if isinstance(self.target_rank, Mapping):
      bad = {k: v for k, v in self.target_rank.items() if not isinstance(v, int) or v < 0}
      if bad:
        raise ValueError(f"target ranks must be ints >= 0, got {bad}")
    elif not isinstance(self.target_rank, int) or self.target_rank < 0:
      raise ValueError(f"target_rank must be an int >= 0 or a mapping of dotted adapter paths to "
                       f"ints, got {self.target_rank!r}")
    if not isinstance(self.interval, (int, np.integer)) or self.interval < 1:
      raise ValueError(f"interval must be an int >= 1, got {self.interval!r}")
    if not 0.0 <= self.beta < 1.0:
      raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
    if self.score not in SCORES:
      raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
    if not isinstance(self.revive, bool):
      raise ValueError(f"revive must be True or False, got {self.revive!r}")
    if not 0 <= self.warmup_steps < self.last_event <= self.total_steps:
      raise ValueError(
          f"need 0 <= round(warmup_frac*T) < T - round(final_frac*T) <= T, got warmup_frac="
          f"{self.warmup_frac!r}, final_frac={self.final_frac!r}, total_steps={self.total_steps}")

  @property
  def warmup_steps(self) -> int:
    return _round_steps(self.warmup_frac, self.total_steps)

  @property
  def last_event(self) -> int:
    return last_event_step(self.total_steps, self.final_frac)

  def target_for(self, path: Path) -> int:
    if not isinstance(self.target_rank, Mapping):
      return self.target_rank
    if _dotted(path) not in self.target_rank:
      raise KeyError(f"target_rank has no entry for adapter {_dotted(path)!r}")
    return self.target_rank[_dotted(path)]

  def schedule(self, n_components: int, n_target: int) -> dict[int, int]:
    return pruning_schedule(self.total_steps, n_components, n_target,
                            warmup_frac=self.warmup_frac, final_frac=self.final_frac,
                            interval=self.interval)


class DynamicRankState(NamedTuple):
  """State of DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA).

  ``scores``, ``mask`` and ``final_mask`` mirror the adapter tree: each adapter node is replaced by
  an array of shape ``(*stack, r')`` (other leaves by ``optax.MaskedNode()``), so they shard and
  checkpoint like the adapters.

  Attributes:
    count: completed steps.
    scores: EMA importance of each component (float32).
    mask: live components (bool) as of the latest event.
    final_mask: the mask chosen at the last event, enforced after every later step (all True
      before the last event).
  """

  count: jax.Array
  scores: Any
  mask: Any
  final_mask: Any


# ---------------------------------------------------------------------------------------------
# Scores (one implementation each, vmapped over *stack by broadcasting)
# ---------------------------------------------------------------------------------------------


def norm_ratio_scores(a: jax.Array, b: jax.Array, c: jax.Array | None = None) -> jax.Array:
  """``|c_i|·‖A[:, i]‖·‖B[i, :]‖ / (‖A·diag(c)·B‖_F + 1e-8)``, shape (*stack, r), float32.

  DoRA dynamic rank's importance (Mao et al. 2024; not weight-decomposed DoRA): the Frobenius norm
  of component i relative to the whole update, ``‖ΔK_i‖_F / ‖ΔK‖_F`` (the scale s cancels). Only
  r×r Grams are formed: ``‖A·diag(c)·B‖_F² = cᵀ·((AᵀA) ∘ (BBᵀ))·c``. ``c=None``: plain form (c = 1).
  """
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  gram_a = jnp.einsum("...ni,...nj->...ij", a32, a32)
  gram_b = jnp.einsum("...io,...jo->...ij", b32, b32)
  c32 = jnp.ones(a.shape[:-2] + a.shape[-1:], jnp.float32) if c is None else c.astype(jnp.float32)
  total_sq = jnp.einsum("...i,...ij,...j->...", c32, gram_a * gram_b, c32)
  # Rounding can leave a tiny negative quadratic form when components cancel.
  total = jnp.sqrt(jnp.maximum(total_sq, 0.0))
  component = jnp.abs(c32) * jnp.sqrt(jnp.diagonal(gram_a, axis1=-2, axis2=-1)
                                      * jnp.diagonal(gram_b, axis1=-2, axis2=-1))
  return component / (total[..., None] + NORM_EPS)


def sensitivity_scores(node: Mapping, grad_node: Mapping,
                       keys: AdapterKeys = DEFAULT_KEYS) -> jax.Array:
  """AdaLoRA's sensitivity ``Σ |θ·g|`` over each component's parameters, shape (*stack, r).

  For DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA) with ``score="sensitivity"``:
  component i owns A[:, i], B[i, :] and, gated, c_i. ``grad_node`` holds the loss gradients.
  """
  f32 = lambda x: x.astype(jnp.float32)
  total = (jnp.abs(f32(node[keys.a]) * f32(grad_node[keys.a])).sum(-2)
           + jnp.abs(f32(node[keys.b]) * f32(grad_node[keys.b])).sum(-1))
  if keys.c in node:
    total = total + jnp.abs(f32(node[keys.c]) * f32(grad_node[keys.c]))
  return total


# ---------------------------------------------------------------------------------------------
# The shared core: scores, events, the global ranking
# ---------------------------------------------------------------------------------------------


def _components_shape(path: Path, node: Mapping, keys: AdapterKeys) -> tuple[int, ...]:
  a, b = node[keys.a], node[keys.b]
  shape = a.shape[:-2] + a.shape[-1:]
  if a.ndim < 2 or b.shape[:-2] + b.shape[-2:-1] != shape:
    raise ValueError(f"adapter {_dotted(path)!r}: {keys.a} {a.shape} and {keys.b} {b.shape} are "
                     f"not (*stack, n_in, r) and (*stack, r, n_out)")
  if keys.c in node and node[keys.c].shape != shape:
    raise ValueError(f"adapter {_dotted(path)!r}: {keys.c} must have shape (*stack, r) = {shape}, "
                     f"got {node[keys.c].shape}")
  return shape


def _mirror(tree: Any, per_path: Mapping[Path, Any], keys: AdapterKeys) -> Any:
  """A tree mirroring ``tree``'s adapter nodes, holding ``per_path[path]`` in place of each node."""
  return map_adapters(lambda path, node: per_path[path], tree, keys=keys,
                      other=lambda path, leaf: optax.MaskedNode())


def _adapters(tree: Any, keys: AdapterKeys) -> list[tuple[Path, Mapping]]:
  paths = adapter_paths(tree, keys)
  if not paths:
    raise ValueError(f"dynamic rank found no adapter nodes (mappings holding {keys.a!r} and "
                     f"{keys.b!r}) in the parameters")
  return [(path, get_path(tree, path)) for path in paths]


def dynamic_rank_init(params: Any, config: DynamicRankConfig) -> DynamicRankState:
  """The initial state of DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA).

  Scores 0, every component live. ``params`` is any tree holding the adapter nodes.
  """
  keys = config.keys
  shapes = {path: _components_shape(path, node, keys) for path, node in _adapters(params, keys)}
  for path, shape in shapes.items():
    if config.target_for(path) > shape[-1]:
      raise ValueError(f"target rank {config.target_for(path)} for {_dotted(path)!r} exceeds its "
                       f"adapter rank r' = {shape[-1]}")
  if isinstance(config.target_rank, Mapping):
    unknown = set(config.target_rank) - {_dotted(path) for path in shapes}
    if unknown:
      raise ValueError(f"target_rank names no adapter at {sorted(unknown)}")
  scores = {path: jnp.zeros(shape, jnp.float32) for path, shape in shapes.items()}
  # Separate buffers for mask and final_mask: a train step that donates its state cannot donate
  # one buffer twice.
  def all_live():
    return _mirror(params, {path: jnp.ones(shape, jnp.bool_) for path, shape in shapes.items()},
                   keys)
  return DynamicRankState(count=jnp.zeros([], jnp.int32), scores=_mirror(params, scores, keys),
                          mask=all_live(), final_mask=all_live())


def _global_top_k(scores: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
  """Boolean mask of the k highest eligible scores; among equal scores the lower index wins."""
  key = jnp.where(eligible, scores, -jnp.inf)
  order = jnp.argsort(-key, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  return rank < k


def _plan(params: Any, state: DynamicRankState, config: DynamicRankConfig,
          grads: Any) -> tuple[dict[Path, jax.Array], DynamicRankState]:
  """Scores, events and masks for one step; ``params`` are the parameters after the update.

  Returns ``{path: components to zero now (bool, (*stack, r'))}`` and the new state.
  """
  keys = config.keys
  nodes = _adapters(params, keys)
  shapes = [_components_shape(path, node, keys) for path, node in nodes]
  sizes = [math.prod(shape) for shape in shapes]
  n_components = sum(sizes)
  n_target = sum(math.prod(shape[:-1]) * config.target_for(path)
                 for (path, _), shape in zip(nodes, shapes))
  schedule = config.schedule(n_components, n_target)
  event_steps = jnp.asarray(list(schedule), jnp.int32)
  live_counts = jnp.asarray(list(schedule.values()), jnp.int32)

  step = state.count + 1
  scoring = step <= config.last_event
  old_scores = [get_path(state.scores, path) for path, _ in nodes]
  old_mask = [get_path(state.mask, path) for path, _ in nodes]
  old_final = [get_path(state.final_mask, path) for path, _ in nodes]
  if config.score == "sensitivity":
    if grads is None:
      raise ValueError("score='sensitivity' scores |theta * grad|: pass the loss gradients, "
                       "update(updates, state, params, grads=grads)")
    raw = [sensitivity_scores(node, get_path(grads, path), keys) for path, node in nodes]
  else:
    raw = [norm_ratio_scores(node[keys.a], node[keys.b], node.get(keys.c)) for _, node in nodes]
  scores = [jnp.where(scoring, config.beta * old + (1.0 - config.beta) * new, old)
            for old, new in zip(old_scores, raw)]

  is_event = jnp.any(event_steps == step)
  budget = jnp.sum(jnp.where(event_steps == step, live_counts, 0))
  flat_mask = jnp.concatenate([m.reshape(-1) for m in old_mask])
  # Hard pruning ranks only the live components, so the live set only ever shrinks.
  eligible = jnp.ones_like(flat_mask) if config.revive else flat_mask
  keep = _global_top_k(jnp.concatenate([s.reshape(-1) for s in scores]), eligible, budget)
  flat_mask = jnp.where(is_event, keep, flat_mask)
  offsets = np.cumsum([0] + sizes)
  mask = [flat_mask[lo:hi].reshape(shape) for lo, hi, shape in zip(offsets, offsets[1:], shapes)]
  final = [jnp.where(step == config.last_event, m, f) for m, f in zip(mask, old_final)]
  enforce = jnp.logical_or(is_event, step > config.last_event) if config.revive else True
  zero = {path: jnp.logical_and(enforce, ~m) for (path, _), m in zip(nodes, mask)}

  paths = [path for path, _ in nodes]
  new_state = DynamicRankState(
      count=optax.safe_int32_increment(state.count),
      scores=_mirror(params, dict(zip(paths, scores)), keys),
      mask=_mirror(params, dict(zip(paths, mask)), keys),
      final_mask=_mirror(params, dict(zip(paths, final)), keys))
  return zero, new_state


def _component_entries(node: Mapping, zero: jax.Array, keys: AdapterKeys) -> dict[str, jax.Array]:
  """Which entries of each factor belong to zeroed components: c_i gated, else A[:, i], B[i, :]."""
  if keys.c in node:
    return {keys.c: zero}
  return {keys.a: zero[..., None, :], keys.b: zero[..., :, None]}


def _after_update(updates: Any, params: Any, keys: AdapterKeys) -> Any:
  """The adapter nodes as ``optax.apply_updates`` will leave them (other entries dropped)."""

  def node_fn(path, update_node, param_node):
    names = [name for name in (keys.a, keys.b, keys.c) if name in param_node]
    return {name: optax.apply_updates(param_node[name], update_node[name]) for name in names}

  return map_adapters(node_fn, updates, params, keys=keys,
                      other=lambda path, leaf, param: optax.MaskedNode())


def dynamic_rank_step(params: Any, state: DynamicRankState, config: DynamicRankConfig, *,
                      grads: Any = None) -> tuple[Any, DynamicRankState]:
  """One step of DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA), for own loops.

  Call it right after applying the optimizer's update (as the reference calls its allocator after
  ``optimizer.step()``): it updates the EMA scores from ``params``, prunes at events, and returns
  the parameters with the masked components set to exactly zero, and the new state. Same code as
  the ``dynamic_rank`` transform.

  Example::

    config = DynamicRankConfig(total_steps=1000, target_rank=8)
    dr_state = dynamic_rank_init(params, config)
    ...  # in the loop:
    params = optax.apply_updates(params, updates)
    params, dr_state = dynamic_rank_step(params, dr_state, config)

  Args:
    params: the tree holding the adapter nodes, after the step's update.
    state: from ``dynamic_rank_init`` or the previous call.
    config: the ``DynamicRankConfig``.
    grads: the step's loss gradients (same structure), needed by ``score="sensitivity"`` only.
  """
  keys = config.keys
  zero, new_state = _plan(params, state, config, grads)

  def node_fn(path, node):
    entries = _component_entries(node, zero[path], keys)
    return _rebuild(node, {name: jnp.where(entries[name], jnp.zeros_like(value), value)
                           if name in entries else value for name, value in node.items()})

  return map_adapters(node_fn, params, keys=keys), new_state


def dynamic_rank(total_steps: int, target_rank: int | Mapping[str, int], *,
                 warmup_frac: float = 0.15, final_frac: float = 0.5, interval: int = 10,
                 beta: float = 0.9, revive: bool = True, score: str = "norm_ratio",
                 keys: AdapterKeys = DEFAULT_KEYS) -> optax.GradientTransformationExtraArgs:
  """DoRA dynamic rank (Mao et al., ACL 2024, arXiv 2405.17357) as an optax transform.

  Not weight-decomposed DoRA (Liu et al. 2024, PEFT's ``use_dora``). Place it LAST in a chain:
  ``optax.chain(optimizer, dynamic_rank(T, r))``. ``update(updates, state, params)`` needs the
  params; it scores the parameters ``params + updates`` that the step will produce, and for every
  component to be zeroed now it replaces the update by ``-param``, so that after
  ``optax.apply_updates`` the gate c_i (gated form) or A[:, i] and B[i, :] (plain form) are exactly
  0 (``p + (-p)`` is exactly 0 in any float format), whatever the optimizer's moments. Other
  entries' updates pass through unchanged. See the module docstring for scores, schedule and masks.

  Args:
    total_steps: T, the number of optimizer steps of the run.
    target_rank: r per adapted kernel (int, or mapping dotted path -> int); r' is the adapter rank.
    warmup_frac, final_frac, interval: the schedule (first event round(warmup_frac·T), last event
      T − round(final_frac·T), events every ``interval`` steps).
    beta: EMA factor of the scores.
    revive: True (reference): masks applied at events, final mask after every step from the last
      event on; False: hard pruning, masked components zeroed after every step.
    score: "norm_ratio" or "sensitivity". "sensitivity" scores ``Σ|θ·g|`` with θ the parameters
      after the update and g the loss gradient, which the transform cannot see (the updates reaching
      it are the optimizer's output): pass it as an extra argument,
      ``chain.update(grads, state, params, grads=grads)``; other extra arguments are ignored, per
      optax's convention.
    keys: key names of the factors inside adapter nodes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a ``DynamicRankState``.
  """
  config = DynamicRankConfig(total_steps, target_rank, warmup_frac, final_frac, interval, beta,
                             revive, score, keys)

  def init_fn(params):
    return dynamic_rank_init(params, config)

  def update_fn(updates, state, params=None, *, grads=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("dynamic_rank needs the current parameters: call "
                       "update(updates, state, params), with dynamic_rank last in the chain")
    zero, new_state = _plan(_after_update(updates, params, keys), state, config, grads)

    def node_fn(path, update_node, param_node):
      entries = _component_entries(param_node, zero[path], keys)
      return _rebuild(update_node, {
          name: jnp.where(entries[name], -param_node[name], value) if name in entries else value
          for name, value in update_node.items()})

    return map_adapters(node_fn, updates, params, keys=keys,
                        other=lambda path, leaf, param: leaf), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# DEM regulariser
# ---------------------------------------------------------------------------------------------


def dem_penalty(adapters: Any, keys: AdapterKeys = DEFAULT_KEYS) -> jax.Array:
  """DoRA's DEM regulariser (Mao et al. 2024; not weight-decomposed DoRA), a float32 scalar.

  The mean, over all 2·Σr' vectors formed by the columns A[:, i] and rows B[i, :] of every adapted
  kernel (each slice of a stacked node a kernel of its own), of their unbiased variance::

    DEM = 1/(2·Σ_k r'_k) · Σ_k Σ_i [ var(A_k[:, i]) + var(B_k[i, :]) ]

  i.e. for each component the mean of its two variances, averaged over all components of all
  kernels — the reference's normalisation (``sum_var / (n_linear·2·r')``), so its η carries over.
  Add ``η·dem_penalty(adapters)`` to the loss while ``dem_active(step, T)``.
  """
  total, count = jnp.zeros([], jnp.float32), 0
  for path, node in _adapters(adapters, keys):
    a, b = node[keys.a], node[keys.b]
    if a.shape[-2] < 2 or b.shape[-1] < 2:
      raise ValueError(f"DEM needs n_in, n_out >= 2 for an unbiased variance, got {a.shape} and "
                       f"{b.shape} at {_dotted(path)!r}")
    total += (jnp.var(a.astype(jnp.float32), axis=-2, ddof=1).sum()
              + jnp.var(b.astype(jnp.float32), axis=-1, ddof=1).sum())
    count += 2 * math.prod(a.shape[:-2] + a.shape[-1:])
  return total / count


def dem_active(step: Any, total_steps: int, final_frac: float = 0.5) -> jax.Array:
  """Whether DoRA's DEM term is on: until pruning ends (Mao et al. 2024; not Liu et al.'s DoRA).

  ``step`` is the 0-based index of the training step whose loss is computed (optax's count before
  the update, or a loop index). The step completes update number ``step + 1``; DEM is on while that
  is at most the last event t_e = T − round(final_frac·T), as in the reference. Works under jit.
  """
  return jnp.asarray(step) < last_event_step(total_steps, final_frac)


# ---------------------------------------------------------------------------------------------
# Export helpers: live ranks, shrinking, the heatmap
# ---------------------------------------------------------------------------------------------


def _mask_items(state_or_masks: Any) -> list[tuple[Path, np.ndarray]]:
  """(path, bool mask) of every adapter node of a state (its current mask) or a mask tree."""
  masks = state_or_masks.mask if isinstance(state_or_masks, DynamicRankState) else state_or_masks
  items: list[tuple[Path, np.ndarray]] = []

  def walk(path: Path, node: Any):
    if isinstance(node, Mapping):
      for key, value in node.items():
        walk(path + (str(key),), value)
    elif isinstance(node, (jax.Array, np.ndarray)):
      if node.dtype != np.bool_:
        raise ValueError(f"expected boolean masks, got {node.dtype} at {_dotted(path)!r}")
      items.append((path, np.asarray(node)))
    elif not isinstance(node, optax.MaskedNode):
      raise ValueError(f"expected a DynamicRankState or a tree of boolean masks, got "
                       f"{type(node).__name__} at {_dotted(path)!r}")

  walk((), masks)
  return items


def rank_pattern(state_or_masks: Any) -> dict[str, Any]:
  """``{dotted adapter path: live rank}`` from a ``DynamicRankState`` (its mask) or a mask tree.

  DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA). Stacked nodes (``*stack`` axes)
  give a nested list of live ranks, one per slice. From the last event on, the state's mask is the
  final mask.
  """
  return {_dotted(path): (int(m.sum()) if m.ndim == 1 else m.sum(-1).tolist())
          for path, m in _mask_items(state_or_masks)}


def shrink(adapters: Any, state_or_masks: Any, keys: AdapterKeys = DEFAULT_KEYS) -> Any:
  """Adapters with dead components removed and c folded into B, for export (not jit-able).

  DoRA dynamic rank (Mao et al. 2024; not weight-decomposed DoRA). For each adapter node with
  live components L: ``A' = A[:, L]``, ``B' = diag(c_L)·B[L, :]`` (gated) or ``B[L, :]``, no
  ``lora_c``, so ``A'·B' = A·diag(c)·B`` and outputs are unchanged *with the same scale s*
  (exporting to PEFT with rank r_new therefore needs ``alpha = s·r_new``). Stacked nodes keep one
  array: live components first, zero-padded to the largest live rank among the slices
  (``rank_pattern`` gives each slice's rank). Raises if a dead component still contributes
  (pruned gates that revived before the last event), since dropping it would change the outputs.
  """
  masks = dict(_mask_items(state_or_masks))

  def node_fn(path, node):
    if path not in masks:
      raise KeyError(f"no mask for adapter {_dotted(path)!r}")
    live = masks[path]
    a, b = np.asarray(node[keys.a]), np.asarray(node[keys.b])
    if live.shape != a.shape[:-2] + a.shape[-1:]:
      raise ValueError(f"mask of shape {live.shape} does not fit adapter {_dotted(path)!r} with "
                       f"{keys.a} {a.shape}")
    c = np.asarray(node[keys.c], np.float64) if keys.c in node else np.ones(live.shape)
    contribution = (np.abs(c) * np.linalg.norm(a.astype(np.float64), axis=-2)
                    * np.linalg.norm(b.astype(np.float64), axis=-1))
    if np.any(contribution[~live] != 0):
      raise ValueError(f"adapter {_dotted(path)!r} has masked components that are not zero; shrink "
                       f"after the last pruning event (or use revive=False)")
    order = np.argsort(~live, axis=-1, kind="stable")[..., :int(live.sum(-1).max(initial=0))]
    kept = np.take_along_axis(live, order, -1)
    folded_b = (np.take_along_axis(c, order, -1) * kept)[..., None] * np.take_along_axis(
        b.astype(np.float64), order[..., None], -2)
    items = {name: value for name, value in node.items() if name not in (keys.a, keys.b, keys.c)}
    items[keys.a] = jnp.asarray(np.take_along_axis(a, order[..., None, :], -1) * kept[..., None, :],
                                a.dtype)
    items[keys.b] = jnp.asarray(folded_b, b.dtype)
    return {name: items[name] for name in node if name in items}

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
  return ".".join(parts[:at]), int(parts[at]), tuple(parts[at + 1:])


def _matrix_labels(tails: set[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
  """Each tail's shortest suffix that no other tail shares (``query``, ``intermediate.dense``)."""
  labels = {}
  for tail in tails:
    length = next((k for k in range(1, len(tail) + 1)
                   if all(other[-k:] != tail[-k:] for other in tails if other != tail)), len(tail))
    labels[tail] = ".".join(tail[-length:])
  return labels


def plot_rank_heatmap(rank_pattern_or_state: Any, *, cell=None, title: str | None = None,
                      cmap: str = "viridis"):
  """A heatmap of live ranks, matrix types × layers, like Figure 2 of Mao et al. 2024.

  DoRA dynamic rank (not weight-decomposed DoRA). Takes a ``rank_pattern`` dict or a
  ``DynamicRankState``. By default the layer is the first integer element of a dotted path and the
  matrix type its last element, lengthened to the shortest unambiguous suffix where the last
  element repeats (BERT: ``query``, ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``); where several prefixes carry layer numbers (T5's ``encoder.block.0`` and
  ``decoder.block.0``) the prefix is part of the layer label. Stacked entries (lists) take the layer
  from the position in the list. ``cell(path) -> (layer, matrix_type)`` overrides all this. Returns
  a ``matplotlib.figure.Figure`` (no pyplot state is touched).
  """
  from matplotlib.figure import Figure  # a plotting dependency only where a plot is drawn

  pattern = (rank_pattern(rank_pattern_or_state)
             if isinstance(rank_pattern_or_state, DynamicRankState) else rank_pattern_or_state)
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
