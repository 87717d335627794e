"""Adapters for the PyTorch world: PEFT-format export and import, and merged-weight export.

PEFT (Hugging Face's ``peft``, LoRA type) stores an adapter as two files in a directory:

* ``adapter_model.safetensors`` — per adapted module ``<module>`` of the PyTorch model,
  ``base_model.model.<module>.lora_A.weight`` of shape ``(r, n_in)`` and
  ``base_model.model.<module>.lora_B.weight`` of shape ``(n_out, r)``, plus the full weights of
  ``modules_to_save`` under ``base_model.model.<module>.<param>``;
* ``adapter_config.json`` — ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``,
  ``rank_pattern`` / ``alpha_pattern`` (per-module overrides, matched as regex suffixes of the
  module name), ``fan_in_fan_out`` (GPT-2's ``Conv1D``), ``modules_to_save``, ...

PEFT's update of a module is ``ΔW = (alpha_m / r_m)·B_pt·A_pt`` (rsLoRA: ``alpha_m / sqrt(r_m)``)
with the output ``x·W_ptᵀ + s·x·A_ptᵀ·B_ptᵀ``; ours is ``y = x·K0 + s·x·A·B`` with A
``(n_in, r)``, B ``(r, n_out)``. So ``A_pt = Aᵀ``, ``B_pt = Bᵀ`` for every family — GPT-2
included: its ``Conv1D`` weight is stored ``(n_in, n_out)`` and PEFT's ``fan_in_fan_out=True``
transposes the update, not the factors. Gates (``lora_c``) are folded into B:
``B_pt = (diag(c)·B)ᵀ``.

**Module names.** Hugging Face's Flax models use the PyTorch module names (``encoder/layer/0/
attention/self/query`` ↔ ``encoder.layer.0.attention.self.query``, T5's ``block.0.layer.1.
EncDecAttention.q``, GPT-2's ``transformer.h.0.attn.c_attn``, Llama's ``model.layers.0.mlp.
down_proj``, ViT's ``vit.encoder.layer.0.attention.attention.query``), so a Flax path joined by
dots *is* the module name, after an optional ``prefix``: the Flax params of ``FlaxBertModel``
start at ``encoder``, a ``BertForSequenceClassification`` holds them under ``bert.`` (pass
``prefix="bert."``). Layers stacked on a leading axis (``nn.scan``, e.g.
``lorapro_jax.models.decoder``: ``model/layers/self_attn/q_proj`` with ``lora_a`` of shape
``(L, n_in, r)``) become one module per slice, the index inserted after the family's layer
container (the family record's ``stack_container``: ``model.layers.{i}.self_attn.q_proj``).

**Per-module ranks and scales.** Each module is written with its actual rank r_m (the factors'
shape; after dynamic rank's ``shrink`` ranks differ) and ``alpha_m = s_m·r_m`` (rsLoRA
``s_m·sqrt(r_m)``) where ``s_m`` is the scale the adapter was trained with
(``LoRAConfig.scale_for``), so PEFT's ``alpha_m / r_m`` reproduces ``s_m`` (bit for bit in float64
whenever a float64 alpha can, else within one float64 ulp). The most
common rank and alpha become ``r`` and ``lora_alpha``; every other module gets a
``rank_pattern`` / ``alpha_pattern`` entry keyed by its full module name.

Example::

  import numpy as np
  from lorapro_jax import LoRAConfig
  from lorapro_jax.peft_format import export_peft, import_peft

  trainable = {"encoder": {"layer": {"0": {"attention": {"self": {"query": {
      "lora_a": np.ones((12, 4), np.float32), "lora_b": np.ones((4, 12), np.float32)}}}}}}}
  config = LoRAConfig(rank=4, alpha=8.0, targets=("query",))
  export_peft(trainable, config, "/tmp/adapter", family="bert", prefix="bert.",
              base_model_name_or_path="bert-base-uncased", overwrite=True)
  # -> base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight (4, 12), ...
  # PyTorch: peft.PeftModel.from_pretrained(BertForSequenceClassification(...), "/tmp/adapter")
  adapters, config = import_peft("/tmp/adapter", family="bert", prefix="bert.")

Only safetensors and JSON are read; nothing is unpickled.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from flax.traverse_util import flatten_dict, unflatten_dict

from lorapro_jax.adapters import (DEFAULT_KEYS, Path, adapter_paths, check_pair, dotted, get_path,
                                  is_adapter, map_adapters)
from lorapro_jax.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from lorapro_jax.lora import ALL_LINEAR, REGEX_PREFIX, LoRAConfig, path_matches
from lorapro_jax.models.families import Family, get_family
from lorapro_jax.trees import layout_differences, merge, named_leaves

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _check_prefix(prefix: str) -> None:
  if prefix and not prefix.endswith("."):
    raise ValueError(f"prefix must be empty or end with '.', got {prefix!r}")


def torch_module_names(path: Path, family: str | Family, n_stacked: int = 0,
                       prefix: str = "") -> list[str]:
  """The PyTorch module name(s) of the Flax module at ``path``.

  One name for an unstacked module; ``n_stacked`` names (one per slice of the leading axis) for
  a stacked one, the slice index inserted after the family's ``stack_container``.
  """
  record = get_family(family)
  _check_prefix(prefix)
  if not n_stacked:
    return [prefix + dotted(path)]
  container = record.stack_container
  if container not in path:
    raise ValueError(f"stacked module {dotted(path)} has no {container!r} component to put the "
                     f"layer index after (family {record.name!r})")
  at = path.index(container) + 1
  return [prefix + dotted(path[:at] + (str(i),) + path[at:]) for i in range(n_stacked)]


def peft_pattern_key(patterns: Sequence[str], module_name: str) -> str | None:
  """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key that matches the end of
  the module name at a component boundary, as a regex (``peft.utils.other.get_pattern_key``)."""
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", module_name):
      return key
  return None


# ------------------------------------------------------------------------------------- export


def _slices(path: Path, node: Mapping, ranks: Mapping[str, Any] | None):
  """``[(slice index or None, A (n_in, r_m), B (r_m, n_out))]`` in float64 with c folded into B
  and the components beyond a slice's live rank dropped (they must be zero)."""
  a, b, c = (None if key not in node else np.asarray(jax.device_get(node[key]), np.float64)
             for key in DEFAULT_KEYS)
  check_pair(a, b, c, where=f"adapter {dotted(path)}")
  if a.ndim > 3:
    raise ValueError(f"adapter {dotted(path)}: lora_a {a.shape} is stacked on {a.ndim - 2} axes; "
                     "PEFT export takes at most one (one module per slice)")
  if c is not None:
    b = c[..., :, None] * b
  stacked = a.ndim == 3
  a_list, b_list = (list(a), list(b)) if stacked else ([a], [b])
  live = ranks.get(dotted(path)) if ranks is not None else None
  if live is None:
    live = [x.shape[-1] for x in a_list]
  elif isinstance(live, (int, np.integer)):
    live = [int(live)] * len(a_list)
  if len(live) != len(a_list):
    raise ValueError(f"ranks[{dotted(path)!r}] gives {len(live)} ranks for {len(a_list)} slices")
  out = []
  for index, (a_i, b_i, r_i) in enumerate(zip(a_list, b_list, live)):
    if not 0 <= r_i <= a_i.shape[-1]:
      raise ValueError(f"rank {r_i} for {dotted(path)} (slice {index}) is not in "
                       f"0..{a_i.shape[-1]}")
    dropped = np.linalg.norm(a_i[:, r_i:], axis=0) * np.linalg.norm(b_i[r_i:], axis=1)
    if np.any(dropped != 0):
      raise ValueError(f"adapter {dotted(path)} (slice {index}) has non-zero components beyond its "
                       f"rank {r_i}: shrink it first (lorapro_jax.dynamic_rank.shrink puts live "
                       "components first)")
    out.append((index if stacked else None, a_i[:, :r_i], b_i[:r_i]))
  return out


def _alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
  """The float64 alpha whose PEFT scale ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) is nearest
  to ``scale``: equal to it whenever some float64 alpha gives it exactly, else one float64 ulp
  away (a gap of the division), far below float32 resolution."""
  divisor = math.sqrt(rank) if rslora else rank
  candidates = [scale * divisor]
  for direction in (math.inf, -math.inf):
    alpha = candidates[0]
    for _ in range(3):
      alpha = math.nextafter(alpha, direction)
      candidates.append(alpha)
  return min(candidates, key=lambda alpha: (abs(alpha / divisor - scale), alpha))


def _most_common(values: list[Any]) -> Any:
  counts = collections.Counter(values)
  return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _saved_subtrees(tree: Any, config: LoRAConfig) -> list[tuple[Path, Any]]:
  """The ``modules_to_save`` subtrees of a trainable tree; other non-adapter leaves are errors."""
  found: list[tuple[Path, Any]] = []

  def walk(path: Path, node: Any) -> None:
    if path and any(path_matches(p, path) for p in config.modules_to_save):
      found.append((path, node))
    elif is_adapter(node):
      return
    elif isinstance(node, Mapping):
      for key, value in node.items():
        walk(path + (str(key),), value)
    else:
      raise ValueError(f"trainable leaf {dotted(path)} is neither in an adapter node nor under "
                       f"LoRAConfig.modules_to_save {list(config.modules_to_save)}")

  walk((), tree)
  return found


def _torch_params(path: Path, subtree: Any, prefix: str) -> dict[str, np.ndarray]:
  """PyTorch state-dict entries of a Flax param subtree (a module saved in full)."""
  out = {}
  for leaf_path, leaf in named_leaves(subtree):
    full = path + leaf_path
    *module, name = full
    value = np.asarray(jax.device_get(leaf))
    if name == "kernel":
      if value.ndim != 2:
        raise ValueError(f"cannot export the {value.ndim}-D kernel at {dotted(full)} to PEFT")
      name, value = "weight", value.T
    elif name in ("scale", "embedding"):
      name = "weight"
    elif name not in ("bias", "weight"):
      raise ValueError(f"cannot name the param {dotted(full)} in PyTorch")
    # safetensors writes the raw buffer: a transposed view must be made contiguous first
    out[PEFT_PREFIX + prefix + dotted((*module, name))] = np.ascontiguousarray(value)
  return out


def _plain_targets(config: LoRAConfig) -> bool:
  return all(not t.startswith(REGEX_PREFIX) and t != ALL_LINEAR
             for t in tuple(config.targets) + tuple(config.exclude))


def export_peft(adapters: Any, config: LoRAConfig, directory: str | os.PathLike, *,
                family: str | Family, prefix: str = "",
                base_model_name_or_path: str | None = None,
                task_type: str | None = None, ranks: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
  """Writes ``adapters`` (the trainable tree) as a PEFT LoRA adapter; returns the config written.

  Args:
    adapters: the trainable tree (adapter nodes and ``config.modules_to_save`` subtrees).
    config: the LoRAConfig the adapters were trained with (scales come from it).
    directory: output directory (created).
    family: the model family (a key of ``lorapro_jax.models.FAMILIES`` or a ``Family``): a family
      with ``transposed_kernels`` (GPT-2) gets ``fan_in_fan_out``, stacked layers their index
      after its ``stack_container``.
    prefix: the PyTorch module prefix of the tree's root (``"bert."`` for FlaxBertModel params
      loaded into a BertForSequenceClassification; ``""`` when the trees correspond).
    base_model_name_or_path, task_type: copied into the PEFT config.
    ranks: live rank per dotted adapter path (int, or one per slice of a stacked node), e.g.
      ``lorapro_jax.dynamic_rank.rank_pattern(state)`` for adapters that ``shrink`` zero-padded.
      A module of rank 0 (pruned away by dynamic rank's global budget) gets no tensors and is
      listed in ``exclude_modules``, so PEFT leaves it as it is.
    overwrite: replace existing files (default: refuse).
  """
  from safetensors.numpy import save
  if not isinstance(config, LoRAConfig):
    raise TypeError(f"export_peft needs the LoRAConfig the adapters were trained with, got "
                    f"{type(config).__name__}")
  record = get_family(family)
  _check_prefix(prefix)
  directory = os.fspath(directory)
  for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
    if not overwrite and os.path.exists(os.path.join(directory, name)):
      raise FileExistsError(f"{os.path.join(directory, name)} exists; pass overwrite=True")

  tensors: dict[str, np.ndarray] = {}
  modules: list[tuple[str, int, float, str]] = []  # (module name, rank, alpha, flax path)
  pruned: list[str] = []  # modules of rank 0 (dynamic rank's budget): no tensors, excluded


  def export_node(path, node):
    scale = config.scale_for(path)
    slices = _slices(path, node, ranks)
    names = torch_module_names(path, record, len(slices) if slices[0][0] is not None else 0, prefix)
    dtype = np.asarray(node[DEFAULT_KEYS.a]).dtype
    dtype = dtype if dtype in (np.float16, np.float32, np.float64) else np.float32
    for name, (_, a, b) in zip(names, slices):
      rank = a.shape[-1]
      if rank == 0:  # named without the prefix: PEFT matches it as a suffix, our import as a path
        pruned.append(name.removeprefix(prefix))
        continue
      tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T.astype(dtype))
      tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T.astype(dtype))
      modules.append((name, rank, _alpha_for_scale(scale, rank, config.rslora), dotted(path)))
    return node

  map_adapters(export_node, adapters)
  if not modules:
    raise ValueError("export_peft: the tree holds no adapter node (lora_a / lora_b) of rank >= 1")
  saved = _saved_subtrees(adapters, config)
  for path, subtree in saved:
    tensors.update(_torch_params(path, subtree, prefix))

  r = _most_common([rank for _, rank, _, _ in modules])
  lora_alpha = _most_common([alpha for _, _, alpha, _ in modules])
  rank_pattern = {name: rank for name, rank, _, _ in modules if rank != r}
  alpha_pattern = {name: alpha for name, _, alpha, _ in modules if alpha != lora_alpha}
  if _plain_targets(config):
    target_modules = [t.replace("/", ".") for t in config.targets]
    exclude_modules = [t.replace("/", ".") for t in config.exclude] + pruned or None
  else:  # our regexes match paths without the prefix: name the modules instead
    target_modules = sorted({name for name, _, _, _ in modules})
    exclude_modules = pruned or None
  peft_config = {
      "peft_type": "LORA", "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(r), "lora_alpha": float(lora_alpha), "use_rslora": bool(config.rslora),
      "lora_dropout": float(config.dropout), "target_modules": target_modules,
      "exclude_modules": exclude_modules, "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern, "fan_in_fan_out": bool(record.transposed_kernels),
      "bias": "none",
      "modules_to_save": [prefix + dotted(path) for path, _ in saved] or None,
      "init_lora_weights": True, "use_dora": False, "inference_mode": True,
  }
  _check_patterns_resolve(modules, peft_config)
  os.makedirs(directory, exist_ok=True)
  # safetensors' save_file creates files 0600; Python's open gives the umask's mode (0644)
  with open(os.path.join(directory, ADAPTER_WEIGHTS), "wb") as handle:
    handle.write(save(tensors, metadata={"format": "pt"}))
  with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as handle:
    json.dump(peft_config, handle, indent=2, sort_keys=True)
  return peft_config


def _check_patterns_resolve(modules: list[tuple[str, int, float, str]],
                            peft_config: Mapping[str, Any]) -> None:
  """Every module must get back its rank and alpha under PEFT's pattern rule."""
  for name, rank, alpha, path in modules:
    rank_key = peft_pattern_key(list(peft_config["rank_pattern"]), name)
    alpha_key = peft_pattern_key(list(peft_config["alpha_pattern"]), name)
    got_rank = peft_config["rank_pattern"][rank_key] if rank_key else peft_config["r"]
    got_alpha = peft_config["alpha_pattern"][alpha_key] if alpha_key else peft_config["lora_alpha"]
    if got_rank != rank or got_alpha != alpha:
      raise ValueError(f"module {name} (from {path}) would load with r={got_rank}, "
                       f"alpha={got_alpha} instead of r={rank}, alpha={alpha}: its name is a "
                       f"suffix of another module's pattern key")


# ------------------------------------------------------------------------------------- import

_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "layers_to_transform": None,
                "layer_replication": None, "target_parameters": None,
                "trainable_token_indices": None, "bias": "none"}


def check_peft_config(peft_config: Any, *, where: str) -> None:
  """Raises unless ``peft_config`` is a PEFT LoRA config whose settings we can represent."""
  if not isinstance(peft_config, Mapping):
    raise ValueError(f"{where}: expected a JSON object of PEFT LoraConfig fields, got "
                     f"{type(peft_config).__name__}")
  if peft_config.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type is {peft_config.get('peft_type')!r}, only 'LORA' is "
                     "supported")
  for field, default in _UNSUPPORTED.items():
    if peft_config.get(field, default) not in (default, [], {}, None):
      note = (" (PEFT's use_dora is weight-decomposed DoRA, not lorapro_jax's dynamic rank)"
              if field == "use_dora" else "")
      raise ValueError(f"{where}: {field}={peft_config[field]!r} is not supported (expected "
                       f"{default!r}){note}")


def read_peft_config(source: str | os.PathLike) -> dict[str, Any]:
  """The ``adapter_config.json`` of a PEFT LoRA adapter (the file, or the adapter directory
  holding it), checked for what we can represent."""
  source = os.fspath(source)
  path = source if os.path.isfile(source) else os.path.join(source, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {source!r} (a PEFT adapter directory holds "
                            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
  try:
    with open(path, encoding="utf-8") as handle:
      peft_config = json.load(handle)
  except ValueError as error:
    raise CheckpointCorruptError(f"{path} is not valid JSON: {error}") from error
  check_peft_config(peft_config, where=path)
  return peft_config


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  path = os.path.join(directory, ADAPTER_WEIGHTS)
  if not os.path.exists(path):
    pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if
               os.path.exists(os.path.join(directory, n))]
    raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}"
                            + (f" ({pickled[0]} is a pickle; it is never read: convert it to "
                               "safetensors)" if pickled else ""))
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as error:
    raise CheckpointCorruptError(f"cannot read {path}: {error}") from error


def _flax_param(module_path: Path, name: str, value: np.ndarray, existing: set[str],
                family: Family | None) -> tuple[str, np.ndarray]:
  """The Flax name and value of the PyTorch param ``name`` of a module saved in full, given the
  names ``existing`` of the expected module's params (empty when unknown)."""
  if name == "bias":
    return "bias", value
  if name != "weight":
    raise ValueError(f"cannot map the PyTorch param {dotted((*module_path, name))} to Flax")
  if "embedding" in existing:
    return "embedding", value
  if value.ndim == 2:
    return "kernel", value.T
  if "scale" in existing or "weight" in existing:
    return ("scale" if "scale" in existing else "weight"), value
  return (family.norm_weight if family else "weight"), value


def _peft_targets(targets: Any, name: str) -> bool:
  """PEFT's rule (``check_target_module_exists``): one string is a regex over the whole module
  name, a list holds names or suffixes at a component boundary."""
  if isinstance(targets, str):
    return re.fullmatch(targets, name) is not None
  return any(name == t or name.endswith("." + t) for t in targets)


def _check_config_agrees(peft_config: Mapping[str, Any], modules: Sequence[str],
                         family: Family | None, prefix: str, where: str) -> None:
  """Raises unless ``target_modules`` / ``exclude_modules`` select exactly the modules with
  tensors, ``fan_in_fan_out`` is the family's, and each layer index follows the family's
  ``stack_container``."""
  targets = peft_config.get("target_modules")
  excluded = peft_config.get("exclude_modules") or []
  if targets is not None and targets != ALL_LINEAR:
    uncovered = [m for m in modules if not _peft_targets(targets, m)]
    uncovered += [m for m in modules if excluded and _peft_targets(excluded, m)]
    if uncovered:
      raise ValueError(f"{where}: target_modules {targets!r} (exclude_modules {excluded!r}) do not "
                       f"select the module {uncovered[0]!r} that {ADAPTER_WEIGHTS} adapts "
                       f"({len(uncovered)} such modules)")
    if not isinstance(targets, str):
      unused = [t for t in targets if not any(_peft_targets([t], m) for m in modules)]
      if unused:
        raise ValueError(f"{where}: target_modules entries {unused} match none of the "
                         f"{len(modules)} modules with tensors in {ADAPTER_WEIGHTS} (e.g. "
                         f"{modules[0]!r}): the config and the tensors disagree")
  if family is None:
    return
  if bool(peft_config.get("fan_in_fan_out")) != bool(family.transposed_kernels):
    raise ValueError(f"{where}: fan_in_fan_out={peft_config.get('fan_in_fan_out')!r}, but family "
                     f"{family.name!r} stores its kernels "
                     + ("(n_out, n_in) (fan_in_fan_out=true)" if family.transposed_kernels else
                        "(n_in, n_out) (fan_in_fan_out=false)") + ": wrong family?")
  for module in modules:
    parts = module[len(prefix):].split(".") if module.startswith(prefix) else module.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is not None and (index == 0 or parts[index - 1] != family.stack_container):
      raise ValueError(f"{where}: module {module!r} numbers its layers after "
                       f"{parts[index - 1] if index else '<root>'!r}, but family {family.name!r} "
                       f"keeps them under {family.stack_container!r}: wrong family?")


def import_peft(directory: str | os.PathLike, *, family: str | Family | None = None,
                prefix: str = "", base_model_name_or_path: str | None = None,
                like: Any = None, dtype: Any = np.float32) -> tuple[dict, LoRAConfig]:
  """Reads a PEFT LoRA adapter into our layout: ``(trainable tree, LoRAConfig)``.

  Module names lose ``base_model.model.`` and ``prefix`` and become Flax paths; each module's
  rank (from its factors) and alpha (PEFT's ``alpha_pattern`` rule) go into the config's
  ``rank_pattern`` / ``alpha_pattern`` when they differ from ``r`` / ``lora_alpha``, so
  ``config.scale_for(path)`` is PEFT's scale of that module. ``modules_to_save`` weights come back
  as Flax params (``weight`` -> transposed ``kernel`` for 2-D, norm weights named by
  ``family``'s ``norm_weight``).

  The adapter's config must agree with its tensors (clear ``ValueError`` otherwise, nothing is
  returned): ``target_modules`` / ``exclude_modules`` select exactly the modules that have
  factors; with ``family``, ``fan_in_fan_out`` is the family's and every layer index follows its
  ``stack_container``.

  Args:
    family: the model family (a key of ``lorapro_jax.models.FAMILIES`` or a ``Family``).
    prefix: the PyTorch module prefix of the tree's root (as in :func:`export_peft`).
    base_model_name_or_path: the base model the adapter must have been trained on; an adapter
      whose config names another one is refused (one that names none is accepted).
    like: optional tree of the expected trainable layout (e.g. ``init_adapters`` output): every
      leaf's path and shape must match, else :class:`CheckpointMismatchError` naming each
      difference (and nothing is returned); it also settles Flax names of saved modules, and its
      stacked nodes (``nn.scan`` layers, ``lora_a`` of shape ``(L, n_in, r)``) collect their
      per-layer modules (after ``family``'s ``stack_container``; needs ``family``),
      zero-padded to ``r``.
    dtype: dtype of the returned arrays.
  """
  _check_prefix(prefix)
  family = None if family is None else get_family(family)
  directory = os.fspath(directory)
  peft_config = read_peft_config(directory)
  config_path = os.path.join(directory, ADAPTER_CONFIG)
  recorded = peft_config.get("base_model_name_or_path")
  if base_model_name_or_path is not None and recorded not in (None, base_model_name_or_path):
    raise ValueError(f"{config_path}: the adapter was trained on base_model_name_or_path "
                     f"{recorded!r}, not the expected {base_model_name_or_path!r}")
  tensors = _read_tensors(directory)
  factors: dict[str, dict[str, np.ndarray]] = {}
  saved_params: list[tuple[str, np.ndarray]] = []
  for key, value in tensors.items():
    if not key.startswith(PEFT_PREFIX):
      raise ValueError(f"{ADAPTER_WEIGHTS}: key {key!r} does not start with {PEFT_PREFIX!r}")
    rest = key[len(PEFT_PREFIX):]
    match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest)
    if match:
      factors.setdefault(match.group(1), {})[match.group(2)] = value
    elif ".lora_" in rest:
      raise ValueError(f"{ADAPTER_WEIGHTS}: unsupported LoRA tensor {key!r} (only lora_A / "
                       "lora_B of linear layers)")
    else:
      saved_params.append((rest, value))
  _check_config_agrees(peft_config, list(factors), family, prefix, config_path)

  def strip(name: str) -> Path:
    if not name.startswith(prefix):
      raise ValueError(f"module {name!r} does not start with prefix {prefix!r}")
    return tuple(name[len(prefix):].split("."))

  r, lora_alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
  rank_pattern_peft = peft_config.get("rank_pattern") or {}
  alpha_pattern_peft = peft_config.get("alpha_pattern") or {}
  flat: dict[Path, np.ndarray] = {}  # the tree being built: {leaf path: array}
  module_ranks, module_alphas = {}, {}  # dotted path -> rank / alpha of every module
  for name, pair in factors.items():
    if set(pair) != {"A", "B"}:
      raise CheckpointCorruptError(f"module {name}: only lora_{''.join(pair)} present")
    a, b = pair["A"], pair["B"]
    try:
      check_pair(a.T, b.T, where=f"module {name} (PEFT's lora_A and lora_B, transposed)")
      if a.ndim != 2:
        raise ValueError(f"module {name}: lora_A {a.shape} is not (r, n_in)")
    except ValueError as error:
      raise CheckpointCorruptError(f"{ADAPTER_WEIGHTS}: {error}") from None
    rank = a.shape[0]
    rank_key = peft_pattern_key(list(rank_pattern_peft), name)
    expected = int(rank_pattern_peft[rank_key]) if rank_key else r
    if rank != expected:
      raise CheckpointMismatchError(f"module {name} has rank {rank} in {ADAPTER_WEIGHTS} but "
                                    f"{expected} by its config (r / rank_pattern)")
    alpha_key = peft_pattern_key(list(alpha_pattern_peft), name)
    alpha = float(alpha_pattern_peft[alpha_key]) if alpha_key else lora_alpha
    path = strip(name)
    flat[path + (DEFAULT_KEYS.a,)] = np.asarray(a.T, dtype)
    flat[path + (DEFAULT_KEYS.b,)] = np.asarray(b.T, dtype)
    module_ranks[dotted(path)], module_alphas[dotted(path)] = rank, alpha
  if not factors:
    raise ValueError(f"{ADAPTER_WEIGHTS} holds no lora_A / lora_B tensor")
  rslora = bool(peft_config.get("use_rslora", False))
  if like is not None:
    _restack(flat, like, family, module_ranks, module_alphas, rslora, dtype, directory)
  rank_pattern = {p: rank for p, rank in module_ranks.items() if rank != r}
  alpha_pattern = {p: alpha for p, alpha in module_alphas.items() if alpha != lora_alpha}

  like_leaves = set(flatten_dict(like)) if like is not None else set()
  saved_roots = []
  for entry in peft_config.get("modules_to_save") or ():
    roots = {name.rsplit(".", 1)[0] for name, _ in saved_params
             if name.rsplit(".", 1)[0] == entry or name.rsplit(".", 1)[0].endswith("." + entry)}
    saved_roots += sorted(roots)
  for name, value in saved_params:
    module, param = name.rsplit(".", 1)
    if module not in saved_roots:
      raise ValueError(f"{ADAPTER_WEIGHTS}: {PEFT_PREFIX}{name} is neither a LoRA factor nor in "
                       f"modules_to_save {peft_config.get('modules_to_save')}")
    path = strip(module)
    existing = {leaf[-1] for leaf in like_leaves if leaf[:-1] == path}
    flax_name, flax_value = _flax_param(path, param, value, existing, family)
    flat[path + (flax_name,)] = np.asarray(flax_value, dtype)

  adapters = unflatten_dict(flat)
  paths = adapter_paths(adapters)
  targets = peft_config.get("target_modules")
  excluded = peft_config.get("exclude_modules") or ()
  if isinstance(targets, list) and targets and all(
      any(path_matches(t, p) for p in paths) for t in targets) and all(
          any(path_matches(t, p) for t in targets) for p in paths):
    excluded = [excluded] if isinstance(excluded, str) else list(excluded)
  else:  # a regex over PyTorch names, or names that do not fit our paths: list the modules
    targets, excluded = sorted(dotted(p) for p in paths), []
  config = LoRAConfig(
      rank=r, alpha=lora_alpha, rslora=rslora,
      dropout=float(peft_config.get("lora_dropout") or 0.0), targets=tuple(targets),
      exclude=tuple(excluded), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
      modules_to_save=tuple(dotted(strip(m)) for m in saved_roots),
      transposed_kernels=tuple(targets) if peft_config.get("fan_in_fan_out") else (),
      param_dtype=dtype)
  if like is not None:
    _check_like(adapters, like, directory)
  return adapters, config


def _restack(flat: dict, like: Any, family: Family | None, ranks: dict, alphas: dict,
             rslora: bool, dtype: Any, directory: str) -> None:
  """Stacks the per-layer modules of every stacked node of ``like`` (``nn.scan`` layers) into one
  node of the flat tree ``flat``, in place. Each slice is zero-padded to the node's rank; the node
  gets the most common per-layer scale s, and a layer with scale s_l has its B multiplied by
  s_l / s (1 when all layers share a scale, the usual case)."""
  for path in adapter_paths(like):
    like_a, like_b = (np.shape(get_path(like, path)[key]) for key in DEFAULT_KEYS[:2])
    if len(like_a) != 3:
      continue
    if family is None:
      raise ValueError(f"like= holds the stacked adapter {dotted(path)}: pass family= to find its "
                       "per-layer modules")
    (layers, n_in, width), n_out = like_a, like_b[-1]
    names = torch_module_names(path, family, layers)
    pairs = [tuple(flat.pop(tuple(name.split(".")) + (key,), None) for key in DEFAULT_KEYS[:2])
             for name in names]
    missing = [name for name, (a, _) in zip(names, pairs) if a is None]
    if missing:
      raise CheckpointMismatchError(f"PEFT adapter in {directory} lacks {missing} for the stacked "
                                    f"adapter {dotted(path)}; nothing was loaded")
    scales = [alphas.pop(name) / (math.sqrt(ranks[name]) if rslora else ranks[name])
              for name in names]
    scale = _most_common(scales)
    a, b = np.zeros((layers, n_in, width)), np.zeros((layers, width, n_out))
    for layer, (name, (a_l, b_l), layer_scale) in enumerate(zip(names, pairs, scales)):
      rank = ranks.pop(name)
      if a_l.shape != (n_in, rank) or b_l.shape != (rank, n_out) or rank > width:
        raise CheckpointMismatchError(
            f"PEFT module {name} has lora_a {a_l.shape}, lora_b {b_l.shape}; the stacked adapter "
            f"{dotted(path)} expects ({n_in}, r <= {width}) and (r, {n_out}); nothing was loaded")
      a[layer, :, :rank] = a_l
      b[layer, :rank] = np.asarray(b_l, np.float64) * (layer_scale / scale)
    flat[path + (DEFAULT_KEYS.a,)] = a.astype(dtype)
    flat[path + (DEFAULT_KEYS.b,)] = b.astype(dtype)
    ranks[dotted(path)] = width
    alphas[dotted(path)] = _alpha_for_scale(scale, width, rslora)


def _check_like(tree: Any, like: Any, directory: str) -> None:
  problems = layout_differences(tree, like, got_name="adapter", expected_name="like= tree",
                                dtypes=False)
  if problems:
    raise CheckpointMismatchError(f"PEFT adapter in {directory} does not fit the expected layout; "
                                  f"nothing was loaded ({len(problems)} differences): "
                                  + "; ".join(problems[:20]))


# ------------------------------------------------------------------------------- merged export


def _written_by_save_pretrained(name: str) -> bool:
  """A file that ``save_pretrained`` writes (or deletes as a stale shard): config, weights."""
  return name in ("config.json", "generation_config.json") or (
      name.startswith(("flax_model", "model")) and name.endswith((".msgpack", ".safetensors",
                                                                  ".json")))


def export_merged(params: Any, config: LoRAConfig, directory: str | os.PathLike, *,
                  hf_model: Any, source: str | os.PathLike | None = None,
                  max_shard_size: int | str = "5GB", safe_serialization: bool = False,
                  overwrite: bool = False) -> dict[str, Any]:
  """Saves the base with the adapters folded in (:func:`lorapro_jax.trees.merge`) as a Hugging
  Face checkpoint that runs without any adapter code; returns the ``config.json`` written.

  * Our decoder (``hf_model`` a :class:`lorapro_jax.models.DecoderForCausalLM`, or ``inject``'s
    wrapper of one): PyTorch-layout safetensors (``model.safetensors``, sharded above
    ``max_shard_size`` with ``model.safetensors.index.json``; no ``lm_head.weight`` when the head
    is tied) that transformers' PyTorch ``AutoModelForCausalLM.from_pretrained``, vLLM and
    :func:`lorapro_jax.models.load_pretrained` read. The adapters are folded in one layer at a
    time (:func:`lorapro_jax.models.save_pretrained`); ``source``, the checkpoint directory the
    model was loaded from, gives ``config.json``, the tokenizer and ``generation_config.json``.
  * A Hugging Face Flax model (``hf_model`` a ``FlaxPreTrainedModel``): its ``save_pretrained``,
    ``config.json`` + ``flax_model.msgpack`` (or ``model.safetensors`` with
    ``safe_serialization``), loadable by ``Flax<Model>.from_pretrained`` and by PyTorch's
    ``<Model>.from_pretrained(..., from_flax=True)``.

  Args:
    params: the full param tree with adapters (``combine(base, trainable)``); a tree without
      any adapter is refused (it would save the base as if it were the fine-tuned model).
    config: the LoRAConfig (scales, transposed GPT-2 kernels).
    hf_model: the model whose architecture the params belong to (see above).
    source: our decoder only: the checkpoint directory it was loaded from (else ``config.json``
      is written from the model's config).
    max_shard_size: bytes per weight file (int, or ``"5GB"``, ``"500MB"`` ...).
    safe_serialization: Flax models only (ours are always safetensors).
    overwrite: replace the config and weight files of a checkpoint already in ``directory``
      (default: refuse, writing nothing).
  """
  directory = os.fspath(directory)
  if not adapter_paths(params):
    raise ValueError("export_merged: params hold no adapter node (lora_a / lora_b); pass "
                     "combine(base, trainable), not the base alone")
  if isinstance(hf_model, nn.Module):  # ours; Hugging Face's Flax models are not linen modules
    from lorapro_jax.models.loader import save_pretrained
    return save_pretrained(hf_model, params, directory, lora=config, source=source,
                           max_shard_size=max_shard_size, overwrite=overwrite)
  if source is not None:
    raise ValueError("source= is for our decoder; a Flax model's config.json is its own "
                     "(hf_model.config)")
  existing = [name for name in (sorted(os.listdir(directory)) if os.path.isdir(directory) else ())
              if _written_by_save_pretrained(name)]
  if existing and not overwrite:
    raise FileExistsError(f"{directory} already holds {existing}; pass overwrite=True to replace "
                          "them")
  merged = merge(params, config)
  problems = layout_differences(merged, hf_model.params_shape_tree, got_name="merged params",
                                expected_name=type(hf_model).__name__, dtypes=False)
  if problems:
    raise ValueError(f"merged params do not have the layout of {type(hf_model).__name__} "
                     f"({len(problems)} differences): " + "; ".join(problems[:10]))
  hf_model.save_pretrained(directory, params=jax.device_get(merged), max_shard_size=max_shard_size,
                           safe_serialization=safe_serialization)
  if safe_serialization:  # safetensors creates its files 0600: give them the umask's mode
    umask = os.umask(0o022)
    os.umask(umask)
    for name in os.listdir(directory):
      if name.startswith("model") and name.endswith(".safetensors"):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)
  return hf_model.config.to_dict()
