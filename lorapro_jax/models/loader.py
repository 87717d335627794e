"""Hugging Face checkpoint directories and our decoder: ``load_pretrained`` and ``save_pretrained``.

:func:`load_pretrained` reads ``config.json`` and the ``safetensors`` weights
(``model.safetensors``, or the shards named by ``model.safetensors.index.json``) with the
``safetensors`` package alone: no torch, no transformers, nothing unpickled (``pytorch_model.bin``
is refused). Each tensor is renamed, transposed (PyTorch ``Linear`` weights are ``(out, in)``, our
kernels ``(in, out)``), converted to the parameter dtype and written into its layer's slice of the
stacked (``nn.scan``) leaf, which already lives on the devices with its target sharding: host
memory holds one tensor at a time, and devices hold the model plus one layer's tensor in flight.

:func:`save_pretrained` is the inverse: our params (with LoRA adapters folded in, layer by layer,
when given their ``LoRAConfig``) written in PyTorch's names and layout, sharded above
``max_shard_size`` as ``save_pretrained`` of transformers does, so that
``AutoModelForCausalLM.from_pretrained`` (PyTorch), vLLM and :func:`load_pretrained` read them.

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

>>> import os, tempfile
>>> import jax, jax.numpy as jnp, numpy as np
>>> from safetensors.numpy import load_file, save_file
>>> from lorapro_jax.models import DecoderConfig, DecoderForCausalLM, load_pretrained
>>> model = DecoderForCausalLM(DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
...                                          num_layers=2, num_heads=2, num_kv_heads=2))
>>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
>>> directory = tempfile.mkdtemp()
>>> written = save_pretrained(model, params, directory, dtype=jnp.float32)
>>> written["model_type"], written["architectures"], sorted(os.listdir(directory))
('llama', ['LlamaForCausalLM'], ['config.json', 'model.safetensors'])
>>> loaded_model, loaded = load_pretrained(directory)
>>> jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
True
>>> tensors = load_file(os.path.join(directory, "model.safetensors"))
>>> tensors["model.layers.1.mlp.down_proj.weight"].shape      # PyTorch's (out, in)
(8, 12)
>>> del tensors["lm_head.weight"]
>>> save_file(tensors, os.path.join(directory, "model.safetensors"))
>>> load_pretrained(directory)  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: checkpoint ... lacks 1 tensor(s) the llama model needs: lm_head.weight
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from lorapro_jax.adapters import dotted
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.models.decoder import PROJECTIONS, DecoderConfig, DecoderForCausalLM
from lorapro_jax.models.families import Family, get_family
from lorapro_jax.models.generate import decoder_config
from lorapro_jax.trees import ADAPTER_LEAVES, layout_differences, merge

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
STACK = ("model", "layers")  # our stacked layers; Hugging Face's model.layers.{i}
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# files of a checkpoint directory that hold weights (never copied by save_pretrained's source=)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf",
                    ".index.json")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_DTYPE_NAMES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16",
                jnp.dtype(jnp.float16): "float16"}
# DecoderConfig fields that say how to run the model, not what the checkpoint holds
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "scan_unroll",
                   "copy_layer_weights")


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
    # this process's own CPU: with several processes jax.devices("cpu")[0] is process 0's
    self.cpu = jax.local_devices(backend="cpu")[0]

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


# ------------------------------------------------------------------------------------- saving


def to_hf_config(config: DecoderConfig, dtype: Any = None) -> dict[str, Any]:
  """The Hugging Face ``config.json`` of ``config`` (checkpoint dtype ``dtype``, default its
  ``param_dtype``): ``DecoderConfig.from_hf(to_hf_config(c), **runtime fields of c) == c``.

  Written for the keys :meth:`DecoderConfig.from_hf` and transformers read; what our config does
  not know (``max_position_embeddings``, token ids) is left to transformers' defaults, so pass a
  checkpoint's own ``config.json`` along where there is one (``save_pretrained(source=...)``).
  Switches the family's Hugging Face class cannot express (biases on other projections than its
  own, Gemma's norm on a Llama) are an error.

  >>> to_hf_config(DecoderConfig.tiny(family="qwen2", biases=("q_proj", "k_proj", "v_proj"),
  ...                                 tie_word_embeddings=True))["architectures"]
  ['Qwen2ForCausalLM']
  """
  family = config.family
  dtype_name = _dtype_name(config.param_dtype if dtype is None else dtype)
  attention, mlp = frozenset(PROJECTIONS[:4]), frozenset(PROJECTIONS[4:])
  expressible = {"llama": (frozenset(), attention, mlp, attention | mlp),
                 "mistral": (frozenset(),), "qwen2": (frozenset(PROJECTIONS[:3]),),
                 "gemma": (frozenset(), attention)}[family]
  if frozenset(config.biases) not in expressible:
    raise ValueError(f"biases {config.biases} cannot be written as a {family} config.json; "
                     f"{family} has biases on one of {[sorted(b) for b in expressible]}")
  gemma = family == "gemma"
  if (config.norm_unit_offset, config.scale_embeddings) != (gemma, gemma):
    raise ValueError(f"norm_unit_offset={config.norm_unit_offset}, scale_embeddings="
                     f"{config.scale_embeddings} cannot be written as a {family} config.json "
                     f"(both are {gemma} for {family})")
  if config.sliding_window is not None and family != "mistral":
    raise ValueError(f"sliding_window={config.sliding_window} cannot be written as a {family} "
                     "config.json (only mistral has one)")
  scaling = config.rope_scaling
  rope_scaling = None if scaling is None else {"rope_type": scaling.kind, "factor": scaling.factor}
  if scaling is not None and scaling.kind == "llama3":
    rope_scaling.update(low_freq_factor=scaling.low_freq_factor,
                        high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_position_embeddings)
  hf = {
      "model_type": family, "architectures": [_ARCHITECTURES[family]],
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "rope_theta": config.rope_theta, "rope_scaling": rope_scaling,
      "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
      "hidden_act": _HF_ACTIVATION[config.activation],
      "initializer_range": config.initializer_range, "torch_dtype": dtype_name,
  }
  if config.head_dim is not None:
    hf["head_dim"] = config.head_dim
  if family == "llama":
    hf.update(attention_bias=attention <= set(config.biases), mlp_bias=mlp <= set(config.biases))
  elif family == "mistral":
    hf["sliding_window"] = config.sliding_window
  elif family == "qwen2":
    hf["use_sliding_window"] = False
  else:  # gemma: transformers reads hidden_act, the model's authors hidden_activation
    hf.update(hidden_activation=hf["hidden_act"], attention_bias=bool(config.biases))
  return hf


def _dtype_name(dtype: Any) -> str:
  if jnp.dtype(dtype) not in _DTYPE_NAMES:
    raise ValueError(f"checkpoint dtype {jnp.dtype(dtype)} is not supported; expected one of "
                     f"{sorted(_DTYPE_NAMES.values())}")
  return _DTYPE_NAMES[jnp.dtype(dtype)]


def _shard_bytes(size: int | str) -> int:
  """Bytes of ``"5GB"`` (10⁹), ``"2GiB"`` (2³⁰), ``"40KB"``, ... or an int, as transformers reads
  ``max_shard_size``."""
  if isinstance(size, (int, np.integer)):
    value = int(size)
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?)B\s*", str(size), re.I)
    if not match:
      raise ValueError(f"max_shard_size {size!r} is not a size; expected bytes or e.g. '5GB', "
                       "'500MB', '2GiB'")
    number, unit, binary = match.groups()
    power = "KMGT".index(unit.upper()) + 1
    value = int(float(number) * ((1 << (10 * power)) if binary else 10 ** (3 * power)))
  if value < 1:
    raise ValueError(f"max_shard_size must be positive, got {size!r}")
  return value


def _config_to_write(config: DecoderConfig, source: str | None, dtype: Any) -> dict[str, Any]:
  """``source``'s ``config.json`` with the written dtype (it must describe ``config``), else
  :func:`to_hf_config`."""
  if source is None:
    return to_hf_config(config, dtype)
  with open(os.path.join(source, CONFIG), encoding="utf-8") as handle:
    hf = json.load(handle)
  runtime = {name: getattr(config, name) for name in _RUNTIME_FIELDS}
  described = DecoderConfig.from_hf(hf, **runtime)
  differing = [f"{field.name}: {getattr(described, field.name)!r} there, "
               f"{getattr(config, field.name)!r} here" for field in dataclasses.fields(config)
               if getattr(described, field.name) != getattr(config, field.name)]
  if differing:
    raise ValueError(f"the model is not the one {os.path.join(source, CONFIG)} describes ("
                     + "; ".join(differing) + "): pass source=None to write its own config.json")
  name = _dtype_name(dtype)
  hf["torch_dtype"] = name
  if "dtype" in hf:  # transformers >= 4.56 writes "dtype"; older readers want "torch_dtype"
    hf["dtype"] = name
  return hf


def _side_files(source: str | None) -> list[str]:
  """Top-level files of ``source`` other than weights and ``config.json``: the tokenizer,
  ``generation_config.json``, licence and card, which a served checkpoint needs beside them."""
  if source is None:
    return []
  return sorted(name for name in os.listdir(source)
                if os.path.isfile(os.path.join(source, name)) and name != CONFIG
                and not name.endswith(_WEIGHT_SUFFIXES) and not name.startswith("."))


def _hf_tensors(config: DecoderConfig, params: Any, lora: LoRAConfig | None,
                dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
  """``(Hugging Face name, host array)`` of every tensor, one layer at a time: adapters folded in
  (``lora``), cast to ``dtype`` and transposed on the devices, then fetched."""

  def host(value, transposed: bool) -> np.ndarray:
    value = jnp.asarray(value).astype(dtype)
    return np.ascontiguousarray(jax.device_get(value.T if transposed else value))

  def fold(tree):
    return tree if lora is None else merge(tree, lora)

  unstacked = {**params, "model": {k: v for k, v in params["model"].items() if k != STACK[1]}}
  for path, value in traverse_util.flatten_dict(fold(unstacked)).items():
    name, transposed = hf_tensor_name(path, None, config.family)
    yield name, host(value, transposed)
  layers = params["model"][STACK[1]]
  for layer in range(config.num_layers):
    sliced = fold({"model": {STACK[1]: jax.tree.map(lambda x: x[layer], layers)}})
    for path, value in traverse_util.flatten_dict(sliced).items():
      name, transposed = hf_tensor_name(path, layer, config.family)
      yield name, host(value, transposed)


def _is_written_weight(name: str) -> bool:
  return name in (WEIGHTS, INDEX) or bool(_SHARD_FILE.fullmatch(name))


def _give_umask_mode(path: str) -> None:
  """safetensors creates its files 0600: give them the mode ``open`` would (the umask's)."""
  umask = os.umask(0o022)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_pretrained(model: Any, params: Any, directory: str | os.PathLike, *,
                    lora: LoRAConfig | None = None, source: str | os.PathLike | None = None,
                    dtype: Any = None, max_shard_size: int | str = "5GB",
                    overwrite: bool = False) -> dict[str, Any]:
  """Writes our decoder's ``params`` as a Hugging Face checkpoint directory; returns the
  ``config.json`` written.

  The tensors get PyTorch's names and layout (``Linear`` weights ``(out, in)``, one tensor per
  layer, no ``lm_head.weight`` when the head is tied) and go into ``model.safetensors``, or, above
  ``max_shard_size``, into ``model-0000k-of-0000n.safetensors`` listed by
  ``model.safetensors.index.json``. They are produced one layer at a time (adapters folded in on
  the devices), so the host holds at most one shard.

  Args:
    model: a ``DecoderForCausalLM``, or one wrapped by ``lorapro_jax.inject``.
    params: its params; with ``lora``, the adapted tree (``combine(base, trainable)``), whose
      adapters are folded into their kernels (:func:`lorapro_jax.trees.merge`) as they are written.
    directory: where to write (created).
    lora: the ``LoRAConfig`` of the adapters in ``params`` (``export_merged`` passes it).
    source: the checkpoint directory the model was loaded from: its ``config.json`` (which must
      describe this model; the dtype is updated), tokenizer, ``generation_config.json`` and other
      non-weight files are copied, so the result serves as the original does. Without it,
      ``config.json`` is :func:`to_hf_config`'s.
    dtype: the tensors' dtype (default: the model's ``param_dtype``).
    max_shard_size: bytes per file (int, or ``"5GB"``, ``"500MB"``, ``"2GiB"`` ...).
    overwrite: replace the config, weight and copied files of a checkpoint already in
      ``directory`` (stale shards are removed); default: refuse, writing nothing.
  """
  config = decoder_config(model)
  directory = os.fspath(directory)
  source = None if source is None else os.fspath(source)
  dtype = jnp.dtype(config.param_dtype if dtype is None else dtype)
  _dtype_name(dtype)
  limit = _shard_bytes(max_shard_size)
  if source is not None and os.path.isdir(directory) and os.path.samefile(source, directory):
    raise ValueError(f"cannot save into the source checkpoint {source} itself")
  hf = _config_to_write(config, source, dtype)
  copies = _side_files(source)

  flat = traverse_util.flatten_dict(params)
  adapter_leaves = sorted(dotted(p) for p in flat if p[-1] in ADAPTER_LEAVES)
  if adapter_leaves and lora is None:
    raise ValueError(f"params hold adapter leaves ({adapter_leaves[0]}, ...): pass their "
                     "LoRAConfig as lora= to fold them in (lorapro_jax.peft_format.export_merged)")
  got = {path: (np.shape(value), None) for path, value in flat.items()
         if path[-1] not in ADAPTER_LEAVES}
  shapes = jax.eval_shape(DecoderForCausalLM(config).init, jax.random.key(0),
                          jnp.zeros((1, 1), jnp.int32))["params"]
  expected = {path: (shape.shape, None) for path, shape in
              traverse_util.flatten_dict(shapes).items()}
  problems = layout_differences(got, expected, got_name="params", expected_name="model",
                                dtypes=False)
  if problems:
    raise ValueError(f"params do not fit the {config.family} model ({len(problems)} "
                     "differences): " + "; ".join(problems[:10]))

  existing = [name for name in (sorted(os.listdir(directory)) if os.path.isdir(directory) else ())
              if name == CONFIG or name in copies or _is_written_weight(name)]
  if existing and not overwrite:
    raise FileExistsError(f"{directory} already holds {existing}; pass overwrite=True to replace "
                          "them")
  os.makedirs(directory, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".partial-", dir=directory)
  try:
    shards: list[tuple[str, list[str]]] = []
    pending: dict[str, np.ndarray] = {}
    total = 0

    def flush():
      from safetensors.numpy import save_file
      path = os.path.join(staging, f"{len(shards)}.safetensors")
      save_file(pending, path, metadata={"format": "pt"})  # "pt": transformers requires it
      shards.append((path, list(pending)))
      pending.clear()

    for name, value in _hf_tensors(config, params, lora, dtype):
      if pending and sum(v.nbytes for v in pending.values()) + value.nbytes > limit:
        flush()
      pending[name] = value
      total += value.nbytes
    flush()
    names = ([WEIGHTS] if len(shards) == 1 else
             [SHARD.format(k, len(shards)) for k in range(1, len(shards) + 1)])
    for stale in existing:  # nothing is removed before every new shard is on disk
      if _is_written_weight(stale) and stale not in names:
        os.remove(os.path.join(directory, stale))
    weight_map = {}
    for (path, tensors), name in zip(shards, names):
      _give_umask_mode(path)
      os.replace(path, os.path.join(directory, name))
      weight_map.update(dict.fromkeys(tensors, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  if len(names) > 1:
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as handle:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                handle, indent=2)
  for name in copies:
    shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
  with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as handle:
    json.dump(hf, handle, indent=2, sort_keys=True)
  return hf
