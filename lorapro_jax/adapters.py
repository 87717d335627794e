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


def _rebuild(node: Mapping, items: dict) -> Mapping:
  """A mapping of the same type as ``node`` (dict, FrozenDict, ...) holding ``items``."""
  return items if type(node) is dict else type(node)(items)


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
      return _rebuild(node, {k: walk(path + (str(k),), v, *(o[k] for o in others))
                             for k, v in node.items()})
    return node if other is None else other(path, node, *others)

  return walk((), tree, *rest)


def adapter_paths(tree: Any, keys: AdapterKeys = DEFAULT_KEYS) -> list[Path]:
  """Paths of all adapter nodes, in the tree's (insertion) order."""
  paths: list[Path] = []
  map_adapters(lambda path, node: paths.append(path), tree, keys=keys)
  return paths


def get_path(tree: Any, path: Path) -> Any:
  """The node of ``tree`` at ``path``, with an error naming the missing key."""
  node = tree
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"no entry {key!r} at {'/'.join(path[:depth]) or '<root>'} "
                     f"(looking up {'/'.join(path)})")
    node = node[key]
  return node


def scale_at(scale: Any, path: Path) -> Any:
  """The scale ``s`` of the pair at ``path``: ``scale`` itself if a number, else looked up."""
  if isinstance(scale, Mapping):
    found = get_path(scale, path)
    if isinstance(found, Mapping):
      raise ValueError(f"scale tree holds a mapping, not a number, at {'/'.join(path)}")
    return found
  return scale


def validate_scale(scale: Any, tree: Any, keys: AdapterKeys = DEFAULT_KEYS) -> None:
  """Raises a clear error if a scale is zero/negative or the scale tree misses a pair."""
  for path in adapter_paths(tree, keys):
    value = scale_at(scale, path)
    if not isinstance(value, jax.Array) and float(value) <= 0.0:
      raise ValueError(f"LoRA scale must be > 0, got {value!r} for {'/'.join(path) or '<root>'}")
