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
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
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
# PEFT's ``LoraConfig`` names of our fields (``rank_pattern``, ``alpha_pattern`` and
# ``modules_to_save`` are spelled alike). The constructor takes either name and keeps ours.
PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
              "use_rslora": "rslora", "target_modules": "targets"}
# PEFT's defaults for the fields an adapter_config.json may omit (PEFT's lora_alpha is 8, ours 16).
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}
PEFT_INITS = {True: "standard", "gaussian": "gaussian"}  # init_lora_weights -> LoRAConfig.init


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
  if isinstance(value, str):
    patterns = (value,)
  elif isinstance(value, (set, frozenset)):  # PEFT keeps target_modules as a set
    patterns = tuple(sorted(value, key=str))
  elif isinstance(value, Sequence):
    patterns = tuple(value)
  else:
    raise ValueError(f"LoRAConfig.{field} must be a pattern string or a sequence of them, got "
                     f"{value!r}")
  for pattern in patterns:
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"LoRAConfig.{field} entries must be non-empty strings, got {pattern!r}")
    if pattern == ALL_LINEAR and field != "targets":
      raise ValueError(f"LoRAConfig.{field}: {ALL_LINEAR!r} is a value of targets only; name "
                       "the layers")
    if pattern.startswith(REGEX_PREFIX):
      try:
        re.compile(pattern[len(REGEX_PREFIX):])
      except re.error as error:
        raise ValueError(f"LoRAConfig.{field}: bad regex {pattern!r}: {error}") from None
  return patterns


def _as_mapping(value: Any, field: str) -> dict:
  if not isinstance(value, Mapping):
    raise ValueError(f"LoRAConfig.{field} must be a mapping {{pattern: value}}, got {value!r}")
  _as_patterns(tuple(value), field)
  return dict(value)


def _our_names(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """``kwargs`` with PEFT's names (``PEFT_NAMES``) replaced by ours; a PEFT ``target_modules``
  string is a regex over the whole module name, as in PEFT (``"all-linear"`` excepted)."""
  out = dict(kwargs)
  for peft_name, name in PEFT_NAMES.items():
    if peft_name not in out:
      continue
    if name in out:
      raise TypeError(f"LoRAConfig got both {name}={out[name]!r} and PEFT's "
                      f"{peft_name}={out[peft_name]!r}: they are one setting, give one")
    value = out.pop(peft_name)
    if peft_name == "target_modules" and isinstance(value, str) and value != ALL_LINEAR:
      value = REGEX_PREFIX + value
    out[name] = value
  return out


@dataclasses.dataclass(frozen=True, init=False)
class LoRAConfig:
  """What to adapt and how.

  Keyword arguments only: the fields below, or PEFT's names for five of them (``PEFT_NAMES``:
  ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``target_modules``, where, as in
  PEFT, one ``target_modules`` string is a regex over the whole dotted path). The config keeps
  our names only, so ``LoRAConfig(r=8, lora_alpha=16)`` equals ``LoRAConfig(rank=8, alpha=16)``;
  both spellings of one field at once raise. :meth:`from_peft` reads a PEFT
  ``adapter_config.json``.

  >>> LoRAConfig(r=4, lora_alpha=8, target_modules="query|value").targets
  ('re:query|value',)
  >>> LoRAConfig(r=4, lora_alpha=8) == LoRAConfig(rank=4, alpha=8.0)
  True

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
    param_dtype: floating dtype of the adapter leaves.
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

  def __init__(self, **kwargs: Any):
    kwargs = _our_names(kwargs)
    fields = dataclasses.fields(self)
    unknown = sorted(set(kwargs) - {field.name for field in fields})
    if unknown:
      raise TypeError(f"LoRAConfig got unknown keyword(s) {unknown}; expected "
                      f"{[field.name for field in fields]} or PEFT's {list(PEFT_NAMES)}")
    for field in fields:
      if field.name in kwargs:
        value = kwargs[field.name]
      elif field.default is not dataclasses.MISSING:
        value = field.default
      else:
        value = field.default_factory()
      object.__setattr__(self, field.name, value)  # frozen: the one way to set a field
    self._check_and_normalise()

  def _check_and_normalise(self) -> None:
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
    set_("rank", _check_rank(self.rank, "rank"))
    set_("alpha", _check_alpha(self.alpha, "alpha"))
    for name in ("rslora", "gated"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"LoRAConfig.{name} must be True or False, got {getattr(self, name)!r}")
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real)
        or not 0.0 <= self.dropout < 1.0):
      raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
    set_("dropout", float(self.dropout))
    if self.init not in INITS:
      raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
    targets = _as_patterns(self.targets, "targets")
    if not targets:
      raise ValueError("LoRAConfig.targets is empty: name at least one layer or 'all-linear'")
    set_("targets", targets)
    for name in ("exclude", "modules_to_save", "transposed_kernels"):
      set_(name, _as_patterns(getattr(self, name), name))
    set_("rank_pattern", {pattern: _check_rank(rank, f"rank_pattern[{pattern!r}]")
                          for pattern, rank in _as_mapping(self.rank_pattern,
                                                           "rank_pattern").items()})
    set_("alpha_pattern", {pattern: _check_alpha(alpha, f"alpha_pattern[{pattern!r}]")
                           for pattern, alpha in _as_mapping(self.alpha_pattern,
                                                             "alpha_pattern").items()})
    try:
      dtype = jnp.dtype(self.param_dtype)
    except TypeError:
      dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"LoRAConfig.param_dtype must be a floating dtype (float32, bfloat16, "
                       f"...), got {self.param_dtype!r}")
    set_("param_dtype", dtype)

  def __hash__(self):
    return hash(json.dumps(self.to_dict(), sort_keys=True))

  def is_target(self, path: Path) -> bool:
    """Whether the linear layer at ``path`` gets an adapter: targeted, not excluded, and not
    inside a ``modules_to_save`` subtree (trained in full; PEFT's rule too)."""
    if any(path_matches(pattern, path) for pattern in self.exclude):
      return False
    if any(path_matches(pattern, path[:end]) for pattern in self.modules_to_save
           for end in range(1, len(path) + 1)):
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

  @classmethod
  def from_peft(cls, source: str | os.PathLike | Mapping[str, Any], *, prefix: str = "",
                **overrides: Any) -> LoRAConfig:
    r"""The config of a PEFT LoRA adapter: its ``adapter_config.json`` (the file or the adapter
    directory) or a dict of PEFT's ``LoraConfig`` fields (``peft_config.to_dict()``).

    ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``target_modules`` and
    ``modules_to_save`` map to our fields (PEFT's defaults for those left out: ``r`` 8,
    ``lora_alpha`` 8); ``exclude_modules`` to ``exclude``; ``fan_in_fan_out`` lists the targets
    in ``transposed_kernels``; ``init_lora_weights`` ``True`` / ``"gaussian"`` to ``init``.
    PEFT matches the module names of the PyTorch model, we match Flax paths from the tree's root:
    names lose ``prefix`` (as in :func:`lorapro_jax.peft_format.import_peft`), and one
    ``target_modules`` string is a regex over the whole path. ``rank_pattern`` / ``alpha_pattern``
    keys keep PEFT's rule (a regex matching the end of the name at a component boundary): a plain
    dotted name stays a suffix pattern, any other key becomes ``"re:(?:.*\.)?(?:<key>)"``.
    ``overrides`` (our names or PEFT's) replace fields, e.g. ``gated=True``. What we cannot
    honour raises: ``use_dora``, ``bias`` other than ``"none"``, ``layers_to_transform``,
    another ``init_lora_weights``, ``target_modules`` left to PEFT's per-model defaults.

    >>> config = LoRAConfig.from_peft({"r": 16, "target_modules": ["q_proj", "v_proj"],
    ...                                "rank_pattern": {"layers.0.self_attn.q_proj": 4,
    ...                                                 "k_proj|v_proj": 2}})
    >>> config.rank, config.alpha, config.targets
    (16, 8.0, ('q_proj', 'v_proj'))
    >>> config.rank_pattern
    {'layers.0.self_attn.q_proj': 4, 're:(?:.*\\.)?(?:k_proj|v_proj)': 2}
    >>> config.rank_for(("model", "layers", "0", "self_attn", "q_proj"))
    4
    """
    from lorapro_jax import peft_format  # it builds on this module
    if isinstance(source, Mapping):
      peft = {"peft_type": "LORA", **source}
      peft_format.check_peft_config(peft, where="PEFT config")
    elif isinstance(source, (str, os.PathLike)):
      peft = peft_format.read_peft_config(source)
    else:
      raise TypeError(f"LoRAConfig.from_peft reads a path (adapter_config.json or its directory) "
                      f"or a dict of PEFT LoraConfig fields, got {type(source).__name__}")
    peft = {**PEFT_DEFAULTS, **peft}

    def strip(name: Any) -> Any:
      return name[len(prefix):] if isinstance(name, str) and name.startswith(prefix) else name

    def patterns(names: Any) -> Any:
      if names is None or names == ALL_LINEAR:
        return names
      if isinstance(names, str):  # PEFT: one string is a regex over the whole module name
        return REGEX_PREFIX + names
      return tuple(map(strip, sorted(names) if isinstance(names, (set, frozenset)) else names))

    overrides = _our_names(overrides)
    init = peft.get("init_lora_weights", True)
    if init not in PEFT_INITS:
      raise ValueError(f"PEFT config: init_lora_weights={init!r} is not supported (expected one "
                       f"of {list(PEFT_INITS)})")
    mapped = {
        "rank": peft["r"], "alpha": peft["lora_alpha"], "dropout": peft["lora_dropout"],
        "rslora": peft["use_rslora"], "init": PEFT_INITS[init],
        "targets": patterns(peft.get("target_modules")),
        "exclude": patterns(peft.get("exclude_modules")) or (),
        "modules_to_save": patterns(peft.get("modules_to_save")) or (),
        "rank_pattern": {_peft_pattern(key, strip): value
                         for key, value in (peft.get("rank_pattern") or {}).items()},
        "alpha_pattern": {_peft_pattern(key, strip): value
                          for key, value in (peft.get("alpha_pattern") or {}).items()}}
    if mapped["targets"] is None and "targets" not in overrides:
      raise ValueError("PEFT config: target_modules is null (PEFT then picks defaults by model "
                       "type): name the modules or 'all-linear' (or pass targets=)")
    if peft.get("fan_in_fan_out") and "transposed_kernels" not in overrides:
      if ALL_LINEAR in _as_patterns(mapped["targets"], "targets"):
        raise ValueError("PEFT config: fan_in_fan_out with target_modules 'all-linear': name the "
                         "layers that store (n_out, n_in) kernels with transposed_kernels=")
      mapped["transposed_kernels"] = mapped["targets"]
    return cls(**{**mapped, **overrides})


def _peft_pattern(key: str, strip: Callable[[str], str]) -> str:
  r"""A PEFT ``rank_pattern`` / ``alpha_pattern`` key as our pattern. PEFT matches the regex
  ``(.*\.)?(key)$`` against the module name; for a plain dotted name (dots meaning dots, as in
  module names) that is our suffix rule."""
  if re.fullmatch(r"[\w.]+", key):
    return strip(key)
  return f"{REGEX_PREFIX}(?:.*\\.)?(?:{key})"


def _target_matches(pattern: str, path: Path) -> bool:
  if pattern == ALL_LINEAR:
    return not any(part in OUTPUT_HEADS for part in path)
  return path_matches(pattern, path)


def _check_rank(rank: Any, what: str) -> int:
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
    raise ValueError(f"LoRAConfig.{what} must be a positive integer, got {rank!r}")
  return int(rank)


def _check_alpha(alpha: Any, what: str) -> float:
  if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
    raise ValueError(f"LoRAConfig.{what} must be a finite number > 0, got {alpha!r}")
  return float(alpha)


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
