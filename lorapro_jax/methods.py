"""Fine-tuning methods as data: ONE table of what trains, with which update, and whether rank is
pruned.

Every method is a :class:`Method` record in :data:`METHODS`; the demo, the experiments and the
benchmarks all build their LoRA config, trainable tree, optimizer and regulariser from it, so a
method name means the same thing everywhere and nothing else parses method names.

=========================  ==========================  ===============  ======  ======
name                       trains                      update           rsLoRA  prunes
=========================  ==========================  ===============  ======  ======
``full``                   every parameter             AdamW
``lora``                   adapters + modules_to_save  AdamW
``rslora``                 adapters + modules_to_save  AdamW            yes
``lora_pro``               adapters + modules_to_save  LoRA-Pro
``lora_pro_full``          adapters + modules_to_save  LoRA-Pro (full)
``dynamic_rank``           adapters + modules_to_save  AdamW                    yes
``lora_pro_dynamic_rank``  adapters + modules_to_save  LoRA-Pro                 yes
=========================  ==========================  ===============  ======  ======

The optimizer of every method is one chain::

  [clip_by_global_norm] → AdamW | lora_pro | lora_pro_full → [dynamic_rank]

Clipping comes first, on the raw gradients (LoRA-Pro's reference code clips after Adam with the
raw norm; we do not copy that). LoRA-Pro (Wang et al. 2024) replaces AdamW on the adapters:
``lora_pro`` adjusts the factor gradients so that ``s·(gA·B + A·gB)`` is the projection of the full
gradient onto the rank-r tangent space, then runs per-factor AdamW; ``lora_pro_full`` keeps the
paper's full-rank Adam moments of that equivalent gradient. DoRA dynamic rank (Mao et al. 2024;
not weight-decomposed DoRA) comes last because it masks the final updates, and its DEM penalty
joins the loss as the train step's regulariser; both read one :class:`DynamicRankConfig`, which
also shapes the pruned adapters (initial rank ``ceil(1.5·r)``, gates ``lora_c`` unless
``gated=False``).

>>> import jax.numpy as jnp
>>> from lorapro_jax.lora import LoRAConfig
>>> method = METHODS["lora_pro_dynamic_rank"]
>>> dynamic = DynamicRankConfig(total_steps=100, target_rank=2, dem_weight=0.1)
>>> lora = method.lora_config(LoRAConfig(rank=2, alpha=4.0, targets="dense"), dynamic)
>>> lora.rank, lora.gated                       # starts at r' = ceil(1.5·2), with gates
(3, True)
>>> params = {"dense": {"lora_a": jnp.ones((5, 3)), "lora_b": jnp.ones((3, 4)),
...                     "lora_c": jnp.zeros(3)}}
>>> optimizer = method.optimizer(1e-3, scale=lora.scales(params), dynamic=dynamic)
>>> type(optimizer.init(params)[-1]).__name__   # dynamic rank ends the chain
'DynamicRankState'
>>> METHODS["qlora"]  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
KeyError: "unknown method 'qlora'; expected one of ['full', 'lora', 'rslora', ...]"
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from lorapro_jax.dynamic_rank import DynamicRankConfig, dem_regularizer, dynamic_rank
from lorapro_jax.inject import init_adapters, inject
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.lora_pro import lora_pro, lora_pro_full
from lorapro_jax.trees import split

# update(learning_rate, scale, *, b1, b2, weight_decay) -> the chain's core transform
Update = Callable[..., optax.GradientTransformation]


def adamw_update(learning_rate, scale, *, b1: float, b2: float,
                 weight_decay: float) -> optax.GradientTransformation:
  """``optax.adamw`` on every trainable leaf; the LoRA scale does not enter it."""
  del scale
  return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)


def _needs_scale(name: str, scale: Any) -> None:
  if scale is None:
    raise ValueError(f"{name} needs the LoRA scale s of every pair: pass "
                     "scale=LoRAConfig.scales(trainable) (or one number)")


def lora_pro_update(learning_rate, scale, *, b1: float, b2: float,
                    weight_decay: float) -> optax.GradientTransformation:
  """:func:`lorapro_jax.lora_pro.lora_pro`: LoRA-Pro's adjusted factor gradients, then AdamW."""
  _needs_scale("LoRA-Pro", scale)
  return lora_pro(learning_rate, scale, b1=b1, b2=b2, weight_decay=weight_decay)


def lora_pro_full_update(learning_rate, scale, *, b1: float, b2: float,
                         weight_decay: float) -> optax.GradientTransformation:
  """:func:`lorapro_jax.lora_pro.lora_pro_full`: full-rank Adam moments of the equivalent
  gradient, the direction projected back onto the factors (the paper's AdamW)."""
  _needs_scale("LoRA-Pro (full)", scale)
  return lora_pro_full(learning_rate, scale, b1=b1, b2=b2, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class Method:
  """One fine-tuning method.

  Attributes:
    name: its key in :data:`METHODS`, the one spelling used by configs, flags and results.
    adapters: True: LoRA adapters (and ``LoRAConfig.modules_to_save``) train on a frozen base;
      False: every parameter trains (full fine-tuning, no LoRAConfig).
    update: ``update(learning_rate, scale, *, b1, b2, weight_decay)``, the chain's core
      transform (:func:`adamw_update`, :func:`lora_pro_update`, :func:`lora_pro_full_update`).
    rslora: rank-stabilised scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
    prunes: DoRA dynamic rank prunes the adapters' components to a global budget: its
      :class:`DynamicRankConfig` shapes the adapters (rank, gates), its transform ends the chain
      and its DEM penalty joins the loss.
  """

  name: str
  adapters: bool
  update: Update
  rslora: bool = False
  prunes: bool = False

  def __post_init__(self):
    if not self.adapters and (self.rslora or self.prunes):
      raise ValueError(f"method {self.name!r} trains every parameter: rslora and prunes describe "
                       "adapters and must be False")

  def lora_config(self, base: LoRAConfig,
                  dynamic: DynamicRankConfig | None = None) -> LoRAConfig | None:
    """The method's adapters: ``base`` (targets, rank, alpha, modules_to_save, ...) with its
    rsLoRA set; a pruning method's rank and gates from ``dynamic``
    (:meth:`DynamicRankConfig.lora_config`). None for full fine-tuning."""
    self._check_dynamic(dynamic)
    if not self.adapters:
      return None
    config = dataclasses.replace(base, rslora=self.rslora)
    return dynamic.lora_config(config) if self.prunes else config

  def prepare(self, module: Any, params: Any, lora: LoRAConfig | None, rng: jax.Array,
              *example_args, **example_kwargs) -> tuple[Any, Any, Any]:
    """``(model, frozen base, trainable)`` from a linen ``module`` and its ``params``.

    Full fine-tuning trains ``params`` themselves (base None, ``lora`` must be None). Adapter
    methods inject ``lora`` (from :meth:`lora_config`) into ``module``, create the adapters (and
    the ``modules_to_save`` missing from ``params``) by one call on the example inputs, and
    freeze the rest of ``params``.
    """
    if (lora is None) == self.adapters:
      raise ValueError(f"method {self.name!r} "
                       + ("needs its LoRAConfig (Method.lora_config)" if self.adapters
                          else "trains every parameter: pass lora=None"))
    if not self.adapters:
      return module, None, params
    model = inject(module, lora)
    trainable = init_adapters(model, params, rng, *example_args, **example_kwargs)
    base, _ = split(params, lora)
    return model, base, trainable

  def optimizer(self, learning_rate: float | optax.Schedule, *, scale: Any = None,
                weight_decay: float = 0.0, clip_norm: float | None = 1.0, b1: float = 0.9,
                b2: float = 0.999,
                dynamic: DynamicRankConfig | None = None) -> optax.GradientTransformation:
    """``chain([clip_by_global_norm(clip_norm)], update, [dynamic_rank(dynamic)])``.

    Args:
      learning_rate: a float or an optax schedule.
      scale: the LoRA scale (``LoRAConfig.scales(trainable)`` or one number): LoRA-Pro needs it.
      weight_decay: decoupled weight decay of AdamW / LoRA-Pro.
      clip_norm: clip the raw gradients to this global norm first (None: no clipping).
      b1, b2: Adam's moment decays.
      dynamic: the dynamic-rank config, required by the pruning methods and refused by the others.
    """
    self._check_dynamic(dynamic)
    chain = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    chain.append(self.update(learning_rate, scale, b1=b1, b2=b2, weight_decay=weight_decay))
    if self.prunes:
      chain.append(dynamic_rank(dynamic))  # last: it masks the final updates
    return optax.chain(*chain)

  def regularizer(self, dynamic: DynamicRankConfig | None = None
                  ) -> Callable[[Any, jax.Array], jax.Array] | None:
    """The train step's ``regularizer(trainable, step)``: dynamic rank's DEM penalty weighted by
    ``dynamic.dem_weight`` while pruning runs (:func:`lorapro_jax.dynamic_rank.dem_regularizer`);
    None for the other methods and for a zero weight."""
    self._check_dynamic(dynamic)
    return dem_regularizer(dynamic) if self.prunes and dynamic.dem_weight else None

  def _check_dynamic(self, dynamic: DynamicRankConfig | None) -> None:
    if self.prunes and dynamic is None:
      raise ValueError(f"method {self.name!r} prunes: pass dynamic=DynamicRankConfig(total_steps="
                       "..., target_rank=...)")
    if not self.prunes and dynamic is not None:
      raise ValueError(f"method {self.name!r} does not prune: got a DynamicRankConfig, expected "
                       "None")


class _Table(dict):
  """A dict whose missing keys raise a KeyError listing the known ones."""

  def __missing__(self, name):
    raise KeyError(f"unknown method {name!r}; expected one of {list(self)}")


METHODS: dict[str, Method] = _Table((method.name, method) for method in (
    Method("full", adapters=False, update=adamw_update),
    Method("lora", adapters=True, update=adamw_update),
    Method("rslora", adapters=True, update=adamw_update, rslora=True),
    Method("lora_pro", adapters=True, update=lora_pro_update),
    Method("lora_pro_full", adapters=True, update=lora_pro_full_update),
    Method("dynamic_rank", adapters=True, update=adamw_update, prunes=True),
    Method("lora_pro_dynamic_rank", adapters=True, update=lora_pro_update, prunes=True),
))
