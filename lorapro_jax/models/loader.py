"""Load a Hugging Face checkpoint directory into our decoder: ``load_pretrained``.

Reads ``config.json`` and the ``safetensors`` weights (``model.safetensors``, or the shards named
by ``model.safetensors.index.json``) with the ``safetensors`` package alone: no torch, no
transformers, nothing unpickled (``pytorch_model.bin`` is refused). Each tensor is renamed,
transposed (PyTorch ``Linear`` weights are ``(out, in)``, our kernels ``(in, out)``), converted to
the parameter dtype and written into its layer's slice of the stacked (``nn.scan``) leaf, which
already lives on the devices with its target sharding: host memory holds one tensor at a time, and
devices hold the model plus one layer's tensor in flight.

Name mapping (``{i}`` the layer; every layer leaf is stacked on a leading axis of ``num_layers``)::

  model.embed_tokens.weight                      model/embed_tokens/embedding
  model.layers.{i}.self_attn.q_proj.weight       model/layers/self_attn/q_proj/kernel[i]  (ᵀ)
  model.layers.{i}.self_attn.q_proj.bias         model/layers/self_attn/q_proj/bias[i]
  model.layers.{i}.input_layernorm.weight        model/layers/input_layernorm/weight[i]
  model.norm.weight                              model/norm/weight
  lm_head.weight                                 lm_head/kernel  (ᵀ; absent when tied)

Every tensor the model needs must be in the files with its exact shape and a floating dtype;
every tensor in the files must be used (``rotary_emb.inv_freq`` buffers of old checkpoints aside:
they are recomputed from the config). Anything else is an error naming the tensors; nothing is
skipped or initialised at random.

>>> import json, os, tempfile
>>> import jax, jax.numpy as jnp, numpy as np
>>> from flax import traverse_util
>>> from safetensors.numpy import save_file
>>> from lorapro_jax.models import DecoderConfig, DecoderForCausalLM, load_pretrained
>>> hf_config = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
...              "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2}
>>> model = DecoderForCausalLM(DecoderConfig.from_hf(hf_config))
>>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
>>> tensors = {}  # our params written under Hugging Face's names, as save_pretrained would
>>> for path, value in traverse_util.flatten_dict(params).items():
...   for layer in (range(2) if path[:2] == ("model", "layers") else [None]):
...     name, transposed = hf_tensor_name(path, layer)
...     part = np.asarray(value if layer is None else value[layer])
...     tensors[name] = np.ascontiguousarray(part.T if transposed else part)
>>> directory = tempfile.mkdtemp()
>>> save_file(tensors, os.path.join(directory, "model.safetensors"))
>>> with open(os.path.join(directory, "config.json"), "w") as f:
...   json.dump(hf_config, f)
>>> loaded_model, loaded = load_pretrained(directory)
>>> jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
True
>>> tensors.pop("lm_head.weight").shape
(16, 8)
>>> save_file(tensors, os.path.join(directory, "model.safetensors"))
>>> load_pretrained(directory)  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: checkpoint ... lacks 1 tensor(s) the llama model needs: lm_head.weight
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from lorapro_jax.adapters import dotted
from lorapro_jax.models.decoder import DecoderConfig, DecoderForCausalLM
from lorapro_jax.models.families import Family, get_family

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
STACK = ("model", "layers")  # our stacked layers; Hugging Face's model.layers.{i}
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_tensor_name(path: tuple[str, ...], layer: int | None = None,
                   family: str | Family = "llama") -> tuple[str, bool]:
  """``(name, transposed)``: the Hugging Face tensor holding the leaf at ``path`` (layer ``layer``
  of a stacked leaf, its index after the family's ``stack_container``), and whether it is stored
  transposed (``Linear`` weights).

  >>> hf_tensor_name(("model", "layers", "self_attn", "q_proj", "kernel"), 3)
  ('model.layers.3.self_attn.q_proj.weight', True)
  """
  record = get_family(family)
  *module, leaf = path
  if layer is not None:
    at = module.index(record.stack_container) + 1
    module = [*module[:at], str(layer), *module[at:]]
  name = {"kernel": "weight", "embedding": "weight", record.norm_weight: "weight"}.get(leaf, leaf)
  return ".".join([*module, name]), leaf == "kernel"


def _weight_files(directory: str) -> dict[str, str]:
  """Tensor name -> the safetensors file holding it."""
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index, encoding="utf-8") as handle:
      weight_map = json.load(handle)["weight_map"]
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}
  single = os.path.join(directory, WEIGHTS)
  if os.path.exists(single):
    from safetensors import safe_open
    with safe_open(single, framework="flax") as handle:
      return {name: single for name in handle.keys()}
  pickles = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
  raise FileNotFoundError(
      f"{directory} has neither {WEIGHTS} nor {INDEX}"
      + (f"; {pickles} are pickles, which are never read (convert them to safetensors)"
         if pickles else ""))


def _slice_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of one layer of a stacked leaf: the stacked spec without its layer axis."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
  return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer_value, layer):
  """``stacked[layer] = layer_value``, in place (the stacked buffer is donated)."""
  return jax.lax.dynamic_update_index_in_dim(stacked, layer_value, layer, axis=0)


class _Reader:
  """Opens each safetensors file once; checks tensors against the layout and reads them as host
  (CPU) arrays."""

  def __init__(self, files: Mapping[str, str]):
    self.files = files
    self.stack = contextlib.ExitStack()
    self.handles: dict[str, Any] = {}
    self.cpu = jax.devices("cpu")[0]

  def _handle(self, name: str):
    from safetensors import safe_open
    file = self.files[name]
    if file not in self.handles:
      self.handles[file] = self.stack.enter_context(safe_open(file, framework="flax"))
    return self.handles[file]

  def problems(self, layout: Mapping[str, tuple[tuple[int, ...], bool]]) -> list[str]:
    """What does not fit in ``{name: (our shape, transposed)}``, from the files' headers."""
    found = []
    for name, (shape, transposed) in layout.items():
      stored = self._handle(name).get_slice(name)
      stored_dtype, stored_shape = stored.get_dtype(), tuple(stored.get_shape())
      want = shape[::-1] if transposed else shape
      where = os.path.basename(self.files[name])
      if stored_dtype not in _FLOAT_DTYPES:
        found.append(f"tensor {name} in {where} has dtype {stored_dtype}; expected a float dtype "
                     f"({', '.join(_FLOAT_DTYPES)}): quantised checkpoints are not supported")
      elif stored_shape != want:
        found.append(f"tensor {name} in {where} has shape {stored_shape}; the config implies "
                     f"{want}")
    return found

  def read(self, name: str, transposed: bool, dtype) -> np.ndarray:
    with jax.default_device(self.cpu):  # bf16 needs the jax API; keep it in host memory
      value = self._handle(name).get_tensor(name)
      value = (value.T if transposed else value).astype(dtype)
      if jnp.dtype(dtype) == jnp.float16 and not bool(jnp.isfinite(value).all()):
        raise ValueError(f"tensor {name} overflows float16; load it with dtype=jnp.bfloat16 or "
                         "jnp.float32")
    return np.asarray(value)


def _place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_pretrained(path: str | os.PathLike, *, dtype: Any = None, mesh: jax.sharding.Mesh = None,
                    shardings: Any = None, overrides: Mapping[str, Any] | None = None
                    ) -> tuple[DecoderForCausalLM, dict]:
  """``(model, params)`` from a Hugging Face checkpoint directory; ``model.apply({"params":
  params}, input_ids)`` returns logits ``(batch, seq, vocab)``.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or sharded safetensors files
      with ``model.safetensors.index.json``.
    dtype: parameter and compute dtype (default: the checkpoint's ``dtype`` / ``torch_dtype``).
    mesh: place each parameter with the fsdp rule of :func:`lorapro_jax.sharding.param_shardings`
      on this mesh.
    shardings: a tree of ``jax.sharding.Sharding`` with the params' structure (overrides ``mesh``).
      Default without either: the first device.
    overrides: other :class:`DecoderConfig` fields (``remat``, ``scan_unroll``, ``attention``,
      a compute ``dtype`` different from the parameters' ...).
  """
  directory = os.fspath(path)
  with open(os.path.join(directory, CONFIG), encoding="utf-8") as handle:
    hf_config = json.load(handle)
  fields = dict(overrides or {})
  if dtype is not None:
    fields = {"dtype": dtype, "param_dtype": dtype, **fields}
  config = DecoderConfig.from_hf(hf_config, **fields)
  model = DecoderForCausalLM(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  flat_shapes = traverse_util.flatten_dict(shapes)
  if shardings is None:
    if mesh is not None:
      from lorapro_jax.sharding import param_shardings
      shardings = param_shardings(shapes, mesh)
    else:
      shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                               shapes)
  flat_shardings = traverse_util.flatten_dict(shardings)
  if set(flat_shardings) != set(flat_shapes):
    differing = sorted(set(flat_shardings) ^ set(flat_shapes))
    raise ValueError("shardings do not have the structure of the params; differing paths: "
                     + ", ".join(dotted(p) for p in differing[:10]))

  files = _weight_files(directory)
  layers = config.num_layers
  needed = {}  # hf name -> (our path, layer or None, transposed)
  for leaf_path in flat_shapes:
    stacked = tuple(leaf_path[:2]) == STACK
    for layer in (range(layers) if stacked else (None,)):
      name, transposed = hf_tensor_name(leaf_path, layer, config.family)
      needed[name] = (leaf_path, layer, transposed)
  missing = sorted(set(needed) - set(files))
  unused = sorted(n for n in set(files) - set(needed) if not _DERIVED.fullmatch(n))
  if missing or unused:
    problems = []
    if missing:
      problems.append(f"lacks {len(missing)} tensor(s) the {config.family} model needs: "
                      + ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else ""))
    if unused:
      tied = " (the config ties the head to the embeddings)" if "lm_head.weight" in unused else ""
      problems.append(f"holds {len(unused)} tensor(s) the {config.family} model has no place "
                      f"for{tied}: " + ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else ""))
    raise ValueError(f"checkpoint {directory} " + "; it ".join(problems))

  reader = _Reader(files)
  params: dict = {}
  with reader.stack:
    layout = {name: (flat_shapes[leaf_path].shape[1 if layer is not None else 0:], transposed)
              for name, (leaf_path, layer, transposed) in needed.items()}
    problems = reader.problems(layout)
    if problems:
      raise ValueError(f"checkpoint {directory} does not fit its config.json "
                       f"({len(problems)} tensor(s)): " + "; ".join(problems[:8]))
    for leaf_path, shape in flat_shapes.items():  # unstacked leaves, and empty stacked buffers
      sharding = flat_shardings[leaf_path]
      if tuple(leaf_path[:2]) == STACK:
        params[leaf_path] = jax.jit(functools.partial(jnp.zeros, shape.shape, shape.dtype),
                                    out_shardings=sharding)()
      else:
        name, transposed = hf_tensor_name(leaf_path, None, config.family)
        params[leaf_path] = _place(reader.read(name, transposed, shape.dtype), sharding)
    for layer in range(layers):  # layer by layer, as sharded checkpoints group their files
      for leaf_path, shape in flat_shapes.items():
        if tuple(leaf_path[:2]) != STACK:
          continue
        name, transposed = hf_tensor_name(leaf_path, layer, config.family)
        placed = _place(reader.read(name, transposed, shape.dtype),
                        _slice_sharding(flat_shardings[leaf_path]))
        params[leaf_path] = _set_layer(params[leaf_path], placed, layer)
  return model, traverse_util.unflatten_dict(params)
