"""LoRA: the configuration, the one piece of adapter math, and drop-in linen layers.

LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) freezes a pretrained kernel ``K0`` of shape
``(n_in, n_out)`` and learns a low-rank update ``dK = s * A @ B`` with ``A: (n_in, r)``,
``B: (r, n_out)`` and scale ``s = alpha / r`` (rsLoRA, Kalajdzievski 2023: ``s = alpha / sqrt(r)``).
A layer then computes, without ever forming ``K0 + s * A @ B``::

  y = x @ K0 + s * ((dropout(x) @ A) * c) @ B

where the optional gates ``c`` (shape ``(r,)``, ``config.gated``) give the parametrisation
``dK = s * A @ diag(c) @ B`` used by dynamic rank (Mao et al., ACL 2024, arXiv 2405.17357; not the
weight-decomposed "DoRA" of Liu et al.). The adapter leaves ``lora_a`` ``(*stack, n_in, r)``,
``lora_b`` ``(*stack, r, n_out)`` and ``lora_c`` ``(*stack, r)`` live in the adapted layer's own
param dict next to ``kernel`` (the contract of :mod:`lorapro_jax.adapters`). Kernels with several
input or output axes (``nn.DenseGeneral``, ``nn.Einsum``) are seen as the matrix whose rows are
their input axes flattened in kernel order and whose columns are their output axes flattened in
kernel order; ``*stack`` are the kernel's batch axes (``DenseGeneral.batch_dims``, einsum letters
shared by input, kernel and output) plus any axes that ``nn.scan`` / ``nn.vmap`` stack in front.

Adapter dropout is active exactly when ``dropout > 0`` and the ``apply`` call is given a
``'dropout'`` rng (``rngs={'dropout': key}``); it is then deterministic given that key. Pass the
rng in training steps only, as for Hugging Face models' own dropout.

Example::

  import jax, jax.numpy as jnp
  from lorapro_jax.lora import LoRAConfig, LoRADense

  layer = LoRADense(features=6, lora=LoRAConfig(rank=2, alpha=4.0))
  x = jnp.ones((3, 5))
  params = layer.init(jax.random.key(0), x)["params"]   # kernel, bias, lora_a (5, 2), lora_b (2, 6)
  y = layer.apply({"params": params}, x)                # == x @ kernel + bias at init (B = 0)
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorapro_jax.adapters import DEFAULT_KEYS, Path, dotted, map_adapters

ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"
INITS = ("standard", "gaussian")
# "all-linear" leaves output heads alone, as PEFT does: a layer is a head when one of its path
# components is one of these names (HF Flax's LM, classification, QA and pre-training heads).
OUTPUT_HEADS = ("lm_head", "classifier", "score", "qa_outputs", "cls")
GATED_INIT_STDDEV = 0.02  # AdaLoRA / dynamic-rank reference: A, B ~ N(0, 0.02^2), c = 0


def path_matches(pattern: str, path: Path) -> bool:
  """PEFT-style match of one pattern against a module path.

  ``"re:<regex>"`` must match the whole dotted path (``re.fullmatch``); any other pattern is a
  suffix of the path at a component boundary, written with dots or slashes
  (``"attention.output.dense"`` matches ``encoder.layer.0.attention.output.dense``).
  """
  name = dotted(path)
  if pattern.startswith(REGEX_PREFIX):
    return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
  suffix = pattern.replace("/", ".")
  return name == suffix or name.endswith("." + suffix)


def _first_match(patterns: Mapping[str, Any], path: Path) -> Any:
  for pattern, value in patterns.items():
    if path_matches(pattern, path):
      return value
  return None


def _as_patterns(value: Any, field: str) -> tuple[str, ...]:
  patterns = (value,) if isinstance(value, str) else tuple(value)
  for pattern in patterns:
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"LoRAConfig.{field} entries must be non-empty strings, got {pattern!r}")
    if pattern.startswith(REGEX_PREFIX):
      try:
        re.compile(pattern[len(REGEX_PREFIX):])
      except re.error as error:
        raise ValueError(f"LoRAConfig.{field}: bad regex {pattern!r}: {error}") from None
  return patterns


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """What to adapt and how.

  Attributes:
    rank: adapter rank ``r`` (> 0, at most ``min(n_in, n_out)`` of each adapted kernel).
    alpha: scale numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``rslora``).
    rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    dropout: adapter dropout rate on the layer input, in ``[0, 1)``.
    targets: which linear layers to adapt: PEFT-style path suffixes (``"query"``,
      ``"attention.output.dense"``, dots or slashes), ``"re:<regex>"`` over the dotted path, or
      ``"all-linear"`` (every Dense / DenseGeneral / Einsum / HF FlaxConv1D except output heads, see
      ``OUTPUT_HEADS``). Every entry must match at least one layer.
    exclude: patterns (same syntax) of layers never to adapt.
    rank_pattern / alpha_pattern: ``{pattern: rank}`` / ``{pattern: alpha}`` overrides per layer;
      the first matching pattern wins (PEFT's rule).
    gated: add gates ``lora_c`` (``dK = s * A diag(c) B``, the dynamic-rank parametrisation).
    init: ``"standard"``: A Kaiming-uniform (bound ``1/sqrt(n_in)``, PEFT's default), B = 0; when
      gated, A and B ~ N(0, 0.02^2) and c = 0. ``"gaussian"``: A ~ N(0, 1/r^2), B as in standard.
    param_dtype: dtype of the adapter leaves.
    modules_to_save: patterns of param subtrees trained in full (e.g. ``"classifier"``).
    transposed_kernels: patterns of layers that store their kernel as ``(n_out, n_in)`` (Hugging
      Face's ``FlaxConv1D`` in GPT-2); :func:`lorapro_jax.trees.merge` needs this to fold the
      update in, so injecting into such a layer without listing it is an error.
  """

  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  targets: str | Sequence[str] = ALL_LINEAR
  exclude: str | Sequence[str] = ()
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  gated: bool = False
  init: str = "standard"
  param_dtype: Any = jnp.float32
  modules_to_save: str | Sequence[str] = ()
  transposed_kernels: str | Sequence[str] = ()

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
    _check_rank(self.rank, "rank")
    _check_alpha(self.alpha, "alpha")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
    if self.init not in INITS:
      raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
    targets = _as_patterns(self.targets, "targets")
    if not targets:
      raise ValueError("LoRAConfig.targets is empty: name at least one layer or 'all-linear'")
    set_("targets", targets)
    for name in ("exclude", "modules_to_save", "transposed_kernels"):
      set_(name, _as_patterns(getattr(self, name), name))
    set_("rank_pattern", dict(self.rank_pattern))
    set_("alpha_pattern", dict(self.alpha_pattern))
    _as_patterns(tuple(self.rank_pattern) + tuple(self.alpha_pattern), "rank/alpha_pattern")
    for pattern, rank in self.rank_pattern.items():
      _check_rank(rank, f"rank_pattern[{pattern!r}]")
    for pattern, alpha in self.alpha_pattern.items():
      _check_alpha(alpha, f"alpha_pattern[{pattern!r}]")
    set_("alpha", float(self.alpha))
    set_("dropout", float(self.dropout))
    set_("param_dtype", jnp.dtype(self.param_dtype))

  def __hash__(self):
    return hash(json.dumps(self.to_dict(), sort_keys=True))

  def is_target(self, path: Path) -> bool:
    """Whether the linear layer at ``path`` gets an adapter."""
    if any(path_matches(pattern, path) for pattern in self.exclude):
      return False
    return any(_target_matches(pattern, path) for pattern in self.targets)

  def is_transposed(self, path: Path) -> bool:
    """Whether the layer at ``path`` stores its kernel as ``(n_out, n_in)``."""
    return any(path_matches(pattern, path) for pattern in self.transposed_kernels)

  def rank_for(self, path: Path) -> int:
    found = _first_match(self.rank_pattern, path)
    return self.rank if found is None else int(found)

  def alpha_for(self, path: Path) -> float:
    found = _first_match(self.alpha_pattern, path)
    return self.alpha if found is None else float(found)

  def scale_for(self, path: Path) -> float:
    """``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) of the layer at ``path``."""
    rank = self.rank_for(path)
    return self.alpha_for(path) / (math.sqrt(rank) if self.rslora else rank)

  def scales(self, trainable: Any) -> dict:
    """A nested dict mirroring the adapter nodes of ``trainable``, each node replaced by its ``s``.

    This is the ``scale`` argument of LoRA-Pro and dynamic rank (see
    :func:`lorapro_jax.adapters.scale_at`).
    """
    tree: dict = {}

    def put(path, node):
      branch = tree
      for key in path[:-1]:
        branch = branch.setdefault(key, {})
      branch[path[-1]] = self.scale_for(path)

    map_adapters(put, trainable)
    return tree

  def to_dict(self) -> dict:
    """JSON-serialisable metadata (``from_dict`` inverts it)."""
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, tuple):
        value = list(value)
      elif field.name == "param_dtype":
        value = value.name
      out[field.name] = value
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
    return cls(**data)


def _target_matches(pattern: str, path: Path) -> bool:
  if pattern == ALL_LINEAR:
    return not any(part in OUTPUT_HEADS for part in path)
  return path_matches(pattern, path)


def _check_rank(rank: Any, what: str) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"LoRAConfig.{what} must be a positive integer, got {rank!r}")


def _check_alpha(alpha: Any, what: str) -> None:
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"LoRAConfig.{what} must be a number > 0, got {alpha!r}")


# ------------------------------------------------------------------------------------ layouts


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """A linear layer as ``y = einsum(f"{x},{stack}{inputs}{outputs}->{y}", x, kernel)``.

  Letters name axes (no ellipsis): ``stack`` / ``inputs`` / ``outputs`` are the kernel's axes of
  each kind in kernel order, every other letter of ``x`` is a free (batch) axis carried to ``y``.
  ``stack_shape`` / ``in_shape`` / ``out_shape`` are their sizes; ``n_in = prod(in_shape)``.
  """

  x: str
  y: str
  stack: str
  inputs: str
  outputs: str
  stack_shape: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def n_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def n_out(self) -> int:
    return math.prod(self.out_shape)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def dense_layout(x_shape: Sequence[int], features: int) -> KernelLayout:
  """``nn.Dense`` (and HF ``FlaxConv1D``): contracts the last input axis."""
  free = _LETTERS[:len(x_shape) - 1]
  return KernelLayout(free + "I", free + "O", "", "I", "O", (), (x_shape[-1],), (features,))


def dense_general_layout(x_shape: Sequence[int], features: int | Sequence[int],
                         axis: int | Sequence[int], batch_dims: Sequence[int]) -> KernelLayout:
  """``nn.DenseGeneral``: kernel ``batch_shape + in_shape + features``, flax's output order."""
  ndim = len(x_shape)
  def norm(axes):
    return tuple(a % ndim for a in ((axes,) if isinstance(axes, int) else axes))

  axis, batch_dims = norm(axis), norm(batch_dims)
  features = (features,) if isinstance(features, int) else tuple(features)
  x = _LETTERS[:ndim]
  outputs = _LETTERS[ndim:ndim + len(features)]
  stack = "".join(x[a] for a in batch_dims)
  inputs = "".join(x[a] for a in axis)
  free = "".join(ch for ch in x if ch not in stack + inputs)
  return KernelLayout(x, stack + free + outputs, stack, inputs, outputs,
                      tuple(x_shape[a] for a in batch_dims), tuple(x_shape[a] for a in axis),
                      features)


def einsum_layout(equation: str, kernel_shape: Sequence[int], x_ndim: int) -> KernelLayout:
  """``nn.Einsum``: input letters are contracted, output letters only in kernel and result, stack
  letters in all three. The kernel's axes must be ordered stack, inputs, outputs (so that
  ``merge`` can fold the update back in); other orders are rejected."""
  equation = equation.replace(" ", "")
  try:
    operands, y = equation.split("->")
    x, kernel = operands.split(",")
  except ValueError:
    raise ValueError(f"einsum equation must read 'x,kernel->y', got {equation!r}") from None
  if "." in kernel:
    raise ValueError(f"LoRA needs the einsum kernel without an ellipsis, got {equation!r}")
  if "..." in x:  # name the ellipsis axes with unused letters
    spare = "".join(ch for ch in _LETTERS if ch not in equation)
    named = spare[:x_ndim - len(x) + 3]
    x, y = x.replace("...", named), y.replace("...", named)
  stack = "".join(ch for ch in kernel if ch in x and ch in y)
  inputs = "".join(ch for ch in kernel if ch in x and ch not in y)
  outputs = "".join(ch for ch in kernel if ch not in x and ch in y)
  if kernel != stack + inputs + outputs:
    raise ValueError(
        f"LoRA needs einsum kernel axes ordered (stack..., inputs..., outputs...) = "
        f"{stack + inputs + outputs!r}, got {kernel!r} in {equation!r}")
  summed = [ch for ch in x if ch not in kernel and ch not in y]
  if summed:
    raise ValueError(f"LoRA does not support einsum {equation!r}: input axes {summed} are summed "
                     f"without the kernel")
  size = dict(zip(kernel, kernel_shape))
  return KernelLayout(x, y, stack, inputs, outputs, tuple(size[ch] for ch in stack),
                      tuple(size[ch] for ch in inputs), tuple(size[ch] for ch in outputs))


# ---------------------------------------------------------------------------- adapter math


def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, c: jax.Array | None,
                    scale: float, layout: KernelLayout, precision: Any = None) -> jax.Array:
  """``s * ((x @ A) * c) @ B`` for a layer of any layout; never forms the ``n_in x n_out`` update.

  ``a``: ``(*stack_shape, n_in, r)``, ``b``: ``(*stack_shape, r, n_out)``, ``c``:
  ``(*stack_shape, r)`` or None; the result has the layer's output shape. ``x`` is brought to
  ``(*stack, free, n_in)`` first: two plain (batched) matmuls run faster on XLA:CPU than
  dot_generals over several free axes (measured: about 30% less time for a 3-D input).
  """
  free = "".join(ch for ch in layout.x if ch not in layout.stack + layout.inputs)
  order = layout.stack + free + layout.inputs
  x = jnp.transpose(x, [layout.x.index(ch) for ch in order]) if order != layout.x else x
  sizes = dict(zip(order, x.shape))
  free_shape = tuple(sizes[ch] for ch in free)
  x = x.reshape(layout.stack_shape + (math.prod(free_shape), layout.n_in))
  h = jnp.matmul(x, a, precision=precision)
  if c is not None:
    h = h * c[..., None, :]
  y = jnp.matmul(h, b, precision=precision)
  y = y.reshape(layout.stack_shape + free_shape + layout.out_shape)
  have = layout.stack + free + layout.outputs
  y = jnp.transpose(y, [have.index(ch) for ch in layout.y]) if have != layout.y else y
  return scale * y


def kernel_update(a: jax.Array, b: jax.Array, c: jax.Array | None, scale: float) -> jax.Array:
  """The dense update ``s * A @ diag(c) @ B`` of shape ``(*stack, n_in, n_out)``, in float32.

  Only for merging into a kernel outside training: a training step uses
  :func:`low_rank_update`.
  """
  a = a.astype(jnp.float32)
  if c is not None:
    a = a * c.astype(jnp.float32)[..., None, :]
  return scale * jnp.matmul(a, b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def adapter_dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Inverted dropout on the adapter input (kept entries scaled by ``1/(1-rate)``)."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def adapter_initializers(config: LoRAConfig, n_in: int, rank: int):
  """``(init_a, init_b, init_c)`` of ``config.init`` / ``config.gated`` (shared by the linen and
  NNX adapters, see :mod:`lorapro_jax.nnx`)."""
  normal = lambda std: jax.nn.initializers.normal(stddev=std)  # noqa: E731
  if config.init == "gaussian":
    init_a = normal(1.0 / rank)
  elif config.gated:
    init_a = normal(GATED_INIT_STDDEV)
  else:
    bound = 1.0 / math.sqrt(n_in)

    def init_a(key, shape, dtype):
      return jax.random.uniform(key, shape, dtype, -bound, bound)
  init_b = normal(GATED_INIT_STDDEV) if config.gated else jax.nn.initializers.zeros
  return init_a, init_b, jax.nn.initializers.zeros


def add_adapter(module: nn.Module, x: jax.Array, y: jax.Array, layout: KernelLayout,
                config: LoRAConfig, precision: Any = None) -> jax.Array:
  """``y + s * ((dropout(x) @ A) * c) @ B`` with the adapter leaves created in ``module``'s params.

  Called from inside the (compact) call of the adapted layer, so ``lora_a`` / ``lora_b`` /
  ``lora_c`` land next to its ``kernel``. The rank, scale and dropout come from ``config`` for the
  layer's path.
  """
  path = tuple(str(p) for p in module.path)
  rank = config.rank_for(path)
  if rank > min(layout.n_in, layout.n_out):
    raise ValueError(
        f"LoRA rank {rank} at {dotted(path) or '<root>'} exceeds min(n_in, n_out) = "
        f"min({layout.n_in}, {layout.n_out})")
  init_a, init_b, init_c = adapter_initializers(config, layout.n_in, rank)
  stack = layout.stack_shape
  dtype = config.param_dtype
  a = module.param(DEFAULT_KEYS.a, init_a, stack + (layout.n_in, rank), dtype)
  b = module.param(DEFAULT_KEYS.b, init_b, stack + (rank, layout.n_out), dtype)
  c = module.param(DEFAULT_KEYS.c, init_c, stack + (rank,), dtype) if config.gated else None
  if config.dropout > 0.0 and module.has_rng("dropout"):
    x = adapter_dropout(x, config.dropout, module.make_rng("dropout"))
  compute = y.dtype
  x, a, b = x.astype(compute), a.astype(compute), b.astype(compute)
  c = None if c is None else c.astype(compute)
  return y + low_rank_update(x, a, b, c, config.scale_for(path), layout, precision)


# ----------------------------------------------------------------------------- linen layers


class LoRADense(nn.Dense):
  """``nn.Dense`` plus a LoRA adapter (``lora`` gives rank, alpha, dropout, gates, init)."""

  lora: LoRAConfig = LoRAConfig()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = super().__call__(inputs)
    return add_adapter(self, inputs, y, dense_layout(inputs.shape, self.features), self.lora,
                       self.precision)


class LoRADenseGeneral(nn.DenseGeneral):
  """``nn.DenseGeneral`` plus a LoRA adapter; ``batch_dims`` become the adapter's stack axes."""

  lora: LoRAConfig = LoRAConfig()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = super().__call__(inputs)
    layout = dense_general_layout(inputs.shape, self.features, self.axis, self.batch_dims)
    return add_adapter(self, inputs, y, layout, self.lora, self.precision)


class LoRAEinsum(nn.Einsum):
  """``nn.Einsum`` plus a LoRA adapter; kernel letters shared with input and output are stack
  axes, the others input (contracted) or output axes (see :func:`einsum_layout`)."""

  lora: LoRAConfig = LoRAConfig()

  @nn.compact
  def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
    equation = nn.merge_param("einsum_str", self.einsum_str, einsum_str)
    y = super().__call__(inputs, einsum_str)
    return add_adapter(self, inputs, y, einsum_layout(equation, self.shape, inputs.ndim),
                       self.lora, self.precision)
