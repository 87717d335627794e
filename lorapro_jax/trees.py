"""Operations on whole param trees: split / combine the trainable part, fold adapters in and out,
count, name and compare leaves.

Everything here follows the adapter contract of :mod:`lorapro_jax.adapters`; nested dict work
beyond it (flattening, putting a value at a path) is ``flax.traverse_util``'s.

>>> import numpy as np
>>> from lorapro_jax.lora import LoRAConfig
>>> params = {"dense": {"kernel": np.zeros((3, 2), np.float32), "lora_a": np.ones((3, 1)),
...                     "lora_b": np.ones((1, 2))}}
>>> base, trainable = split(params)
>>> sorted(trainable["dense"]), sorted(base["dense"])
(['lora_a', 'lora_b'], ['kernel'])
>>> np.asarray(merge(combine(base, trainable), LoRAConfig(rank=1, alpha=2.0))["dense"]["kernel"])
array([[2., 2.],
       [2., 2.],
       [2., 2.]], dtype=float32)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorapro_jax.adapters import DEFAULT_KEYS, Path, dotted, map_adapters
from lorapro_jax.lora import LoRAConfig, kernel_update, path_matches

ADAPTER_LEAVES = (DEFAULT_KEYS.a, DEFAULT_KEYS.b, DEFAULT_KEYS.c)


def split(params: Any, config: LoRAConfig | None = None) -> tuple[dict, dict]:
  """``(base, trainable)``: adapter leaves and ``config.modules_to_save`` subtrees go to
  ``trainable`` (same paths), everything else to ``base``. :func:`combine` inverts it.

  >>> base, trainable = split({"head": {"kernel": 1}, "q": {"kernel": 2, "lora_a": 3, "lora_b": 4}},
  ...                         LoRAConfig(modules_to_save="head"))
  >>> base, trainable
  ({'q': {'kernel': 2}}, {'head': {'kernel': 1}, 'q': {'lora_a': 3, 'lora_b': 4}})
  """
  saved = config.modules_to_save if config is not None else ()
  matched: set = set()

  def walk(node: Mapping, path: Path) -> tuple[dict, dict]:
    base, trainable = {}, {}
    for key, value in node.items():
      here = path + (str(key),)
      hits = [pattern for pattern in saved if path_matches(pattern, here)]
      if hits:
        matched.update(hits)
        trainable[key] = value
      elif key in ADAPTER_LEAVES and DEFAULT_KEYS.a in node and DEFAULT_KEYS.b in node:
        trainable[key] = value
      elif isinstance(value, Mapping):
        sub_base, sub_trainable = walk(value, here)
        if sub_base:
          base[key] = sub_base
        if sub_trainable:
          trainable[key] = sub_trainable
      else:
        base[key] = value
    return base, trainable

  base, trainable = walk(params, ())
  missing = [pattern for pattern in saved if pattern not in matched]
  if missing:
    raise ValueError(f"LoRAConfig.modules_to_save {missing} match no param subtree; top-level "
                     f"entries: {sorted(map(str, params))}")
  return base, trainable


def combine(base: Any, trainable: Any) -> dict:
  """The full param tree: ``base`` with ``trainable``'s entries added (they win on overlap).

  >>> combine({"q": {"kernel": 1}}, {"q": {"lora_a": 2}})
  {'q': {'kernel': 1, 'lora_a': 2}}
  """
  if not isinstance(trainable, Mapping):
    return trainable
  if not isinstance(base, Mapping):
    raise ValueError(f"combine: trainable holds a subtree where base has a leaf "
                     f"({type(base).__name__})")
  out = dict(base)
  for key, value in trainable.items():
    out[key] = combine(base[key], value) if key in base else value
  return out


def _kernel_of(node: Mapping, path: Path) -> jax.Array:
  if "kernel" not in node:
    raise ValueError(f"adapter {dotted(path) or '<root>'} has no kernel next to it (keys "
                     f"{sorted(map(str, node))}): pass the full params, combine(base, trainable)")
  return node["kernel"]


def _fold(kernel: jax.Array, node: Mapping, path: Path, config: LoRAConfig, sign: float):
  """``kernel + sign * s * A diag(c) B`` in float32, reshaped to the kernel's layout."""
  delta = kernel_update(node[DEFAULT_KEYS.a], node[DEFAULT_KEYS.b], node.get(DEFAULT_KEYS.c),
                        config.scale_for(path))
  if config.is_transposed(path):
    delta = jnp.swapaxes(delta, -1, -2)
  *stack, rows, cols = delta.shape
  shape = tuple(kernel.shape)
  split_at = [k for k in range(len(stack), len(shape) + 1)
              if math.prod(shape[len(stack):k]) == rows and math.prod(shape[k:]) == cols]
  if tuple(stack) != shape[:len(stack)] or not split_at:
    raise ValueError(f"adapter at {dotted(path)} gives an update of shape {delta.shape} that "
                     f"does not fold into its kernel of shape {shape} (stack, inputs, outputs "
                     f"order{', transposed' if config.is_transposed(path) else ''})")
  merged = kernel.astype(jnp.float32) + sign * delta.reshape(shape)
  return merged.astype(kernel.dtype)


def merge(params: Any, config: LoRAConfig) -> Any:
  """Params with each adapter folded into its kernel (``K0 + s*A@diag(c)@B``, float32, cast back)
  and the adapter leaves dropped: exactly the base model's structure, for the original model.
  (Example in the module docstring.)"""

  def fold(path, node):
    out = {k: v for k, v in node.items() if k not in ADAPTER_LEAVES}
    out["kernel"] = _fold(_kernel_of(node, path), node, path, config, 1.0)
    return out

  return map_adapters(fold, params)


def unmerge(merged: Any, trainable: Any, config: LoRAConfig) -> dict:
  """Inverse of :func:`merge`: the full params (base kernels restored, ``trainable`` added).

  >>> trainable = {"q": {"lora_a": np.ones((3, 1)), "lora_b": np.ones((1, 2))}}
  >>> merged = {"q": {"kernel": np.full((3, 2), 2.0, np.float32)}}
  >>> full = unmerge(merged, trainable, LoRAConfig(rank=1, alpha=2.0))
  >>> np.asarray(full["q"]["kernel"]).tolist()
  [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
  """

  def unfold(path, node):
    return {**node, "kernel": _fold(_kernel_of(node, path), node, path, config, -1.0)}

  return map_adapters(unfold, combine(merged, trainable))


def count_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays (or ``jax.ShapeDtypeStruct``s).

  >>> count_params({"a": np.zeros((3, 2)), "b": jax.ShapeDtypeStruct((4,), np.float32)})
  10
  """
  return sum(math.prod(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape)
             for leaf in jax.tree.leaves(tree))



def print_trainable_parameters(trainable: Any, base: Any) -> tuple[int, int]:
  """Prints PEFT's ``print_trainable_parameters()`` line and returns ``(trainable, all)`` counts.

  "All" is the whole adapted model: ``base`` (the frozen part from :func:`split`, or the full
  params) with ``trainable`` combined in, so a leaf in both counts once.

  >>> base = {"q": {"kernel": np.zeros((4, 4))}}
  >>> trainable = {"q": {"lora_a": np.zeros((4, 1)), "lora_b": np.zeros((1, 4))}}
  >>> print_trainable_parameters(trainable, base)
  trainable params: 8 || all params: 24 || trainable%: 33.3333
  (8, 24)
  """
  n_trainable, n_all = count_params(trainable), count_params(combine(base, trainable))
  if not n_all:
    raise ValueError("print_trainable_parameters: base and trainable hold no parameters")
  print(f"trainable params: {n_trainable:,d} || all params: {n_all:,d} || "
        f"trainable%: {100 * n_trainable / n_all:.4f}")
  return n_trainable, n_all

def _key_name(entry: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  raise TypeError(f"unsupported pytree key {entry!r}")


def named_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """``(path, leaf)`` for every leaf; a path is the tuple of its keys as strings (dict keys,
  dataclass / NamedTuple field names, sequence indices): the names checkpoints store.

  >>> named_leaves({"opt": (np.zeros(2), {"mu": 1.0})})
  [(('opt', '0'), array([0., 0.])), (('opt', '1', 'mu'), 1.0)]
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(_key_name(e) for e in path), leaf) for path, leaf in leaves]


def _is_layout(value: Any) -> bool:
  """A ``{path tuple: (shape, dtype)}`` map rather than a tree (whose keys are strings)."""
  return isinstance(value, Mapping) and bool(value) and all(isinstance(k, tuple) for k in value)


def _layout(value: Any) -> dict[tuple, tuple[tuple[int, ...], Any]]:
  if _is_layout(value):
    return {path: (tuple(shape), dtype) for path, (shape, dtype) in value.items()}
  return {path: (tuple(np.shape(leaf)), leaf.dtype if hasattr(leaf, "dtype")
                 else np.result_type(leaf))
          for path, leaf in named_leaves(value)}


def layout_differences(got: Any, expected: Any, *, got_name: str, expected_name: str,
                       dtypes: bool = True) -> list[str]:
  """One line per difference in the leaf paths, shapes and (with ``dtypes``) dtypes of two trees
  (or ``{path tuple: (shape, dtype)}`` maps); empty when they agree. Callers raise with it.

  >>> for line in layout_differences({"a": np.zeros(2), "b": np.zeros(1)},
  ...                                 {"a": np.zeros(3, np.float32), "c": np.zeros(1)},
  ...                                 got_name="checkpoint", expected_name="target"):
  ...   print(line)
  c: missing from the checkpoint
  b: in the checkpoint but not in the target
  a: checkpoint (2,) float64 vs target (3,) float32
  """
  have, want = _layout(got), _layout(expected)
  name = lambda path: dotted(tuple(map(str, path))) or "<root>"  # noqa: E731

  def describe(layout: tuple) -> str:
    return f"{layout[0]} {layout[1]}" if dtypes else f"{layout[0]}"

  lines = [f"{name(p)}: missing from the {got_name}" for p in want if p not in have]
  lines += [f"{name(p)}: in the {got_name} but not in the {expected_name}"
            for p in have if p not in want]
  lines += [f"{name(p)}: {got_name} {describe(have[p])} vs {expected_name} {describe(want[p])}"
            for p in want if p in have
            and (have[p] != want[p] if dtypes else have[p][0] != want[p][0])]
  return lines
