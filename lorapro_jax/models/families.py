"""What the library knows about each model family, in one record per family.

A :class:`Family` holds every fact that presets, example inputs and the PEFT / merged export need
about a Hugging Face ``model_type``; :data:`FAMILIES` maps the ``model_type`` to its record. To
support a new family, add one record (``FAMILIES["mistral"] = Family(...)``, or pass a ``Family``
wherever a family name is taken): nothing else in the library tests family names.

Target sets follow the papers: RoBERTa / BERT (LoRA, Hu et al. 2022; dynamic rank, Mao et al.
2024): ``query, key, value, attention.output.dense, intermediate.dense, output.dense``; T5
(LoRA-Pro, Wang et al. 2025): ``q, k, v, o, wi, wo`` (plus ``wi_0`` / ``wi_1`` of T5 v1.1's gated
feed-forward); Llama (LoRA-Pro): ``q, k, v, o, gate, up, down`` projections; ViT: the BERT set
(HF's ViT uses the same module names); GPT-2: ``c_attn, c_proj, c_fc``, whose ``FlaxConv1D``
kernels are stored ``(n_out, n_in)`` (``transposed_kernels``; PEFT's ``fan_in_fan_out``).

The ``"llama"`` record serves both Hugging Face's ``FlaxLlama*`` (layers ``model/layers/0/...``)
and our scanned :mod:`lorapro_jax.models.decoder` (``model/layers/...`` stacked on a leading axis):
the two share PyTorch's module names and take the same ``(input_ids, attention_mask, positions)``.

Hugging Face's Flax T5 calls ``jnp.clip(x, a_max=...)``, a keyword jax >= 0.10 removed: the T5
record's ``prepare`` is :func:`fix_t5_clip`, which gives *that module only* a ``jnp`` whose
``clip`` also accepts ``a_min`` / ``a_max``; ``jax.numpy`` itself is never patched.

>>> get_family("gpt2").transposed_kernels
('c_attn', 'c_proj', 'c_fc')
>>> get_family("t5").stack_container, get_family("t5").norm_weight
('block', 'weight')
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

ExampleInputs = Callable[[Any, int, int], tuple[tuple, dict]]


def _ids_and_masks(batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All-ones token ids and mask, positions ``0..seq_len-1``: the HF wrappers' defaults."""
  ids = np.ones((batch, seq_len), np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
  return ids, np.ones((batch, seq_len), np.int32), positions


def bert_inputs(config: Any, batch: int, seq_len: int) -> tuple[tuple, dict]:
  """``(input_ids, attention_mask, token_type_ids, position_ids, head_mask)`` of BERT-likes
  (RoBERTa's positions start at ``pad_token_id + 1``)."""
  ids, mask, positions = _ids_and_masks(batch, seq_len)
  if config.model_type == "roberta":
    positions = positions + config.pad_token_id + 1
  head_mask = np.ones((config.num_hidden_layers, config.num_attention_heads), np.int32)
  return (ids, mask, np.zeros_like(ids), positions, head_mask), {}


def decoder_inputs(config: Any, batch: int, seq_len: int) -> tuple[tuple, dict]:
  """``(input_ids, attention_mask, position_ids)`` of GPT-2 / Llama-style decoders."""
  return _ids_and_masks(batch, seq_len), {}


def t5_inputs(config: Any, batch: int, seq_len: int) -> tuple[tuple, dict]:
  """Encoder and decoder ids and masks of T5, as keywords."""
  ids, mask, _ = _ids_and_masks(batch, seq_len)
  return (), dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids,
                  decoder_attention_mask=mask)


def vit_inputs(config: Any, batch: int, seq_len: int) -> tuple[tuple, dict]:
  """A batch of zero images ``(batch, size, size, channels)``; ``seq_len`` is not used."""
  size = config.image_size
  return (np.zeros((batch, size, size, config.num_channels), np.float32),), {}


class _NumpyWithClipKeywords(types.ModuleType):
  """``jax.numpy`` for one foreign module, with ``clip`` also taking numpy's old ``a_min`` /
  ``a_max`` keywords."""

  def __init__(self):
    super().__init__("jax.numpy")

  def __getattr__(self, name: str) -> Any:
    return getattr(jnp, name)

  @staticmethod
  def clip(x, a_min=None, a_max=None, *, min=None, max=None):  # noqa: A002 (numpy's names)
    return jnp.clip(x, a_min if min is None else min, a_max if max is None else max)


def fix_t5_clip() -> None:
  """Makes HF's Flax T5 run on jax >= 0.10 (idempotent, scoped to ``modeling_flax_t5``)."""
  t5 = importlib.import_module("transformers.models.t5.modeling_flax_t5")
  if not isinstance(t5.jnp, _NumpyWithClipKeywords):
    t5.jnp = _NumpyWithClipKeywords()


@dataclasses.dataclass(frozen=True)
class Family:
  """The facts about one model family (one Hugging Face ``model_type``).

  Attributes:
    name: the Hugging Face ``model_type`` (``config.model_type``, the key of :data:`FAMILIES`).
    targets: the papers' LoRA targets (``LoRAConfig.targets`` syntax) used by ``preset``.
    transposed_kernels: patterns of linear layers that store their kernel ``(n_out, n_in)``
      (GPT-2's ``FlaxConv1D``): ``LoRAConfig.transposed_kernels`` of the preset, and PEFT's
      ``fan_in_fan_out`` at export (a family has it when any of its layers is transposed).
    stack_container: the path component after which a layer index goes in PyTorch module names
      when the layers are stacked on a leading axis (``nn.scan``): ``model.layers.{i}.mlp...``.
    norm_weight: the Flax name of a normalisation layer's 1-D weight (``"scale"`` for linen's
      ``LayerNorm``, ``"weight"`` for T5's / Llama's RMSNorm); PyTorch calls it ``weight``.
    example_inputs: ``fn(hf_config, batch, seq_len) -> (args, kwargs)`` that run the family's HF
      linen module (``hf_model.module``), head models included.
    prepare: run once before the family's modules are built (T5: :func:`fix_t5_clip`), or None.
  """

  name: str
  targets: tuple[str, ...]
  example_inputs: ExampleInputs
  stack_container: str
  norm_weight: str = "scale"
  transposed_kernels: tuple[str, ...] = ()
  prepare: Callable[[], None] | None = None

  def __post_init__(self):
    if self.norm_weight not in ("scale", "weight"):
      raise ValueError(f"Family {self.name!r}: norm_weight must be 'scale' or 'weight', got "
                       f"{self.norm_weight!r}")


BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("bert", BERT_TARGETS, bert_inputs, stack_container="layer"),
    Family("roberta", BERT_TARGETS, bert_inputs, stack_container="layer"),
    Family("vit", BERT_TARGETS, vit_inputs, stack_container="layer"),
    Family("t5", (r"re:.*\.(q|k|v|o|wi|wi_0|wi_1|wo)",), t5_inputs, stack_container="block",
           norm_weight="weight", prepare=fix_t5_clip),
    Family("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           decoder_inputs, stack_container="layers", norm_weight="weight"),
    # the other families of our decoder (lorapro_jax.models.decoder): Llama's module names
    *(Family(name, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             decoder_inputs, stack_container="layers", norm_weight="weight")
      for name in ("mistral", "qwen2", "gemma")),
    Family("gpt2", GPT2_TARGETS, decoder_inputs, stack_container="h",
           transposed_kernels=GPT2_TARGETS),
)}


def get_family(family: str | Family) -> Family:
  """The record of a ``model_type`` (a :class:`Family` is returned as it is), with an error
  listing the known families."""
  if isinstance(family, Family):
    return family
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)} (or "
                     "a lorapro_jax.models.families.Family record)")
  return FAMILIES[family]
