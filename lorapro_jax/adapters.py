"""The adapter pytree contract: where LoRA pairs live and how every algorithm finds them.

An *adapter node* is any mapping (dict or FrozenDict) that holds both ``keys.a`` and ``keys.b``
(by default ``lora_a`` of shape ``(*stack, n_in, r)`` and ``lora_b`` of shape
``(*stack, r, n_out)``), and optionally ``keys.c`` (``lora_c``, shape ``(*stack, r)``, the gates of
the DoRA parametrisation ``dK = s * A @ diag(c) @ B``). Other entries of the node (a frozen
``kernel``, a ``bias``) are left alone by the walkers here. Everything else in a tree is an ordinary
leaf. LoRA-Pro, dynamic rank, checkpoints and export all walk trees through this module, so they
work on any pytree that follows the contract, not only on ours.

A *path* is the tuple of dict keys from the root to an adapter node, e.g.
``("encoder", "layer", "0", "attention", "self", "query")``.

A *scale* argument is either one number for every pair, or a nested mapping that mirrors the
adapter tree down to each adapter node, with the node replaced by its number ``s``
(``LoRAConfig.scales`` builds it from rank_pattern / alpha_pattern / rsLoRA).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]


class AdapterKeys(NamedTuple):
  """Key names of the factors inside an adapter node (configurable for foreign trees)."""

  a: str = "lora_a"
  b: str = "lora_b"
  c: str = "lora_c"


DEFAULT_KEYS = AdapterKeys()


def is_adapter(node: Any, keys: AdapterKeys = DEFAULT_KEYS) -> bool:
  """True for a mapping that holds a LoRA pair."""
  return isinstance(node, Mapping) and keys.a in node and keys.b in node


def dotted(path: Path) -> str:
  """The one string form of a path: ``("encoder", "layer", "0", "query")`` ->
  ``"encoder.layer.0.query"`` (PEFT's module names, error messages, ``rank_pattern`` keys).

  >>> dotted(("encoder", "layer", "0", "query"))
  'encoder.layer.0.query'
  """
  return ".".join(path)


def rebuild(node: Mapping, items: dict) -> Mapping:
  """A mapping of the same type as ``node`` (dict, FrozenDict, ...) holding ``items``.

  >>> from flax.core import FrozenDict
  >>> type(rebuild(FrozenDict(a=1), {"a": 2})).__name__
  'FrozenDict'
  """
  return items if type(node) is dict else type(node)(items)


def check_pair(a: Any, b: Any, c: Any = None, *, where: str,
               keys: AdapterKeys = DEFAULT_KEYS) -> None:
  """Raises a ValueError naming ``where`` and the shapes unless ``a``, ``b`` (and ``c``) are one
  adapter: ``a`` ``(*stack, n_in, r)``, ``b`` ``(*stack, r, n_out)``, ``c`` ``(*stack, r)``.

  Takes arrays, ``jax.ShapeDtypeStruct``s or anything with a ``shape``; returns nothing.

  >>> import numpy as np
  >>> check_pair(np.zeros((4, 2)), np.zeros((2, 3)), where="layer")
  >>> check_pair(np.zeros((4, 2)), np.zeros((3, 3)), where="layer")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: layer: expected lora_a (*stack, n_in, r) and lora_b ..., got shapes (4, 2) and (3, 3)
  """
  a_shape, b_shape = tuple(a.shape), tuple(b.shape)
  if (len(a_shape) < 2 or len(b_shape) != len(a_shape) or a_shape[:-2] != b_shape[:-2]
      or a_shape[-1] != b_shape[-2]):
    raise ValueError(f"{where}: expected {keys.a} (*stack, n_in, r) and {keys.b} "
                     f"(*stack, r, n_out), got shapes {a_shape} and {b_shape}")
  if c is not None and tuple(c.shape) != a_shape[:-2] + a_shape[-1:]:
    raise ValueError(f"{where}: expected {keys.c} of shape (*stack, r) = "
                     f"{a_shape[:-2] + a_shape[-1:]}, got {tuple(c.shape)}")


def map_adapters(
    fn: Callable[..., Any],
    tree: Any,
    *rest: Any,
    keys: AdapterKeys = DEFAULT_KEYS,
    other: Callable[..., Any] | None = None,
) -> Any:
  """Maps ``fn(path, node, *rest_nodes)`` over the adapter nodes of ``tree``.

  ``rest`` are trees with the same dict structure as ``tree`` (gradients, optimizer moments, ...);
  their nodes at the same path are passed alongside. Anything that is not an adapter node and not
  a mapping is a leaf, handed to ``other(path, leaf, *rest_leaves)`` (default: returned as it is).
  The result has the structure and mapping types of ``tree``.
  """

  def walk(path: Path, node: Any, *others: Any) -> Any:
    if is_adapter(node, keys):
      return fn(path, node, *others)
    if isinstance(node, Mapping):
      return rebuild(node, {k: walk(path + (str(k),), v, *(o[k] for o in others))
                             for k, v in _entries(node)})
    return node if other is None else other(path, node, *others)

  return walk((), tree, *rest)


def adapter_paths(tree: Any, keys: AdapterKeys = DEFAULT_KEYS) -> list[Path]:
  """Paths of all adapter nodes, in the tree's (insertion) order."""
  paths: list[Path] = []
  map_adapters(lambda path, node: paths.append(path), tree, keys=keys)
  return paths


def _entries(node: Mapping):
  """``node``'s entries as jax flattens them. (An ``nnx.State`` hands out its nested dicts wrapped
  in new States; rebuilt from those, a tree would hold States where jax sees dicts, and optax's
  tree maps over params and updates would fail: read its ``raw_mapping``.)"""
  return getattr(node, "raw_mapping", node).items()


def get_path(tree: Any, path: Path) -> Any:
  """The node of ``tree`` at ``path``, with an error naming the missing key.

  Path entries are strings; a mapping keyed by ints (an ``nnx.State`` over an ``nnx.List`` of
  layers) is looked up by the key's string form.
  """
  node = tree
  for depth, key in enumerate(path):
    found = [] if not isinstance(node, Mapping) else (
        [key] if key in node else [k for k in node if str(k) == key])
    if not found:
      raise KeyError(f"no entry {key!r} at {dotted(path[:depth]) or '<root>'} "
                     f"(looking up {dotted(path)})")
    node = node[found[0]]
  return node


def scale_at(scale: Any, path: Path) -> Any:
  """The scale ``s`` of the pair at ``path``: ``scale`` itself if a number, else looked up."""
  if isinstance(scale, Mapping):
    found = get_path(scale, path)
    if isinstance(found, Mapping):
      raise ValueError(f"scale tree holds a mapping, not a number, at {dotted(path)}")
    return found
  return scale


def validate_scale(scale: Any, tree: Any, keys: AdapterKeys = DEFAULT_KEYS) -> None:
  """Raises a clear error if a scale is not a finite number > 0, or the scale tree misses a pair or holds
  entries that are no pair of ``tree`` (a scale meant for another tree)."""
  paths = adapter_paths(tree, keys)
  for path in paths:
    where = dotted(path) or "<root>"
    try:
      value = scale_at(scale, path)
    except KeyError:
      raise ValueError(f"scale tree has no entry for the adapter pair {where}: it needs one "
                       f"number per pair (LoRAConfig.scales(trainable))") from None
    if isinstance(value, jax.core.Tracer):  # e.g. under optax.inject_hyperparams: known later
      continue
    array = np.asarray(value)
    if (not jax.dtypes.issubdtype(array.dtype, np.number)  # bfloat16 included, bool not
        or not np.all(np.isfinite(array) & (array > 0))):
      raise ValueError(f"LoRA scale must be a finite number > 0, got {value!r} for {where}")
  if isinstance(scale, Mapping):
    extra = [dotted(tuple(map(str, path))) for path in traverse_util.flatten_dict(scale)
             if tuple(map(str, path)) not in set(paths)]
    if extra:
      raise ValueError(f"scale tree has entries that are no adapter pair of the tree: {extra}; "
                       f"the pairs are {[dotted(path) for path in paths]}")
