"""Put LoRA adapters into any existing linen model.

:func:`inject` wraps a linen module (a Hugging Face Flax ``*Module`` included) so that, while it
runs, every targeted ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` / HF ``FlaxConv1D`` layer
adds ``s * ((dropout(x) @ A) * c) @ B`` to its output (:func:`lorapro_jax.lora.add_adapter`),
through ``nn.intercept_methods``: the model's code is not edited and its parameter tree keeps its
paths, with ``lora_a`` / ``lora_b`` (/ ``lora_c``) added next to each adapted ``kernel``.

Training pattern (gradients of the adapters only; the base is never differentiated and the merged
kernel ``K0 + s*A@B`` is never formed)::

  import jax, jax.numpy as jnp, flax.linen as nn, optax
  from lorapro_jax import LoRAConfig, inject, init_adapters
  from lorapro_jax.trees import combine, merge

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

  x, y = jnp.ones((8, 5)), jnp.zeros((8, 4))
  base = MLP().init(jax.random.key(0), x)["params"]        # or pretrained weights
  config = LoRAConfig(rank=2, alpha=4.0, targets=("hidden", "out"))
  model = inject(MLP(), config)
  trainable = init_adapters(model, base, jax.random.key(1), x)   # only lora_a / lora_b

  def loss(trainable, base, x, y):
    return jnp.mean((model.apply({"params": combine(base, trainable)}, x) - y) ** 2)

  opt = optax.adam(1e-2)
  state = opt.init(trainable)
  grads = jax.jit(jax.grad(loss))(trainable, base, x, y)
  updates, state = opt.update(grads, state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  merged = merge(combine(base, trainable), config)  # plain MLP params, loads into MLP()
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax.traverse_util import flatten_dict

from lorapro_jax.adapters import Path, dotted
from lorapro_jax.lora import (ALL_LINEAR, KernelLayout, LoRAConfig, LoRADense, LoRADenseGeneral,
                              LoRAEinsum, add_adapter, dense_general_layout, dense_layout,
                              einsum_layout, path_matches)
from lorapro_jax.trees import split

_LORA_LAYERS = (LoRADense, LoRADenseGeneral, LoRAEinsum)


def _is_conv1d(module: nn.Module) -> bool:
  """Hugging Face's GPT-2 ``FlaxConv1D``: a Dense whose kernel is stored ``(features, n_in)``."""
  return type(module).__name__ == "FlaxConv1D" and hasattr(module, "features")


def _layout(module: nn.Module, args: tuple, kwargs: dict) -> KernelLayout | None:
  """The layout of a linear layer about to run, or None for anything else."""
  if isinstance(module, _LORA_LAYERS) or not args:
    return None
  x = args[0]
  if isinstance(module, nn.Dense) or _is_conv1d(module):
    return dense_layout(x.shape, module.features)
  if isinstance(module, nn.DenseGeneral):
    return dense_general_layout(x.shape, module.features, module.axis, module.batch_dims)
  if isinstance(module, nn.Einsum):
    called = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    equation = nn.merge_param("einsum_str", module.einsum_str, called)
    return einsum_layout(equation, module.shape, x.ndim)
  return None


def _module_path(module: nn.Module) -> Path:
  return tuple(str(part) for part in module.path)


def _adapt(config: LoRAConfig, seen: list, next_fun, args, kwargs, context):
  """The interceptor: adds an adapter to each targeted linear layer, records every layer seen.

  A linear layer without a parent module is the root of its own ``apply`` inside the model, on
  params the model passes it (a tied output head: HF's ``lm_head.apply({"params": {"kernel":
  embedding.T}}, x)`` in GPT-2 and T5). Its params are not in the model's tree, so it can hold no
  adapter: it is neither adapted nor listed.
  """
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  module = context.module
  layout = _layout(module, args, kwargs)
  if layout is None or not isinstance(module.parent, nn.Module):
    return next_fun(*args, **kwargs)
  path = _module_path(module)
  adapted = config.is_target(path)
  seen.append((path, adapted))
  if not adapted:
    return next_fun(*args, **kwargs)
  if _is_conv1d(module) != config.is_transposed(path):
    raise ValueError(
        f"layer {dotted(path)} ({type(module).__name__}) "
        + ("stores its kernel (n_out, n_in): add it to LoRAConfig.transposed_kernels"
           if _is_conv1d(module) else
           "stores its kernel (n_in, n_out) but matches LoRAConfig.transposed_kernels"))
  y = next_fun(*args, **kwargs)
  return add_adapter(module, args[0], y, layout, config, getattr(module, "precision", None))


def check_matches(config: LoRAConfig, seen: list[tuple[Path, bool]]) -> None:
  """Every target / exclude / rank / alpha pattern must have matched some layer; ``seen`` lists
  ``(path, adapted)`` of every linear layer (shared by the linen and NNX injections)."""
  paths = list(dict.fromkeys(path for path, _ in seen))
  adapted = [path for path, hit in seen if hit]
  available = "\n  ".join(dotted(path) for path in paths) or "(none: no linear layer ran)"
  checks = [("targets", pattern, paths) for pattern in config.targets if pattern != ALL_LINEAR]
  checks += [("exclude", pattern, paths) for pattern in config.exclude]
  checks += [("rank_pattern", pattern, adapted) for pattern in config.rank_pattern]
  checks += [("alpha_pattern", pattern, adapted) for pattern in config.alpha_pattern]
  checks += [("transposed_kernels", pattern, paths) for pattern in config.transposed_kernels]
  for field, pattern, candidates in checks:
    if not any(path_matches(pattern, path) for path in candidates):
      raise ValueError(f"LoRAConfig.{field} entry {pattern!r} matches no "
                       f"{'adapted' if 'pattern' in field else 'linear'} layer; linear layer "
                       f"paths:\n  {available}")
  if not adapted:
    raise ValueError(f"LoRAConfig.targets {config.targets} adapt no layer; linear layer paths:"
                     f"\n  {available}")


class _Parent(nn.Module):
  """Runs ``module`` as its child in one shared scope: the same params and paths as ``module``
  alone, and every layer of the model has a parent module (see :func:`_adapt`)."""

  module: nn.Module

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    return self.module(*args, **kwargs)


class LoRAModel(nn.Module):
  """``module`` run with adapters on the layers ``lora`` targets; built by :func:`inject`.

  Shares ``module``'s scope, so its params are ``module``'s params plus the adapter leaves.
  """

  module: nn.Module
  lora: LoRAConfig

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    return self.run("__call__", *args, **kwargs)

  def run(self, method: str | Callable[..., Any], *args, **kwargs):
    """Runs ``module.<method>(*args, **kwargs)`` (a method name) or ``method(module, *args,
    **kwargs)`` (a function, flax's ``method=`` convention) with adapters:
    ``model.apply(v, lambda m, ids: m._get_encoder_module()(ids), ids, method="run")`` runs a
    Hugging Face T5's encoder alone (``encode`` belongs to the ``FlaxT5PreTrainedModel``
    wrapper, not to its linen module)."""
    if not callable(method):
      if not callable(getattr(type(self.module), method, None)):
        raise AttributeError(
            f"{type(self.module).__name__} has no method {method!r}; pass a method name of the "
            "linen module or a function fn(module, *args, **kwargs) (HF wrapper methods such as "
            "'encode' are not the module's)")
      method = getattr(type(self.module), method)
    seen: list = []
    with nn.intercept_methods(functools.partial(_adapt, self.lora, seen)):
      out = method(self.module, *args, **kwargs)
    check_matches(self.lora, seen)
    return out


def inject(module: nn.Module, config: LoRAConfig) -> LoRAModel:
  """A linen module that runs ``module`` unmodified, with LoRA on the layers ``config`` targets.

  For a Hugging Face Flax model pass its linen module: ``inject(hf_model.module, config)``.
  Targets that match no layer, ranks above ``min(n_in, n_out)`` and GPT-2 ``FlaxConv1D`` layers
  missing from ``config.transposed_kernels`` raise a ``ValueError`` on the first init/apply.
  """
  if not isinstance(config, LoRAConfig):
    raise TypeError(f"inject needs a LoRAConfig, got {type(config).__name__}")
  if not isinstance(module, nn.Module):
    raise TypeError(f"inject needs a linen Module (for HF models: model.module), got "
                    f"{type(module).__name__}")
  return LoRAModel(module, config)


def linear_layer_paths(module: nn.Module, *args, **kwargs) -> list[Path]:
  """Paths of the linear layers ``module`` runs on these example inputs (shapes only, no FLOPs);
  layers applied on params that are not the model's own (tied output heads) are not listed."""
  seen: list = []
  no_adapters = LoRAConfig(targets="re:(?!)")  # a regex that never matches: record only

  def init():
    with nn.intercept_methods(functools.partial(_adapt, no_adapters, seen)):
      return _Parent(module).init(jax.random.key(0), *args, **kwargs)

  jax.eval_shape(init)
  return list(dict.fromkeys(path for path, _ in seen))


def init_adapters(model: LoRAModel, base_params: Any, rng: jax.Array, *example_args,
                  **example_kwargs) -> dict:
  """The trainable tree (adapters, ``modules_to_save``) for a model with pretrained ``base_params``.

  One jitted call of ``model.apply`` on the example inputs with ``base_params`` given: flax
  creates only the params missing from ``base_params``, i.e. the adapter leaves (and heads under
  ``modules_to_save`` that the base lacks); only those leave the computation, so the base is
  neither re-initialised nor copied, and the forward pass itself is dead code. Any other missing
  base param is an error (wrong ``base_params`` for this model).
  """
  config = model.lora

  def create(base, key):
    _, state = model.apply({"params": base}, *example_args, rngs={"params": key},
                           mutable=["params"], **example_kwargs)
    created_base, trainable = split(state["params"], config)
    extra = set(flatten_dict(created_base)) - set(flatten_dict(base))
    if extra:
      raise ValueError(f"base_params has no entry {dotted(min(extra))!r} that the model creates: "
                       f"pass the params of this very model (or list the new head in "
                       f"LoRAConfig.modules_to_save)")
    return trainable

  return jax.jit(create)(base_params, rng)
