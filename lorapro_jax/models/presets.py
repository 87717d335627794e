"""LoRA presets for Hugging Face Flax model families, and the inputs their linen modules need.

Both read the family's record (:mod:`lorapro_jax.models.families`).

>>> config = preset("gpt2", rank=4)
>>> config.rank, config.targets, config.transposed_kernels
(4, ('c_attn', 'c_proj', 'c_fc'), ('c_attn', 'c_proj', 'c_fc'))

Example with a model::

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

from typing import Any

from lorapro_jax.lora import LoRAConfig
from lorapro_jax.models.families import Family, get_family


def preset(family: str | Family, **overrides: Any) -> LoRAConfig:
  """The paper's LoRAConfig for an HF ``model_type`` (a key of ``FAMILIES``: ``"bert"``,
  ``"roberta"``, ``"t5"``, ``"vit"``, ``"llama"``, ``"gpt2"``, ...) or a ``Family`` record;
  ``overrides`` set any other field (rank, alpha, ...). Runs the family's ``prepare``."""
  record = get_family(family)
  if record.prepare is not None:
    record.prepare()
  return LoRAConfig(**{"targets": record.targets,
                       "transposed_kernels": record.transposed_kernels, **overrides})


def hf_example_inputs(config: Any, batch: int = 2, seq_len: int = 8) -> tuple[tuple, dict]:
  """``(args, kwargs)`` that run an HF Flax *linen module* (``hf_model.module``) of this config.

  HF's linen modules take the masks and positions that the ``FlaxPreTrainedModel`` wrapper
  usually builds; these are the same defaults (all-ones masks, positions ``0..seq_len-1``; for
  RoBERTa from ``pad_token_id + 1``), built by the family record's ``example_inputs``. Works for
  the base models and their task heads.
  """
  record = get_family(config.model_type)
  if record.prepare is not None:
    record.prepare()
  return record.example_inputs(config, batch, seq_len)
