"""LoRA, LoRA-Pro and dynamic rank for ``flax.nnx`` models.

NNX keeps parameters as ``nnx.Variable`` objects inside modules; ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`` hands the optax transform an ``nnx.State``: a nested mapping whose adapter
nodes follow the contract of :mod:`lorapro_jax.adapters`. So the transforms of this library
(:func:`~lorapro_jax.lora_pro.lora_pro`, :func:`~lorapro_jax.lora_pro.lora_pro_full`,
:func:`~lorapro_jax.dynamic_rank.dynamic_rank` and their chains) run unchanged inside NNX's
optimizer, on three kinds of adapters:

* flax's own ``nnx.LoRA`` / ``nnx.LoRALinear``: ``lora_a`` ``(n_in, r)``, ``lora_b`` ``(r, n_out)``
  and no scale (``s = 1``);
* qwix's (``qwix.apply_lora_to_model``): ``kernel_lora_a`` / ``kernel_lora_b`` next to the layer's
  ``kernel``, ``s = alpha / rank`` of its rule: pass ``keys=QWIX_KEYS`` and that number;
* ours, :class:`LoRALayer`, put into an existing model by :func:`inject` from a
  :class:`~lorapro_jax.lora.LoRAConfig` (the linen side's words: targets, alpha / rsLoRA scale,
  dropout, rank / alpha patterns, the gated form ``lora_c`` that dynamic rank prunes) — also into
  layers that ``nnx.vmap`` stacked for ``nnx.scan``.

:func:`scales` reads each adapter's ``s`` from its module (the ``scale`` argument of LoRA-Pro and
dynamic rank), :func:`adapters` gives the adapters as the plain nested dict the linen side uses
(for ``shrink``, ``rank_pattern`` and PEFT export), and :func:`merge` folds them into the kernels.

>>> import jax.numpy as jnp, optax
>>> from flax import nnx
>>> from lorapro_jax import LoRAConfig, lora_pro
>>> from lorapro_jax import nnx as lnnx
>>> class MLP(nnx.Module):
...   def __init__(self, rngs):
...     self.hidden, self.out = nnx.Linear(5, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)
...   def __call__(self, x):
...     return self.out(nnx.relu(self.hidden(x)))
>>> base = MLP(nnx.Rngs(0))
>>> model = lnnx.inject(base, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
>>> x, y = jnp.ones((8, 5)), jnp.zeros((8, 4))
>>> bool(jnp.array_equal(model(x), base(x)))            # B = 0: the base model's outputs
True
>>> opt = nnx.Optimizer(model, lora_pro(1e-2, lnnx.scales(model)), wrt=nnx.LoRAParam)
>>> @nnx.jit
... def step(model, opt):
...   loss = lambda model: jnp.mean((model(x) - y) ** 2)
...   value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
...   opt.update(model, grads)
...   return value
>>> bool(step(model, opt) > step(model, opt))
True
>>> merged = lnnx.merge(model)                          # an MLP again, with K0 + s·A·B
>>> bool(jnp.allclose(merged(x), model(x), atol=1e-6)), type(merged.hidden).__name__
(True, 'Linear')
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import unflatten_dict

from lorapro_jax.adapters import AdapterKeys, Path, dotted
from lorapro_jax.inject import check_matches
from lorapro_jax.trees import layout_differences
from lorapro_jax.lora import (KernelLayout, LoRAConfig, adapter_dropout, adapter_initializers,
                              dense_general_layout, dense_layout, einsum_layout, kernel_update,
                              low_rank_update)

# qwix names an adapter after the weight it adapts: ``kernel`` -> ``kernel_lora_a`` / ``_b``.
QWIX_KEYS = AdapterKeys(a="kernel_lora_a", b="kernel_lora_b", c="kernel_lora_c")
LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _equation(base: nnx.Einsum, args: tuple = (), kwargs: dict | None = None) -> str:
  called = args[0] if args else (kwargs or {}).get("einsum_str")
  equation = called if called is not None else base.einsum_str
  if equation is None:
    raise ValueError("LoRA on an nnx.Einsum needs its einsum_str (set it at construction)")
  return equation.replace(" ", "")


def _layout(base: Any, x_shape: tuple[int, ...], args: tuple = (),
            kwargs: dict | None = None) -> KernelLayout:
  """The layout of ``base`` applied to an input of shape ``x_shape``."""
  if isinstance(base, nnx.Linear):
    return dense_layout(x_shape, base.out_features)
  if isinstance(base, nnx.LinearGeneral):
    return dense_general_layout(x_shape, base.out_features, base.axis, tuple(base.batch_axis))
  return einsum_layout(_equation(base, args, kwargs), base.kernel_shape, len(x_shape))


def _example_shape(base: Any) -> tuple[int, ...]:
  """An input shape ``base`` accepts (one free axis), to read its layout before any call."""
  if isinstance(base, nnx.Linear):
    return (1, base.in_features)
  if isinstance(base, nnx.LinearGeneral):
    # batch axes lead (flax checks that), then the contracted axes at their positions
    batch = tuple(base.batch_axis.values())
    ndim = max([len(batch) + len(base.in_features) + 1]
               + [a + 1 for a in base.axis if a >= 0] + [-a for a in base.axis if a < 0])
    shape = [1] * ndim
    shape[:len(batch)] = batch
    for axis, size in zip(base.axis, base.in_features):
      shape[axis] = size
    return tuple(shape)
  x, kernel = _equation(base).split("->")[0].split(",")
  sizes = dict(zip(kernel, base.kernel_shape))
  return tuple(sizes.get(ch, 1) for ch in x.replace("...", "."))


def _declared_kernel_ndim(base: Any) -> int:
  if isinstance(base, nnx.Linear):
    return 2
  if isinstance(base, nnx.LinearGeneral):
    return len(base.batch_axis) + len(base.in_features) + len(base.out_features)
  return len(base.kernel_shape)


class LoRALayer(nnx.Module):
  """A linear layer with a LoRA adapter: ``base(x) + s * ((dropout(x) @ A) * c) @ B``.

  ``base`` is an ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Einsum`` (with its ``einsum_str``
  set at construction); it is kept as it is, so its Variables (``nnx.Param``) stay frozen under
  ``wrt=nnx.LoRAParam``. The adapter leaves are ``nnx.LoRAParam``: ``lora_a``
  ``(*stack, n_in, r)``, ``lora_b`` ``(*stack, r, n_out)`` and, when ``config.gated``, ``lora_c``
  ``(*stack, r)`` — the layout of :mod:`lorapro_jax.adapters`, with the kernel's batch axes
  (``batch_axis``, einsum stack letters) in ``*stack``, after any axes that ``nnx.vmap`` stacked in
  front of ``base``'s kernel (the layers of a scanned model; ``nnx.scan`` slices both alike).

  Rank, scale (``alpha / r``, rsLoRA ``alpha / sqrt(r)``), dropout, gates and initialisation come
  from ``config`` for the layer's ``path`` (its rank / alpha patterns apply), as on the linen side.
  Dropout on the adapter input follows NNX's modes: active after ``model.train()``, off after
  ``model.eval()``, with the ``dropout`` stream of ``rngs``.

  >>> from flax import nnx
  >>> from lorapro_jax import LoRAConfig
  >>> layer = LoRALayer(nnx.Linear(5, 6, rngs=nnx.Rngs(0)), LoRAConfig(rank=2, alpha=4.0),
  ...                   rngs=nnx.Rngs(1))
  >>> layer.lora_a.shape, layer.lora_b.shape, layer.scale
  ((5, 2), (2, 6), 2.0)
  """

  def __init__(self, base: Any, config: LoRAConfig = LoRAConfig(), *, path: Path = (),
               rngs: nnx.Rngs):
    if not isinstance(base, LINEAR_TYPES) or isinstance(base, nnx.LoRALinear):
      raise TypeError(f"LoRALayer adapts an nnx.Linear, nnx.LinearGeneral or nnx.Einsum, got "
                      f"{type(base).__name__} at {dotted(path) or '<root>'}")
    layout = _layout(base, _example_shape(base))
    where = dotted(path) or "<root>"
    rank = config.rank_for(path)
    if rank > min(layout.n_in, layout.n_out):
      raise ValueError(f"LoRA rank {rank} at {where} exceeds min(n_in, n_out) = "
                       f"min({layout.n_in}, {layout.n_out})")
    kernel_shape = tuple(base.kernel.shape)
    stacked = kernel_shape[:len(kernel_shape) - _declared_kernel_ndim(base)]  # by nnx.vmap
    stack = stacked + layout.stack_shape
    init_a, init_b, init_c = adapter_initializers(config, layout.n_in, rank)
    dtype = config.param_dtype
    self.base = base
    self.scale = config.scale_for(path)
    self.lora_a = nnx.LoRAParam(init_a(rngs.params(), stack + (layout.n_in, rank), dtype))
    self.lora_b = nnx.LoRAParam(init_b(rngs.params(), stack + (rank, layout.n_out), dtype))
    self.lora_c = (nnx.LoRAParam(init_c(rngs.params(), stack + (rank,), dtype)) if config.gated
                   else nnx.data(None))
    self.dropout = config.dropout
    self.deterministic = False  # model.train() / model.eval() set it, as on nnx.Dropout
    # A stacked layer runs once per slice under nnx.scan, which slices the key of the stream too
    # (so nnx.Dropout, which forks its stream from one key, does not fit here).
    self.dropout_rng = (
        nnx.data(None) if config.dropout == 0.0
        else rngs["dropout"].split(stacked) if stacked else rngs["dropout"].fork())

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    y = self.base(x, *args, **kwargs)
    layout = _layout(self.base, x.shape, args, kwargs)
    if self.dropout > 0.0 and not self.deterministic:
      x = adapter_dropout(x, self.dropout, self.dropout_rng())
    compute = y.dtype
    a, b = self.lora_a[...].astype(compute), self.lora_b[...].astype(compute)
    c = None if self.lora_c is None else self.lora_c[...].astype(compute)
    return y + low_rank_update(x.astype(compute), a, b, c, self.scale, layout,
                               getattr(self.base, "precision", None))

  def merged(self) -> Any:
    """``base`` with its kernel replaced by ``K0 + s * A @ diag(c) @ B`` (float32, cast back)."""
    kernel = self.base.kernel
    delta = kernel_update(self.lora_a[...], self.lora_b[...],
                          None if self.lora_c is None else self.lora_c[...], self.scale)
    value = (kernel[...].astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)
    base = nnx.clone(self.base, variables=False)  # a new module; the old kernel stays untouched
    base.kernel = type(kernel)(value, **kernel.get_metadata())
    return base


def _no_unsupported_fields(config: LoRAConfig) -> None:
  for field, why in (("modules_to_save", "put those modules' Variables in the optimizer's wrt "
                      "filter instead"),
                     ("transposed_kernels", "NNX's linear layers store (n_in, n_out) kernels")):
    if getattr(config, field):
      raise ValueError(f"LoRAConfig.{field} = {getattr(config, field)} is not used for NNX "
                       f"models: {why}")


def inject(model: Any, config: LoRAConfig, *, rngs: nnx.Rngs) -> Any:
  """``model`` with a :class:`LoRALayer` around every linear layer that ``config`` targets.

  Linear layers are ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` (flax's
  ``nnx.LoRALinear`` already has an adapter and is left alone); their module paths (attribute
  names and list indices, e.g. ``layers.0.attn.q``) are matched against ``config.targets`` /
  ``exclude`` / ``rank_pattern`` / ``alpha_pattern`` exactly as the linen :func:`~lorapro_jax.
  inject.inject` matches its module paths, with the same errors for patterns that match nothing.
  The model's code is not edited. Returns a new model object; ``model`` is left as it was and
  shares its base Variables with the result (no copy). Parameter paths of the base weights gain a
  ``base`` level (``q.base.kernel``), as PEFT's ``base_layer``; the adapters sit at the layer's
  own path (``q.lora_a``), as on the linen side.
  """
  if not isinstance(config, LoRAConfig):
    raise TypeError(f"inject needs a LoRAConfig, got {type(config).__name__}")
  _no_unsupported_fields(config)
  adapted = [dotted(tuple(map(str, p))) for p, m in nnx.iter_modules(model)
             if isinstance(m, LoRALayer)]
  if adapted:
    raise ValueError(f"model already holds LoRALayers (at {', '.join(adapted)}): inject once")
  seen: list[tuple[Path, bool]] = []

  def adapt(path, node):
    if not isinstance(node, LINEAR_TYPES) or isinstance(node, nnx.LoRALinear):
      return node
    path = tuple(str(part) for part in path)
    hit = config.is_target(path)
    seen.append((path, hit))
    return LoRALayer(node, config, path=path, rngs=rngs) if hit else node

  out = nnx.recursive_map(adapt, model)
  check_matches(config, seen)
  return out


def merge(model: Any) -> Any:
  """``model`` with every :class:`LoRALayer` replaced by its base layer holding the merged kernel
  ``K0 + s * A @ diag(c) @ B``: the structure the model had before :func:`inject`, so its state
  loads into the original model class. ``model`` is left as it was."""
  return nnx.recursive_map(
      lambda path, node: node.merged() if isinstance(node, LoRALayer) else node, model)


def scales(model: Any) -> dict:
  """The scale ``s`` of every adapter of ``model``, as a nested dict mirroring the adapter nodes
  of ``nnx.state(model, nnx.LoRAParam)`` (the ``scale`` argument of LoRA-Pro and dynamic rank).

  :class:`LoRALayer` carries its ``s``; flax's ``nnx.LoRA`` (inside ``nnx.LoRALinear``) computes
  ``x @ A @ B``, so ``s = 1``. (qwix keeps ``alpha / rank`` in its rule, not in the model: pass
  that number.)
  """
  found = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, LoRALayer):
      found[tuple(map(str, path))] = module.scale
    elif isinstance(module, nnx.LoRA):
      found[tuple(map(str, path))] = 1.0
  if not found:
    raise ValueError(f"{type(model).__name__} holds no LoRALayer or nnx.LoRA module")
  return unflatten_dict(found)


def load_adapters(model: Any, tree: Any) -> None:
  """Writes the adapter arrays of ``tree`` (a plain nested dict as :func:`adapters` returns it,
  e.g. from :func:`~lorapro_jax.peft_format.import_peft`) into ``model``'s ``nnx.LoRAParam``
  Variables, in place and cast to their dtypes. Paths and shapes must agree exactly: any
  difference is a ValueError listing them, and nothing is written.

  The PEFT round trip: ``adapters, config = import_peft(directory, family=...)``, then
  ``model = inject(base, config, rngs=...)`` and ``load_adapters(model, adapters)``.
  """
  differences = layout_differences(tree, adapters(model), got_name="given adapters",
                                   expected_name="model's adapters", dtypes=False)
  if differences:
    raise ValueError("the adapters do not fit the model (nothing was loaded):\n  "
                     + "\n  ".join(differences))
  state = nnx.state(model, nnx.LoRAParam)

  def fill(target, given):  # the model's own keys (ints for list items), the given values
    return {key: fill(value, given[str(key)]) if isinstance(value, dict)
            else jnp.asarray(given[str(key)], value.dtype) for key, value in target.items()}

  nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state), tree))
  nnx.update(model, state)


def adapters(model: Any) -> dict:
  """The adapter leaves of ``model`` (its ``nnx.LoRAParam`` Variables) as a plain nested dict of
  arrays with string keys: the trainable tree of the linen side, for
  :func:`~lorapro_jax.dynamic_rank.shrink`, PEFT export and checkpoints of adapters alone."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))

  def strings(node):
    return {str(k): strings(v) for k, v in node.items()} if isinstance(node, dict) else node

  return strings(pure)

