"""Experiment configs: one :class:`ExperimentConfig` per (paper table, task), by name.

Names are ``"<table>/<task>"``, e.g. ``"lorapro_t5_glue/sst2"``, ``"dora_roberta_glue/rte_r8"``,
``"llama2_metamath/gsm8k"``, ``"vit_images/cifar100"``. ``tiny()`` gives the same experiment on a
random model of a few thousand parameters, for tests and smoke runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lorapro_jax.methods import METHODS

FAMILIES = ("t5", "roberta", "llama", "vit")


@dataclass(frozen=True)
class ExperimentConfig:
  """Everything one run needs besides the method and the seed."""

  name: str
  family: str                      # "t5" (text-to-text), "roberta" (classification), "llama", "vit"
  model: str                       # Hugging Face model id (pretrained weights) or a preset name
  task: str                        # GLUE task, "gsm8k" or a tfds image dataset
  metrics: tuple[str, ...]
  methods: tuple[str, ...] = tuple(METHODS)  # names in lorapro_jax.methods.METHODS
  rank: int = 8                    # LoRA rank; the *target* rank for dynamic rank (from ceil(1.5 r))
  alpha: float = 16.0
  targets: tuple[str, ...] | None = None  # None: the model preset's targets
  learning_rate: float = 1e-4
  full_learning_rate: float | None = None  # full fine-tuning's peak lr (None: learning_rate)
  batch_size: int = 32
  epochs: float = 1.0
  max_steps: int | None = None     # caps epochs (None: epochs decide)
  max_length: int = 128
  target_length: int = 8           # T5 targets / generated answer tokens for GSM8K
  schedule: str = "cosine"
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  compute_dtype: str = "float32"
  seeds: tuple[int, ...] = (0, 1, 2)
  eval_every: int = 0              # 0: evaluate at the end only
  dem_weight: float = 0.0          # dynamic rank's DEM regulariser weight eta
  image_size: int = 224
  num_labels: int = 2
  train_split: str = "train"
  dev_split: str = "dev"
  train_file: str | None = None    # local JSON (MetaMathQA)
  eval_file: str | None = None     # local JSON (GSM8K test)
  max_train_examples: int | None = None
  paper: dict[str, float | None] = field(default_factory=dict)  # method -> paper's number
  paper_source: str = ""
  model_overrides: dict[str, Any] = field(default_factory=dict)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family {self.family!r} of {self.name}: expected one of {FAMILIES}")
    unknown = [method for method in self.methods if method not in METHODS]
    if unknown:
      raise ValueError(f"methods {unknown} of {self.name}: expected names of {list(METHODS)}")

  def replace(self, **changes) -> ExperimentConfig:
    return dataclasses.replace(self, **changes)


def _registry() -> dict[str, ExperimentConfig]:
  from experiments.configs import dora_roberta_glue, llama2_metamath, lorapro_t5_glue, vit_images
  configs: dict[str, ExperimentConfig] = {}
  for module in (lorapro_t5_glue, dora_roberta_glue, llama2_metamath, vit_images):
    for config in module.CONFIGS:
      configs[config.name] = config
  return configs


def all_configs() -> dict[str, ExperimentConfig]:
  return _registry()


def get_config(name: str) -> ExperimentConfig:
  configs = _registry()
  if name not in configs:
    raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(configs)}")
  return configs[name]
