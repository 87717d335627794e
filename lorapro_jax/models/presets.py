"""LoRA presets for Hugging Face Flax model families, and what their linen modules need to run.

Target sets follow the papers: RoBERTa / BERT (LoRA, Hu et al. 2022; dynamic rank, Mao et al.
2024): ``query, key, value, attention.output.dense, intermediate.dense, output.dense``; T5
(LoRA-Pro, Wang et al. 2025): ``q, k, v, o, wi, wo`` (plus ``wi_0`` / ``wi_1`` of T5 v1.1's gated
feed-forward); Llama (LoRA-Pro): ``q, k, v, o, gate, up, down`` projections; ViT: the BERT set
(HF's ViT uses the same module names); GPT-2: ``c_attn, c_proj, c_fc`` (its ``FlaxConv1D`` kernels
are stored ``(n_out, n_in)``, so they are listed in ``transposed_kernels`` too).

Hugging Face's Flax T5 calls ``jnp.clip(x, a_max=...)``, a keyword jax >= 0.10 removed.
:func:`fix_t5_clip` (run by ``preset("t5")``) gives *that module only* a ``jnp`` whose ``clip``
also accepts ``a_min`` / ``a_max``; ``jax.numpy`` itself is never patched.

Example::

  import jax, transformers
  from lorapro_jax import inject, init_adapters
  from lorapro_jax.models import hf_example_inputs, preset

  hf = transformers.FlaxBertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64))
  config = preset("bert", rank=4)
  model = inject(hf.module, config)
  args, kwargs = hf_example_inputs(hf.config)
  trainable = init_adapters(model, hf.params, jax.random.key(0), *args, **kwargs)
"""
from __future__ import annotations

import importlib
import types
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorapro_jax.lora import LoRAConfig

BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense")
T5_TARGETS = (r"re:.*\.(q|k|v|o|wi|wi_0|wi_1|wo)",)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")

PRESETS: dict[str, dict[str, Any]] = {
    "bert": dict(targets=BERT_TARGETS),
    "roberta": dict(targets=BERT_TARGETS),
    "vit": dict(targets=BERT_TARGETS),
    "t5": dict(targets=T5_TARGETS),
    "llama": dict(targets=LLAMA_TARGETS),
    "gpt2": dict(targets=GPT2_TARGETS, transposed_kernels=GPT2_TARGETS),
}


def preset(family: str, **overrides: Any) -> LoRAConfig:
  """The paper's LoRAConfig for an HF ``model_type`` (``"bert"``, ``"roberta"``, ``"t5"``,
  ``"vit"``, ``"llama"``, ``"gpt2"``); ``overrides`` set any other field (rank, alpha, ...)."""
  if family not in PRESETS:
    raise ValueError(f"no LoRA preset for model family {family!r}; known: {sorted(PRESETS)}")
  if family == "t5":
    fix_t5_clip()
  return LoRAConfig(**{**PRESETS[family], **overrides})


def hf_example_inputs(config: Any, batch: int = 2, seq_len: int = 8) -> tuple[tuple, dict]:
  """``(args, kwargs)`` that run an HF Flax *linen module* (``hf_model.module``) of this config.

  HF's linen modules take the masks and positions that the ``FlaxPreTrainedModel`` wrapper
  usually builds; these are the same defaults (all-ones masks, positions ``0..seq_len-1``; for
  RoBERTa from ``pad_token_id + 1``). Works for the base models and their task heads.
  """
  family = config.model_type
  ids = np.ones((batch, seq_len), np.int32)
  ones = np.ones((batch, seq_len), np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
  if family in ("bert", "roberta"):
    if family == "roberta":
      positions = positions + config.pad_token_id + 1
    head_mask = np.ones((config.num_hidden_layers, config.num_attention_heads), np.int32)
    return (ids, ones, np.zeros_like(ids), positions, head_mask), {}
  if family in ("gpt2", "llama"):
    return (ids, ones, positions), {}
  if family == "t5":
    return (), dict(input_ids=ids, attention_mask=ones, decoder_input_ids=ids,
                    decoder_attention_mask=ones)
  if family == "vit":
    size = config.image_size
    return (np.zeros((batch, size, size, config.num_channels), np.float32),), {}
  raise ValueError(f"no example inputs for model family {family!r}; known: {sorted(PRESETS)}")


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
